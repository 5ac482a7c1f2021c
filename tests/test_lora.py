"""LoRA adapters (peft): save / load round trip, merge parity, cached decoding, SIGKILL + resume, error paths."""

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from firebolt_vl.adapters import (
    AdapterError,
    adapters_disabled,
    add_lora,
    load_model_with_adapter,
    merge_lora,
    save_adapter,
)
from firebolt_vl.testing import train_killed_and_resumed, write_color_squares
from firebolt_vl.train.recipe import LoraSpec, RecipeError, StageConfig, from_dict

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_dir(tiny_dir_factory):
    """The base model directory the adapters are trained on."""
    return tiny_dir_factory(0.1)


def _inputs(processor):
    image = Image.new("RGB", (48, 40), (200, 30, 30))
    batch = processor([processor.build_prompt("What color is the square?", True),
                       processor.build_prompt("Say something.", False)], images=[image, None])
    return batch


def _adapted(base_dir, seed=1):
    """The base model with LoRA adapters whose B is random (so they change the outputs)."""
    from firebolt_vl.hub import load_model_dir

    model, processor = load_model_dir(base_dir, dtype=torch.float32)
    add_lora(model, LoraSpec(r=4, alpha=8.0, dropout=0.0), ["cmm", "language"], base_dir=base_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval(), processor


def test_adapter_round_trip_merge_parity_and_cached_decoding(tmp_path, base_dir, capsys):
    from firebolt_vl.cli import main
    from firebolt_vl.hub import load_model_dir

    model, processor = _adapted(base_dir)
    inputs = _inputs(processor)
    with torch.no_grad():
        adapted = model(**inputs).logits
        with adapters_disabled(model):
            plain = model(**inputs).logits
        base_logits = load_model_dir(base_dir)[0](**inputs).logits
    assert torch.equal(plain, base_logits)  # adapters disabled = the base model
    assert (adapted - plain).abs().max() > 1e-2  # the adapter does change the outputs

    adapter = save_adapter(model, tmp_path / "adapter", base_dir)
    files = sorted(os.listdir(adapter))
    assert files == ["adapter_config.json", "adapter_model.safetensors", "firebolt_adapter.json"]
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["base_model_name_or_path"] == str(base_dir.resolve())

    loaded, _ = load_model_with_adapter(base_dir, adapter)
    same, _ = load_model_dir(None, adapter=adapter)  # the adapter's recorded base
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, adapted)
        assert torch.equal(same(**inputs).logits, adapted)

    # merge: in memory and through the CLI, an ordinary model directory with the same logits
    assert main(["merge", "--model", str(base_dir), "--adapter", str(adapter), "--output", str(tmp_path / "m")]) == 0
    merged, _ = load_model_dir(tmp_path / "m")
    assert not any("lora" in k for k in merged.state_dict())
    # an existing output is kept unless --overwrite
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    assert main(["merge", "--model", str(base_dir), "--adapter", str(adapter), "--output", str(tmp_path / "m")]) == 2
    assert "exists: pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert main(["merge", "--model", str(base_dir), "--adapter", str(adapter), "--output", str(tmp_path / "m"),
                 "--overwrite"]) == 0
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapted, atol=1e-5, rtol=0)
        torch.testing.assert_close(merge_lora(loaded)(**inputs).logits, adapted, atol=1e-5, rtol=0)

    # generation with the adapter: the cached O(1)-per-token path (decode_step) equals full recomputation
    calls = []
    real = same.decode_step
    same.decode_step = lambda *a, **k: calls.append(1) or real(*a, **k)
    cached = same.generate(**inputs, max_new_tokens=6, ignore_eos=True)
    recomputed = same.generate(**inputs, max_new_tokens=6, ignore_eos=True, use_cache=False)
    assert torch.equal(cached, recomputed) and len(calls) == 5
    assert torch.equal(merged.generate(**inputs, max_new_tokens=6, ignore_eos=True), cached)


