"""Core model behaviour: CMM properties, cached vs recomputed generation, padding, save/load round trips."""

import pytest
import torch
from PIL import Image

from firebolt_vl import FireboltConfig, FireboltForConditionalGeneration, FireboltProcessor
from firebolt_vl.cmm import CrossModalModulator, film
from firebolt_vl.hub import ModelDirError, load_model_dir, save_model_dir

PROMPTS = ["What color is the circle?", "Hi", "How many red shapes are there in the image, please?"]
VARIANTS = [
    dict(fusion_type="cmm", ssm_type="s4"),
    dict(fusion_type="cmm", ssm_type="s4d"),
    dict(fusion_type="cmm", ssm_type="mamba"),
    dict(fusion_type="cmm", ssm_type="s4", output_mode="pooled"),
    dict(fusion_type="prepend"),
    dict(fusion_type="cross_attention"),
]


def make_cmm(**kw):
    torch.manual_seed(0)
    args = dict(d_text=32, d_vision=24, heads=2, head_dim=8, top_k=3, dropout=0.0, ssm_type="s4", ssm_kwargs={"d_state": 8})
    return CrossModalModulator(**{**args, **kw}).eval()


def test_topk_keeps_exactly_k_grids():
    cmm = make_cmm(top_k=3)
    memory = cmm.grid_memory(torch.randn(2, 5, 24))
    w = cmm.correlation(torch.randn(2, 7, 32), memory)  # (B, H, T, G)
    assert w.shape == (2, 2, 7, 5)
    assert ((w > 0).sum(-1) == 3).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 7))
    full = make_cmm(top_k=0).correlation(torch.randn(2, 7, 32), memory)
    assert (full > 0).all()


def test_grid_embeddings_make_the_grids_an_ordered_set():
    x_t, x_v = torch.randn(2, 6, 32), torch.randn(2, 5, 24)
    perm = torch.tensor([0, 3, 1, 4, 2])
    plain = make_cmm()
    torch.testing.assert_close(plain(x_t, plain.grid_memory(x_v))[0], plain(x_t, plain.grid_memory(x_v[:, perm]))[0])
    ordered = make_cmm(grid_embeddings=5)
    out = ordered(x_t, ordered.grid_memory(x_v))[0]
    assert not torch.allclose(out, ordered(x_t, ordered.grid_memory(x_v[:, perm]))[0])
    with pytest.raises(ValueError, match="grid embeddings for 5 grids, got 4"):
        ordered.grid_memory(x_v[:, :4])


def test_gate_zero_makes_film_identity():
    x, gb = torch.randn(3, 4, 8), torch.randn(3, 4, 16)
    torch.testing.assert_close(film(x, gb, torch.tensor(0.0)), x)
    assert not torch.allclose(film(x, gb, torch.tensor(0.5)), x)
    cmm = make_cmm(gate_init=0.0)
    x_t, x_v = torch.randn(1, 6, 32), torch.randn(1, 5, 24)
    out0 = cmm(x_t, cmm.grid_memory(x_v))[0]
    out1 = cmm(x_t, cmm.grid_memory(torch.randn(1, 5, 24)))[0]
    torch.testing.assert_close(out0, out1)  # gate 0: the image no longer changes anything


@pytest.mark.parametrize("ssm", ["s4", "s4d", "mamba"])
def test_cmm_is_causal_and_step_matches(ssm):
    cmm = make_cmm(ssm_type=ssm, ssm_kwargs={"d_state": 8})
    x_t, memory = torch.randn(2, 12, 32), cmm.grid_memory(torch.randn(2, 5, 24))
    out, _ = cmm(x_t, memory)
    changed = x_t.clone()
    changed[:, 7] += 3.0
    out2, _ = cmm(changed, memory)
    torch.testing.assert_close(out[:, :7], out2[:, :7])
    assert not torch.allclose(out[:, 7:], out2[:, 7:])
    # prefill 5 tokens, then step token by token
    y, state = cmm(x_t[:, :5], memory)
    steps = [y]
    for t in range(5, 12):
        y_t, state = cmm.step(x_t[:, t], memory, state)
        steps.append(y_t[:, None])
    torch.testing.assert_close(torch.cat(steps, 1), out, atol=1e-4, rtol=1e-4)


