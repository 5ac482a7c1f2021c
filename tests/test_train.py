"""Trainer tests: label masking, batching, parameter groups, recipes, data order, overfitting, checkpoints, resume."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from firebolt_vl.testing import train_killed_and_resumed, write_color_squares
from firebolt_vl.train import checkpoint as ckpt
from firebolt_vl.train.collate import IGNORE_INDEX, Encoded, SkipExample, collate, encode_conversation
from firebolt_vl.train.data import ListSource, SourceStream
from firebolt_vl.train.optim import apply_trainable, lr_factor, param_groups
from firebolt_vl.train.recipe import OptimConfig, RecipeError, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parent.parent
TWO_TURNS = [
    {"from": "human", "value": "<image>\nWhat color?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "Sure?"},
    {"from": "gpt", "value": "yes"},
]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tiny_dir_factory):
    """A saved tiny model (fresh init, small std: trainable), shared by the subprocess tests."""
    return tiny_dir_factory(0.02)


# ---------------------------------------------------------------------------------------------- labels
def test_label_masking_exact(tiny_factory, red_image):
    _, processor = tiny_factory()
    ex = encode_conversation(processor, TWO_TURNS, red_image)
    toks = [processor.tokenizer.decode([i]) for i in ex.input_ids]
    # <|startoftext|> <|im_start|> u ser \n <image> \n What  color ? <|im_end|> \n <|im_start|> a ss is tant \n
    #  red <|im_end|> \n <|im_start|> u ser \n S ure ? <|im_end|> \n <|im_start|> a ss is tant \n y es <|im_end|> \n
    assert toks[5] == "<image>" and toks[18] == "red" and toks[36:39] == ["y", "es", "<|im_end|>"]
    supervised = [int(k) for k in np.nonzero(ex.labels != IGNORE_INDEX)[0]]
    assert supervised == [18, 19, 36, 37, 38]  # "red<|im_end|>" and "yes<|im_end|>": not the newline after them
    assert (ex.labels[supervised] == ex.input_ids[supervised]).all()
    assert len(toks) == 40 and ex.labels[39] == IGNORE_INDEX and toks[39] == "\n"
    assert ex.prompt_len == 18 and ex.n_targets == 5 and not ex.truncated
    assert ex.pixels.shape == (3, processor.image_size, processor.image_size) and ex.pixels.dtype == np.uint8

    everything = encode_conversation(processor, TWO_TURNS, red_image, loss_on="all")
    assert (everything.labels == everything.input_ids).all()

    cut = encode_conversation(processor, TWO_TURNS, red_image, max_length=20)
    assert cut.truncated and list(np.nonzero(cut.labels != IGNORE_INDEX)[0]) == [18, 19]
    with pytest.raises(SkipExample) as e:  # the first answer starts at 18: nothing left to learn
        encode_conversation(processor, TWO_TURNS, red_image, max_length=18)
    assert e.value.reason == "too_long"
    with pytest.raises(SkipExample):  # cuts through the image token
        encode_conversation(processor, TWO_TURNS, red_image, max_length=5)
    with pytest.raises(SkipExample):  # <image> slot without an image
        encode_conversation(processor, TWO_TURNS, None)
    text_only = encode_conversation(processor, [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "yes"}])
    assert text_only.pixels is None and text_only.n_targets == 3  # y, es, <|im_end|>


def test_batch_right_padding_matches_single_rows(tiny_factory, red_image):
    model, processor = tiny_factory()
    long = encode_conversation(processor, TWO_TURNS, red_image)
    short = encode_conversation(processor, [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "no"}])
    batch = collate([short, long], processor)
    assert batch["input_ids"].shape == (2, 40) and batch["attention_mask"][0].sum() == short.input_ids.shape[0]
    assert (batch["labels"][0, short.input_ids.shape[0]:] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape[0] == 1
    # pixels normalised at collate are bit-identical to the processor's own preprocessing
    assert torch.equal(batch["pixel_values"][0], processor.preprocess_image(red_image))
    with torch.no_grad():
        both = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
        for row, ex in enumerate([short, long]):
            one = collate([ex], processor)
            alone = model(one["input_ids"], one["attention_mask"], one.get("pixel_values")).logits[0]
            n = ex.input_ids.shape[0]
            torch.testing.assert_close(both[row, :n], alone, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- optimizer
def test_param_groups_frozen_modules_and_ssm_exemptions(tiny_factory):
    from firebolt_vl.modeling import FireboltForConditionalGeneration

    base, _ = tiny_factory()
    model = FireboltForConditionalGeneration(base.config)
    lrs = {"vision": 0.0, "cmm": 1e-3, "language": 0.0}
    counts = apply_trainable(model, lrs)
    assert counts["vision"] == counts["language"] == 0 and counts["cmm"] > 0 and model.config.freeze_vision
    for name, p in model.named_parameters():
        assert p.requires_grad == name.startswith("cmm.")
    groups = param_groups(model, lrs, weight_decay=0.01)
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert set(by_name) == {n for n, _ in model.named_parameters() if n.startswith("cmm.")}
    tagged = [n for n, p in model.named_parameters() if getattr(p, "_optim", None)]
    assert tagged and all(by_name[n]["weight_decay"] == 0.0 for n in tagged)  # SSM dynamics: no decay
    assert by_name["cmm.q_proj.weight"]["weight_decay"] == 0.01
    assert by_name["cmm.film_in.bias"]["weight_decay"] == 0.0 and by_name["cmm.norm_in.weight"]["weight_decay"] == 0.0
    assert by_name["cmm.gate"]["weight_decay"] == 0.0  # 0-d scalar
    assert all(g["lr"] == 1e-3 for g in groups)

    # a tag's own lr is honoured; the decoder joins with embeddings decayed and norms exempt
    model.cmm.ssm.D._optim = {"weight_decay": 0.0, "lr": 1e-4}
    lrs = {"vision": 0.0, "cmm": 1e-3, "language": 5e-4}
    apply_trainable(model, lrs)
    by_name = {n: g for g in param_groups(model, lrs, 0.01) for n in g["param_names"]}
    assert by_name["cmm.ssm.D"]["lr"] == 1e-4
    emb = "language_model.model.embed_tokens.weight"
    assert by_name[emb]["lr"] == 5e-4 and by_name[emb]["weight_decay"] == 0.01
    norms = [n for n in by_name if n.startswith("language_model") and "norm" in n]
    assert norms and all(by_name[n]["weight_decay"] == 0.0 for n in norms)
    assert not any(n.startswith("vision.") for n in by_name)
    optimizer = torch.optim.AdamW(param_groups(model, lrs, 0.01))
    in_optim = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optim for p in model.vision.parameters())


def test_lr_schedule_warmup_and_cosine():
    cfg = OptimConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    f = [lr_factor(s, 20, cfg) for s in range(21)]
    assert f[:4] == [0.2, 0.4, 0.6, 0.8] and f[4] == 1.0
    assert all(a >= b for a, b in zip(f[4:], f[5:])) and abs(f[20] - 0.1) < 1e-12


# ---------------------------------------------------------------------------------------------- recipes
def _stage(**kw):
    return {"name": "s1", "data": {"train": ["a.jsonl"]}, "lr": {"cmm": 1e-3}, **kw}


def test_recipe_validation_errors():
    ok = recipe_from_dict({"name": "r", "stages": [_stage(lr={"cmm": "5e-4"})]})  # YAML 1.1 string numbers
    assert ok.stages[0].lr.cmm == 5e-4 and ok.stages[0].data.train[0].path == "a.jsonl"
    cases = [
        ({"name": "r", "stages": [_stage(optim={"lrr": 1})]}, "stages[0].optim.lrr: unknown key"),
        ({"name": "r", "stages": [_stage(batch_size="big")]}, "stages[0].batch_size: expected a number"),
        ({"name": "r", "stages": [_stage(batch_size=2.5)]}, "stages[0].batch_size: expected a whole number"),
        ({"name": "r", "stages": [_stage(lr={"cmm": 0})]}, "every module has learning rate 0"),
        ({"name": "r", "stages": [_stage(lr={"cmm": -1})]}, "cmm: learning rate must be"),
        ({"name": "r", "stages": [_stage(loss_on="prompt")]}, "loss_on: must be one of"),
        ({"name": "r", "stages": [_stage(optim={"betas": [0.9]})]}, "betas"),
        ({"name": "r", "stages": [_stage(), _stage()]}, "duplicate stage names"),
        ({"name": "r", "stages": [_stage()], "runtime": {"precision": "fp8"}}, "precision: must be one of"),
        ({"name": "r", "stages": [_stage(data={"train": [{"path": "x", "wieght": 2}]})]},
         "stages[0].data.train[0].wieght: unknown key"),
        ({"name": "r", "stages": []}, "at least one stage"),
        ({"stages": [_stage()]}, "name: required key is missing"),
        ({"name": "r", "stages": [_stage()], "extra": 1}, "extra: unknown key"),
    ]
    for data, message in cases:
        with pytest.raises(RecipeError) as e:
            recipe_from_dict(data)
        assert message in str(e.value), (message, str(e.value))
    with pytest.raises(RecipeError, match="not a multiple"):
        ok.stages[0].batch_layout(3)
    with pytest.raises(RecipeError, match="no element 'nope'"):
        recipe_from_dict({"name": "r", "stages": [_stage()]}, ["stages.nope.epochs=1"])
    assert recipe_from_dict({"name": "r", "stages": [_stage()]}, ["stages.s1.epochs=3"]).stages[0].epochs == 3.0


def test_packaged_recipes():
    paper = load_recipe("paper")
    align, instruct = paper.stages
    assert paper.model.vision == "google/siglip2-base-patch16-256" and paper.model.language == "LiquidAI/LFM2-350M"
    assert align.lr.as_dict() == {"vision": 0.0, "cmm": 5e-4, "language": 0.0} and align.batch_size == 128
    assert instruct.lr.cmm == instruct.lr.language == 1e-4 and instruct.batch_size == 8
    assert align.epochs == instruct.epochs == 5 and paper.runtime.precision == "bf16"
    for s in paper.stages:
        assert s.optim.betas == (0.9, 0.95) and s.optim.weight_decay == 0.01 and s.optim.grad_clip == 1.0
        assert s.optim.schedule == "cosine"
    assert align.batch_layout(2) == (64, 1)
    demo = load_recipe("demo", ["stages.align.max_steps=3"])
    assert demo.model.preset == "tiny" and demo.stages[0].max_steps == 3
    with pytest.raises(RecipeError, match="unknown recipe"):
        load_recipe("nope")


def test_cli_data_overrides(tmp_path):
    from firebolt_vl.train.cli import build_recipe

    recipe, selected = build_recipe("paper", stage=["instruct"], data=["a.jsonl", "b.jsonl"], max_steps=5,
                                    overrides=["runtime.num_workers=2"])
    assert selected == ["instruct"] and [s.path for s in recipe.stage("instruct").data.train] == ["a.jsonl", "b.jsonl"]
    assert recipe.stage("instruct").max_steps == 5 and recipe.stage("align").max_steps is None
    assert recipe.runtime.num_workers == 2
    with pytest.raises(RecipeError, match="--data applies to one stage"):
        build_recipe("paper", data=["a.jsonl"])


# ---------------------------------------------------------------------------------------------- data order
def _enc(rec):
    return Encoded(np.array([rec["index"]]), np.array([0]), 0, None, index=rec["index"])


def _order(stream):
    return [(e.index, pos) for e, pos in stream]


def test_stream_order_is_deterministic_and_resumable():
    source = ListSource([{"conversations": [], "i": i} for i in range(23)])
    kw = dict(rank=0, world=1, epoch=3, seed=5, source_id=0, window=6, shuffle=True, encode=_enc)
    full = _order(SourceStream(source, **kw))
    assert sorted(i for i, _ in full) == list(range(23)) and [i for i, _ in full] != list(range(23))
    assert _order(SourceStream(source, num_workers=2, **kw)) == full  # independent of the worker count
    assert [i for i, _ in _order(SourceStream(source, **{**kw, "epoch": 4}))] != [i for i, _ in full]
    for k in (0, 5, 6, 11, 22):  # resume right after the k-th example
        assert _order(SourceStream(source, start=full[k][1], **kw)) == full[k + 1:]
    shard = _order(SourceStream(source, **{**kw, "rank": 1, "world": 2}))
    assert sorted(i for i, _ in shard) == list(range(11))  # rank 1 holds entries 1, 3, ..., 21 (local 0..10)


def test_stream_over_webdataset_shards_without_length(tmp_path):
    import io
    import tarfile

    from firebolt_vl.data import open_dataset
    from firebolt_vl.train.data import MixedStream

    for shard in range(2):
        with tarfile.open(tmp_path / f"{shard:05d}.tar", "w") as tar:
            for i in range(7):
                buf = io.BytesIO()
                Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(buf, format="PNG")
                for ext, payload in (("png", buf.getvalue()), ("txt", f"caption {shard} {i}".encode())):
                    info = tarfile.TarInfo(f"s{shard}_{i}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    reader = open_dataset(str(tmp_path / "{00000..00001}.tar"))
    kw = dict(rank=0, world=1, epoch=0, seed=1, source_id=0, window=4, shuffle=True, encode=_enc)
    full = _order(SourceStream(reader, **kw))
    assert sorted(i for i, _ in full) == list(range(14))
    assert _order(SourceStream(reader, num_workers=2, **kw)) == full
    for k in (2, 3, 9):
        assert _order(SourceStream(reader, start=full[k][1], **kw)) == full[k + 1:]
    # two sources mixed: every record of both, each in its own stream order, the draw sequence reproducible
    lst = ListSource([{"conversations": [], "k": i} for i in range(5)])
    mix = dict(weights=[14.0, 5.0], rank=0, world=1, epoch=0, seed=1, window=4, shuffle=True, encode=_enc)
    got = [(e.index, st) for e, st in MixedStream([reader, lst], **mix)]
    assert len(got) == 19 and got[-1][1]["draws"] == 19
    prev = [(None, {"positions": [[0, 0], [0, 0]]})] + got[:-1]
    from_wds = [i for (i, st), (_, before) in zip(got, prev) if st["positions"][0] != before["positions"][0]]
    assert from_wds == [i for i, _ in full]  # source 0's records come in its own stream order
    again = [(e.index, st) for e, st in MixedStream([reader, lst], state=got[6][1], **mix)]
    assert again == got[7:]


# ---------------------------------------------------------------------------------------------- training
def _one_stage(tmp_path, **stage):
    from firebolt_vl.train.recipe import StageConfig, from_dict

    base = {"name": "s", "lr": {"cmm": 3e-3, "language": 3e-3}, "batch_size": 4, "max_length": 64, "log_every": 1,
            "optim": {"warmup_steps": 2, "schedule": "constant"}, "shuffle_buffer": 8}
    return from_dict(StageConfig, {**base, **stage})


def test_loss_decreases_on_tiny_overfit_set(tmp_path):
    from firebolt_vl.hub import load_model_dir
    from firebolt_vl.presets import build_tiny
    from firebolt_vl.train import read_metrics, run_stage
    from firebolt_vl.train.recipe import RuntimeConfig

    data = write_color_squares(tmp_path / "data", 40)  # 10 steps per epoch
    val = write_color_squares(tmp_path / "data", 8, "val.jsonl")
    model, processor = build_tiny(tmp_path / "parts", seed=0, init_std=0.02)
    stage = _one_stage(tmp_path, max_steps=30, save_every=10, eval_every=10,
                       data={"train": [str(data)], "val": [str(val)]})
    res = run_stage(model, processor, stage, tmp_path / "run", runtime=RuntimeConfig(progress=False), seed=0)
    rows = [r for r in read_metrics(res["metrics_path"]) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 31))
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    assert res["steps"] == 30 and res["samples"] == 120 and res["samples_per_s"] > 0 and res["peak_memory_mb"] > 0
    assert res["best_val_ppl"] is not None and res["best_val_ppl"] < float(np.exp(first))
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-00000020",
                                                                                           "step-00000030"]
    reloaded, _ = load_model_dir(res["final_dir"])  # final/ is a normal model directory
    sd = reloaded.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v.cpu()), k
    with pytest.raises(RecipeError, match="already holds checkpoints"):
        run_stage(model, processor, stage, tmp_path / "run", runtime=RuntimeConfig(progress=False))


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    from firebolt_vl.hub import load_model_dir
    from firebolt_vl.presets import build_tiny
    from firebolt_vl.train import run_stage
    from firebolt_vl.train.recipe import RuntimeConfig

    data = write_color_squares(tmp_path / "data", 8)
    model, processor = build_tiny(tmp_path / "parts", seed=0, init_std=0.02)
    stage = _one_stage(tmp_path, max_steps=4, save_every=2, data={"train": [str(data)]})
    real = ckpt.write_model_files

    def crashing(model_, processor_, sd, directory, extra=None):
        real(model_, processor_, sd, directory, extra)  # model files written, optimizer / RNG / state not yet
        if Path(directory).name == ".tmp-step-00000004":
            raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(ckpt, "write_model_files", crashing)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="disk full"):
        run_stage(model, processor, stage, run, runtime=RuntimeConfig(progress=False))
    monkeypatch.setattr(ckpt, "write_model_files", real)
    latest = ckpt.latest_checkpoint(run / "checkpoints", world_size=1)
    assert latest.name == "step-00000002"
    assert not (run / "checkpoints" / ".tmp-step-00000004").exists()
    state, rank_state, optim = ckpt.read_checkpoint(latest, 0)
    assert state["step"] == 2 and rank_state["data"]["draws"] == 8 and optim["optimizer"]["state"]
    load_model_dir(latest)
    # a SIGKILL mid-save leaves a .tmp dir: ignored, then cleaned up when the run resumes
    junk = run / "checkpoints" / ".tmp-step-00000006"
    junk.mkdir()
    (junk / "trainer_state.json").write_text("{")
    assert ckpt.latest_checkpoint(run / "checkpoints").name == "step-00000002"
    res = run_stage(model, processor, stage, run, runtime=RuntimeConfig(progress=False), resume=True)
    assert res["steps"] == 4 and not junk.exists()



def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    from firebolt_vl.train import read_metrics

    write_color_squares(tmp_path / "data", 12)
    write_color_squares(tmp_path / "data", 4, "val.jsonl")
    recipe = {
        "name": "killtest", "seed": 3,
        "runtime": {"precision": "fp32", "progress": False},
        "stages": [{
            "name": "only", "data": {"train": ["train.jsonl"], "val": ["val.jsonl"]},
            "lr": {"cmm": 2e-3, "language": 1e-3}, "epochs": 3, "batch_size": 4, "grad_accum": 2,
            "max_length": 64, "save_every": 2, "eval_every": 3, "log_every": 3, "shuffle_buffer": 5,
            "optim": {"warmup_steps": 2},
        }],
    }

    def after_kill(run):
        ckpts = ckpt.list_checkpoints(run / "only" / "checkpoints")
        assert [s for s, _ in ckpts] == [3, 4]  # every 2 steps + epoch ends, keep 2; step 5 is lost and redone

    train_killed_and_resumed(tmp_path, recipe, tiny_dir, tmp_path / "data", 5, after_kill)

    a = load_file(tmp_path / "ref" / "only" / "final" / "model.safetensors")
    b = load_file(tmp_path / "run" / "only" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    rows_a = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "ref" / "metrics.jsonl") if "loss" in r]
    rows_b = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert rows_a == rows_b and [s for s, _ in rows_a] == [3, 6, 9]  # 3 epochs x 3 steps, exact mean losses
    val_a = [r for r in read_metrics(tmp_path / "ref" / "metrics.jsonl") if "val_ppl" in r]
    val_b = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_ppl" in r]
    assert [(r["step"], r["val_ppl"]) for r in val_a] == [(r["step"], r["val_ppl"]) for r in val_b]
    state = json.loads((tmp_path / "run" / "only" / "final" / "stage.json").read_text())
    assert state["step"] == 9 and state["epoch"] == 3


def test_recipe_stages_hand_over_and_resume_skips_finished(tmp_path, tiny_dir, capsys):
    from firebolt_vl.hub import load_model_dir
    from firebolt_vl.train import run_recipe

    write_color_squares(tmp_path / "data", 8)
    stage = {"data": {"train": ["train.jsonl"]}, "batch_size": 4, "max_steps": 2, "max_length": 64,
             "optim": {"warmup_steps": 0}}
    recipe = recipe_from_dict({"name": "two", "runtime": {"progress": False}, "stages": [
        {"name": "first", "lr": {"cmm": 1e-3}, **stage},
        {"name": "second", "lr": {"cmm": 1e-3, "language": 1e-3}, **stage}]})
    out = tmp_path / "run"
    results = run_recipe(recipe, out, model=str(tiny_dir), data_root=str(tmp_path / "data"))
    assert f"[second] starting from {out / 'first' / 'final'}" in capsys.readouterr().out
    assert list(results) == ["first", "second"] and results["second"]["steps"] == 2
    first, _ = load_model_dir(out / "first" / "final")
    second, _ = load_model_dir(out / "second" / "final")
    start, _ = load_model_dir(tiny_dir)
    emb = "language_model.model.embed_tokens.weight"
    assert torch.equal(first.state_dict()[emb], start.state_dict()[emb])  # stage 1 froze the decoder
    assert not torch.equal(second.state_dict()[emb], first.state_dict()[emb])
    assert torch.equal(second.state_dict()["vision.encoder.embeddings.patch_embedding.weight"],
                       start.state_dict()["vision.encoder.embeddings.patch_embedding.weight"])
    cmm = "cmm.q_proj.weight"
    assert not torch.equal(first.state_dict()[cmm], start.state_dict()[cmm])
    saved = (out / "recipe.yaml").read_text()
    assert "data_root: " + str(tmp_path / "data") in saved
    with pytest.raises(RecipeError, match="already finished"):
        run_recipe(recipe, out, model=str(tiny_dir))
    capsys.readouterr()
    assert run_recipe(recipe, out, model=str(tiny_dir), resume=True) == {}
    assert "already done" in capsys.readouterr().out