def test_generate_cli_with_adapter(tmp_path, base_dir, capsys):
    from firebolt_vl.cli import main

    model, _ = _adapted(base_dir, seed=2)
    adapter = save_adapter(model, tmp_path / "adapter", base_dir)
    main(["generate", "--model", str(base_dir), "--adapter", str(adapter), "--prompt", "Hi", "--max-new-tokens", "4"])
    with_adapter = capsys.readouterr().out
    main(["generate", "--model", str(adapter), "--prompt", "Hi", "--max-new-tokens", "4"])  # adapter dir as model
    assert capsys.readouterr().out == with_adapter


def test_adapter_errors(tmp_path, base_dir):
    from firebolt_vl.hub import load_model_dir, save_model_dir
    from firebolt_vl.presets import build_tiny

    model, _ = load_model_dir(base_dir)
    with pytest.raises(AdapterError, match=r"\['nope_proj'\] match no nn.Linear module in cmm/language"):
        add_lora(model, LoraSpec(target_modules=["q_proj", "nope_proj"]), ["cmm", "language"])
    with pytest.raises(AdapterError, match="match no nn.Linear module in language"):
        add_lora(model, LoraSpec(target_modules=["film_in"]), ["language"])  # a CMM layer, CMM not trained
    for bad, msg in (({"r": 0}, "r: must be >= 1"), ({"dropout": 1.0}, "dropout"), ({"target_modules": []},
                                                                                    "target_modules")):
        with pytest.raises(RecipeError, match=msg):
            from_dict(StageConfig, {"name": "s", "lr": {"cmm": 1e-3}, "lora": bad})

    adapted, _ = _adapted(base_dir)
    adapter = save_adapter(adapted, tmp_path / "adapter", base_dir)
    # same architecture, other weights: the hashes differ
    other, proc = build_tiny(tmp_path / "p1", seed=5, init_std=0.5)
    other_dir = save_model_dir(other, proc, tmp_path / "other")
    with pytest.raises(AdapterError, match=r"different base weights .* targeted weights differ, e\.g\. .*sha256"):
        load_model_with_adapter(other_dir, adapter)
    # other shapes: the modules and both shapes are named
    wide, proc = build_tiny(tmp_path / "p2", seed=0, init_std=0.5, cmm_head_dim=16)
    wide_dir = save_model_dir(wide, proc, tmp_path / "wide")
    with pytest.raises(AdapterError, match=r"module shape\(s\) differ, e\.g\. cmm\.k_proj: adapter base \[16, 32\], "
                                           r"model \[32, 32\]"):
        load_model_with_adapter(wide_dir, adapter)
    with pytest.raises(AdapterError, match="not a PEFT adapter directory"):
        load_model_with_adapter(base_dir, base_dir)
    from firebolt_vl.cli import main

    os.environ.pop("FIREBOLT_VL_DEBUG", None)
    assert main(["merge", "--model", str(other_dir), "--adapter", str(adapter), "--output", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()



def test_lora_sigkill_and_resume_matches_uninterrupted_run(tmp_path, base_dir):
    from safetensors.torch import load_file

    from firebolt_vl.train import read_metrics

    write_color_squares(tmp_path / "data", 12)
    write_color_squares(tmp_path / "data", 4, "val.jsonl")
    recipe = {
        "name": "lorakill", "seed": 3,
        "runtime": {"precision": "fp32", "progress": False},
        "stages": [{
            "name": "only", "data": {"train": ["train.jsonl"], "val": ["val.jsonl"]},
            "lr": {"cmm": 5e-3, "language": 5e-3}, "epochs": 2, "batch_size": 4, "grad_accum": 2,
            "max_length": 64, "save_every": 2, "eval_every": 2, "log_every": 2, "shuffle_buffer": 5,
            "optim": {"warmup_steps": 1}, "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        }],
    }

    def after_kill(run):
        from firebolt_vl.train import checkpoint as ckpt

        last = ckpt.latest_checkpoint(run / "only" / "checkpoints")
        assert last.name == "step-00000002"  # step 3 is lost and redone
        assert (last / "adapter_model.safetensors").is_file() and not (last / "model.safetensors").exists()

    ref, _, _ = train_killed_and_resumed(tmp_path, recipe, base_dir, tmp_path / "data", 3, after_kill)
    assert "trainable parameters" in ref.stdout and "optimizer state" in ref.stdout

    a = load_file(tmp_path / "ref" / "only" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "run" / "only" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(k.startswith("base_model.model.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)  # it trained
    rows = [[(r["step"], r.get("loss"), r.get("val_ppl")) for r in read_metrics(tmp_path / d / "metrics.jsonl")
             if "step" in r] for d in ("ref", "run")]
    assert rows[0] == rows[1]
    meta = json.loads((tmp_path / "run" / "only" / "final" / "firebolt_adapter.json").read_text())
    assert meta["base_model"] == str(base_dir.resolve())


def test_lora_stage_trains_only_adapters_and_hands_over(tmp_path, base_dir):
    from firebolt_vl.hub import load_model_dir
    from firebolt_vl.train import run_recipe
    from firebolt_vl.train.recipe import recipe_from_dict

    write_color_squares(tmp_path / "data", 8)
    stage = {"data": {"train": ["train.jsonl"]}, "batch_size": 4, "max_steps": 2, "max_length": 64,
             "optim": {"warmup_steps": 0}}
    recipe = recipe_from_dict({"name": "two", "runtime": {"progress": False}, "stages": [
        {"name": "lora", "lr": {"cmm": 1e-2, "language": 1e-2}, "lora": {"r": 2}, **stage},
        {"name": "full", "lr": {"cmm": 1e-3}, **stage}]})
    res = run_recipe(recipe, tmp_path / "run", model=str(base_dir), data_root=str(tmp_path / "data"))
    lo = res["lora"]
    assert lo["lora"] and 0 < lo["trainable_params"] < 0.2 * lo["total_params"]
    assert lo["base_dir"] == str(base_dir.resolve())  # the start directory itself, no copy
    assert not (tmp_path / "run" / "lora" / "base").exists()
    # the next stage starts from base + adapters merged
    start, _ = load_model_dir(base_dir)
    merged, _ = load_model_dir(None, adapter=lo["final_dir"])
    merge_lora(merged)
    second, _ = load_model_dir(res["full"]["final_dir"])
    k = "language_model.model.layers.0.feed_forward.w1.weight"
    assert not torch.equal(merged.state_dict()[k], start.state_dict()[k])
    assert torch.equal(second.state_dict()[k], merged.state_dict()[k])  # stage 2 froze the decoder


def test_packaged_lora_recipe_parses():
    from firebolt_vl.train.recipe import load_recipe

    r = load_recipe("lora")
    sft, dpo = r.stages
    assert sft.lora is not None and sft.objective == "sft" and sft.lr.vision == 0
    assert dpo.lora is not None and dpo.objective == "dpo" and dpo.beta > 0


def test_bench_with_an_adapter(tmp_path, base_dir):
    """`bench --model BASE --adapter DIR`: the adapted model is the one benched (its cached decoding equals generate
    and the recompute decoding), and --adapter without --model is refused."""
    from firebolt_vl.bench.core import run_bench

    model, _ = _adapted(base_dir)
    adapter = save_adapter(model, tmp_path / "adapter", base_dir)
    result = run_bench(output=str(tmp_path / "out"), model=str(base_dir), adapter=str(adapter), device="cpu",
                       new_tokens=4, nocache_tokens=2, warmup=0, repeats=1, threads=1, identity_tokens=6,
                       scaling=False)
    assert result["adapter"] == str(adapter)
    assert any(str(adapter) in n for n in result["notes"])
    assert result["consistency"]["firebolt"]["tokens_match_generate"]
    with pytest.raises(ValueError, match="--adapter needs --model"):
        run_bench(output=str(tmp_path / "out2"), adapter=str(adapter), device="cpu")