def test_cmm_gradients_flow():
    cmm = make_cmm()
    cmm.train()
    out, _ = cmm(torch.randn(2, 6, 32), cmm.grid_memory(torch.randn(2, 5, 24)))
    out.square().mean().backward()
    for name, p in cmm.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def _batch(processor, image, prompts=PROMPTS):
    texts = [processor.build_prompt(p, True) for p in prompts]
    return texts, processor(texts, images=[image] * len(texts))


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v.values()))
def test_cached_generation_equals_recompute_and_rows_equal_alone(tiny_factory, red_image, variant):
    model, processor = tiny_factory(**variant)
    texts, batch = _batch(processor, red_image)
    lengths = batch["attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) == 3  # three different prompt lengths, left padded
    cached = model.generate(**batch, max_new_tokens=10, ignore_eos=True)
    recomputed = model.generate(**batch, max_new_tokens=10, ignore_eos=True, use_cache=False)
    assert torch.equal(cached, recomputed)
    static = model.generate(**batch, max_new_tokens=10, ignore_eos=True, compile="static")  # static cache, eager
    assert torch.equal(cached, static)
    new = cached[:, -10:]
    assert len(set(map(tuple, new.tolist()))) > 1 or len(set(new[0].tolist())) > 1  # not a degenerate constant
    for i, text in enumerate(texts):
        alone = processor([text], images=[red_image])
        out = model.generate(**alone, max_new_tokens=10, ignore_eos=True)
        assert torch.equal(out[0, -10:], new[i]), f"row {i} differs from its prompt alone"


def test_text_only_and_mixed_batches(tiny_factory, red_image):
    model, processor = tiny_factory(fusion_type="cmm", ssm_type="s4")
    texts = [processor.build_prompt("Hello there", False), processor.build_prompt("What color?", True)]
    batch = processor(texts, images=[None, red_image])
    assert batch["pixel_values"].shape[0] == 1
    out = model.generate(**batch, max_new_tokens=6, ignore_eos=True)
    ref = model.generate(**batch, max_new_tokens=6, ignore_eos=True, use_cache=False)
    assert torch.equal(out, ref)
    alone = model.generate(**processor([texts[0]]), max_new_tokens=6, ignore_eos=True)
    assert torch.equal(alone[0, -6:], out[0, -6:])


@pytest.mark.parametrize("bypass", [False, True], ids=["cmm", "release-bypass"])
def test_compiled_generate_equals_eager_generate(tiny_factory, red_image, bypass):
    """generate(compile="reduction"): static cache + torch.compile'd step gives the eager step's tokens, greedy and
    seeded sampling with a repetition penalty, on a left-padded batch mixing text-only and image rows."""
    import copy

    model, processor = tiny_factory(fusion_type="cmm", ssm_type="s4", text_only_bypass=bypass)
    texts = [processor.build_prompt("Hello there", False), processor.build_prompt("What color is it, really?", True),
             processor.build_prompt("Hm?", True)]
    batch = processor(texts, images=[None, red_image, red_image])
    greedy = dict(max_new_tokens=12, ignore_eos=True, repetition_penalty=1.3)
    eager = model.generate(**batch, **greedy)
    assert torch.equal(model.generate(**batch, **greedy, compile="reduction"), eager)
    sampled = dict(max_new_tokens=12, ignore_eos=True, do_sample=True, temperature=1.5, top_p=0.9)
    ref = model.generate(**batch, **sampled, generator=torch.Generator().manual_seed(3))
    out = model.generate(**batch, **sampled, generator=torch.Generator().manual_seed(3), compile="reduction")
    assert torch.equal(out, ref)
    with torch.inference_mode():  # eval's mode: its own buffers (inference tensors are read-only outside it)
        assert torch.equal(model.generate(**batch, **greedy, compile="reduction"), eager)
    decoder = model.static_decoder()
    assert decoder is model.static_decoder() and len(decoder._steps) == 1  # one compiled step, reused
    assert {k[:2] for k in decoder._buffers} == {(3, 256)}  # batch 3, the 256-column bucket
    twin = copy.deepcopy(model)  # a copy must not decode with the original's compiled step
    assert twin.static_decoder() is not decoder and twin.static_decoder().model is twin
    with pytest.raises(ValueError, match="compile mode"):
        model.generate(**batch, max_new_tokens=2, compile="fast")


def test_length_buckets():
    from firebolt_vl.static_decoding import length_bucket

    assert [length_bucket(n) for n in (1, 256, 257, 600, 1024, 1025)] == [256, 256, 512, 1024, 1024, 2048]


def test_image_changes_the_answer_distribution(tiny_factory, red_image):
    model, processor = tiny_factory(fusion_type="cmm", ssm_type="s4")
    text = processor.build_prompt("What color is the circle?", True)
    a = model(**processor(text, images=red_image)).logits
    b = model(**processor(text, images=Image.new("RGB", (50, 50), (0, 0, 255)))).logits
    assert not torch.allclose(a, b)


def test_eos_stops_and_pads(tiny_factory, red_image):
    model, processor = tiny_factory(fusion_type="cmm", ssm_type="s4")
    _, batch = _batch(processor, red_image)
    free = model.generate(**batch, max_new_tokens=6, ignore_eos=True)
    eos = int(free[0, -6 + 1])  # make row 0's second token the EOS
    out = model.generate(**batch, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    row = out[0, batch["input_ids"].shape[1]:].tolist()
    assert row[1] == eos and all(t == 0 for t in row[2:])


def test_sampling_is_seeded(tiny_factory, red_image):
    model, processor = tiny_factory(fusion_type="cmm", ssm_type="s4")
    _, batch = _batch(processor, red_image)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, ignore_eos=True)
    a = model.generate(**batch, generator=torch.Generator().manual_seed(1), **kw)
    b = model.generate(**batch, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b)


def test_loss_only_on_labels(tiny_factory, red_image):
    model, processor = tiny_factory(fusion_type="cmm", ssm_type="s4")
    batch = processor(processor.build_prompt("What color?", True), images=red_image)
    labels = batch["input_ids"].clone()
    labels[:, :-3] = -100
    out = model(**batch, labels=labels)
    logits = out.logits[0, -4:-1]
    expected = torch.nn.functional.cross_entropy(logits, batch["input_ids"][0, -3:])
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("fusion", ["cmm", "prepend"])
def test_supervised_logits_only_gives_the_full_logits_loss(tiny_factory, red_image, fusion):
    """The LM head on the supervised positions only: the same rows of logits, the same loss and gradients as the
    full-sequence path (left-padded rows, labels in the middle and at the end of a row)."""
    model, processor = tiny_factory(fusion_type=fusion, ssm_type="s4")
    _, batch = _batch(processor, red_image)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    labels[:, :-4] = -100
    labels[0, -9:-6] = batch["input_ids"][0, -9:-6]  # a second supervised span in row 0
    full = model(**batch, labels=labels)
    sel = labels[:, 1:] != -100
    fast = model(**batch, labels=labels, supervised_logits_only=True)
    assert fast.logits.shape == (int(sel.sum()), full.logits.shape[-1])
    torch.testing.assert_close(fast.logits, full.logits[:, -labels.shape[1]:][:, :-1][sel])
    torch.testing.assert_close(fast.loss, full.loss)
    grads = []
    for out in (full, fast):
        model.zero_grad()
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)
    with pytest.raises(ValueError, match="needs labels"):
        model(**batch, supervised_logits_only=True)


def test_image_token_mismatch_is_a_clear_error(tiny_factory, red_image):
    model, processor = tiny_factory(fusion_type="cmm", ssm_type="s4")
    batch = processor(processor.build_prompt("What color?", True), images=red_image)
    with pytest.raises(ValueError, match="image tokens do not match"):
        model(input_ids=batch["input_ids"], pixel_values=torch.cat([batch["pixel_values"]] * 2))


@pytest.mark.parametrize("vision_kind", ["siglip", "siglip2"])
def test_real_layout_checkpoints_round_trip(tmp_path, red_image, vision_kind):
    """Component dirs laid out like the hub's (config.json + model.safetensors, LFM2 + tokenizer) -> build ->
    generate -> save_pretrained -> from_pretrained: identical logits and tokens."""
    from firebolt_vl.presets import build_tiny

    model, processor = build_tiny(tmp_path / "components", vision_kind=vision_kind, init_std=0.5)
    assert (tmp_path / "components" / "vision" / "model.safetensors").is_file()
    assert (tmp_path / "components" / "language" / "tokenizer.json").is_file()
    model.eval()
    text = processor.build_prompt("What color is the circle?", True)
    batch = processor(text, images=red_image)
    logits = model(**batch).logits
    tokens = model.generate(**batch, max_new_tokens=5, ignore_eos=True)
    save_model_dir(model, processor, tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    loaded, loaded_proc = load_model_dir(tmp_path / "saved")
    batch2 = loaded_proc(text, images=red_image)
    assert torch.equal(batch2["input_ids"], batch["input_ids"])
    assert torch.equal(loaded(**batch2).logits, logits)
    assert torch.equal(loaded.generate(**batch2, max_new_tokens=5, ignore_eos=True), tokens)
    assert loaded.config.vision_config.model_type == f"{vision_kind}_vision_model"


def test_auto_classes_load_without_remote_code(tmp_path, tiny_factory):
    from transformers import AutoConfig, AutoModelForImageTextToText

    model, processor = tiny_factory(fusion_type="cmm", ssm_type="s4")
    save_model_dir(model, processor, tmp_path / "m")
    cfg = AutoConfig.from_pretrained(tmp_path / "m")
    assert isinstance(cfg, FireboltConfig)
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path / "m")
    assert isinstance(auto, FireboltForConditionalGeneration)


def test_native_view_geometry_matches_authors(tiny_factory):
    from firebolt_vl.vision import view_boxes

    cfg = FireboltConfig(image_size=256, tile_size=128, tile_overlap=2)
    assert view_boxes(cfg) == [(0, 0, 256, 256), (0, 0, 128, 128), (0, 126, 128, 254), (126, 0, 254, 128), (126, 126, 254, 254)]
    model, processor = tiny_factory(fusion_type="cmm", ssm_type="s4", native_views=True)
    assert model.config.view_size is None
    x_v = model.encode_images(torch.randn(2, 3, 64, 64))
    assert x_v.shape == (2, 5, 32)


def test_bad_configs_and_dirs(tmp_path):
    with pytest.raises(ValueError, match="ssm_type"):
        FireboltConfig(ssm_type="lstm")
    with pytest.raises(ValueError, match="tile_overlap"):
        FireboltConfig(tile_overlap=200)
    with pytest.raises(ModelDirError, match="not found"):
        load_model_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelDirError, match="config.json"):
        load_model_dir(tmp_path / "empty")


def test_save_is_atomic_on_failure(tmp_path, tiny_factory, monkeypatch):
    model, processor = tiny_factory(fusion_type="cmm", ssm_type="s4")
    save_model_dir(model, processor, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(FireboltProcessor, "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        save_model_dir(model, processor, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    load_model_dir(tmp_path / "m")  # the previous model still loads (processor file intact)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("ssm", ["s4", "s4d", "mamba"])
def test_half_precision_runs_with_fp32_ssm_kernels(tiny_factory, red_image, ssm):
    import copy

    model, processor = tiny_factory(fusion_type="cmm", ssm_type=ssm)
    batch = processor(processor.build_prompt("What color?", True), images=red_image)
    ref = model(**batch).logits
    half = copy.deepcopy(model).to(torch.bfloat16)
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    out = half(**batch).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert (out.float() - ref).abs().max() < 0.15 * ref.abs().max()
    assert half.generate(**batch, max_new_tokens=3, ignore_eos=True).shape[1] == batch["input_ids"].shape[1] + 3
