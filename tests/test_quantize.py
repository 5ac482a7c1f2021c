"""Weight-only quantization (firebolt_vl.quantize, torchao): correctness on tiny models. Speed is measured by
`firebolt-vl bench --quantize`, never asserted here.

Tolerances. A quantized model computes exactly what the float model computes with each quantized weight replaced by
its dequantized value (integer x scale [- zero point]); only the order of floating-point operations differs. So the
tight check compares against that dequantized float model: 1e-4 relative to the logits' scale (fp32 rounding over a
few small matmuls). Against the original float model the error is the quantization error itself: int8 per channel
rounds each weight by at most half a step of max|w_row| / 127, int4 by half a step of its group's range / 15; at the
decoder's real initialisation (std 0.02) the logits' RMS error is a few tenths of a percent for int8 and some percent
for int4, checked with margins (int8 <= 2 %, int4 <= 15 %) that still fail for a wrong scale or a transposed weight.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torchao = pytest.importorskip("torchao")

from firebolt_vl.quantize import check_mode, quantize_model, read_mode, target_linears  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    """A tiny model at the decoder's real initialisation scale (std 0.02), and a prompt with an image."""
    from PIL import Image, ImageDraw

    from firebolt_vl.presets import build_tiny

    model, proc = build_tiny(tmp_path_factory.mktemp("q"), init_std=0.02)
    img = Image.new("RGB", (96, 80), (240, 240, 240))
    ImageDraw.Draw(img).ellipse((10, 10, 30, 30), fill=(220, 20, 20))
    inputs = proc(proc.build_prompt("What is in the picture?", True), images=img)
    return model.eval(), proc, inputs


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits.float()


def _dequantized_copy(model, quantized):
    """The float model with every quantized weight replaced by the weight its kernel applies: linear(I, W_q) = W^T
    (torchao's CPU int4 tensor has no dequantize()); each within the quantization step of the original weight."""
    ref = copy.deepcopy(model)
    qlayers = dict(target_linears_any(quantized))
    for name, m in target_linears_any(ref):
        w = qlayers[name].weight
        if type(w) is not torch.nn.Parameter:
            with torch.no_grad():
                eff = torch.nn.functional.linear(torch.eye(m.in_features), w).t().contiguous()
            step = m.weight.detach().abs().amax(1, keepdim=True) / 7  # >= an int4 group's step; int8's is 18x finer
            assert ((eff - m.weight).abs() <= step / 2 + 1e-6).all(), name
            m.weight = torch.nn.Parameter(eff, requires_grad=False)
    return ref


def target_linears_any(model):
    for root in ("language_model", "cmm"):
        for name, m in getattr(model, root).named_modules():
            if isinstance(m, torch.nn.Linear):
                yield f"{root}.{name}", m


@pytest.mark.parametrize("mode, rel_tol", [("int8", 0.02), ("int4", 0.15)])
def test_quantized_logits_close_to_float(realistic, mode, rel_tol):
    model, _, inputs = realistic
    q = quantize_model(copy.deepcopy(model), mode)
    names = q.firebolt_quantized_layers
    assert names and any("lm_head" in n for n in names) and any(n.startswith("cmm.") for n in names)
    assert not any(".ssm." in n for n in names)  # the SSM stays in floating point
    assert type(q.language_model.lm_head.weight).__name__ != "Parameter"  # really converted
    assert type(q.vision.parameters().__next__()) is torch.nn.Parameter  # the vision tower untouched
    ref, got = _logits(model, inputs), _logits(q, inputs)
    scale = ref.abs().max()
    # exact up to fp32 rounding against the dequantized float model
    deq = _logits(_dequantized_copy(model, q), inputs)
    assert (got - deq).abs().max() <= 1e-4 * scale
    # the quantization error itself, against the original
    rel = ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    assert 0 < rel <= rel_tol, rel


@pytest.mark.parametrize("mode", ["int8", "int4", "fp16"])
def test_quantized_cached_decoding_equals_recompute(tiny_factory, red_image, mode):
    model, proc = tiny_factory()  # wide initialisation: varied greedy tokens
    q = quantize_model(copy.deepcopy(model), mode)
    inputs = proc(proc.build_prompt("Describe the image.", True), images=red_image)
    cached = q.generate(**inputs, max_new_tokens=16, ignore_eos=True)
    recompute = q.generate(**inputs, max_new_tokens=16, ignore_eos=True, use_cache=False)
    assert torch.equal(cached, recompute)
    assert len(set(cached[0, -16:].tolist())) > 2  # not a degenerate repetition


def test_unknown_mode_and_idempotence(realistic):
    model, _, _ = realistic
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        check_mode("int3")
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_model(copy.deepcopy(model), "fp8")
    assert quantize_model(model, "none") is model and not hasattr(model, "firebolt_quantized_layers")
    q = quantize_model(copy.deepcopy(model), "int8")
    assert quantize_model(q, "int8") is q
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(q, "int4")


def test_save_load_round_trip(realistic, tmp_path):
    from firebolt_vl.hub import ModelDirError, load_model_dir, save_model_dir

    model, proc, inputs = realistic
    out = save_model_dir(model, proc, tmp_path / "m", quantize="int8")
    assert read_mode(out) == "int8" and json.loads((out / "quantization.json").read_text())["mode"] == "int8"
    loaded, _ = load_model_dir(out)  # quantized at load, as recorded
    assert loaded.firebolt_quantization == "int8"
    expected = quantize_model(copy.deepcopy(model), "int8")
    for name, m in target_linears_any(loaded):
        w, e = m.weight, dict(target_linears_any(expected))[name].weight
        if hasattr(e, "qdata"):
            assert torch.equal(w.qdata, e.qdata) and torch.equal(w.scale, e.scale)
    assert torch.equal(_logits(loaded, inputs), _logits(expected, inputs))
    plain, _ = load_model_dir(out, quantize="none")  # the flag overrides the record
    assert not hasattr(plain, "firebolt_quantized_layers")
    assert torch.allclose(_logits(plain, inputs), _logits(model, inputs), atol=1e-5)
    with pytest.raises(ModelDirError, match="quantized model is saved as its floating-point weights"):
        save_model_dir(loaded, proc, tmp_path / "again")
    (out / "quantization.json").write_text('{"mode": "int2"}')
    with pytest.raises(ValueError, match="unknown quantization 'int2'"):
        load_model_dir(out)


def test_generate_flag_end_to_end(tiny_factory, red_image, tmp_path):
    from firebolt_vl.hub import save_model_dir

    model, proc = tiny_factory()
    model_dir = save_model_dir(model, proc, tmp_path / "m")
    img = tmp_path / "red.png"
    red_image.save(img)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def run(*extra):
        cmd = [sys.executable, "-m", "firebolt_vl.cli", "generate", "--model", str(model_dir), "--image", str(img),
               "--prompt", "Describe the image.", "--max-new-tokens", "8", "--device", "cpu", *extra]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    from firebolt_vl.commands import answer

    for mode in ("int8", "int4"):
        proc_ = run("--quantize", mode)
        assert proc_.returncode == 0, proc_.stderr[-2000:]
        # the CLI's answer is the quantized model's answer (same loader, same greedy decoding)
        assert proc_.stdout.strip() == answer(str(model_dir), "Describe the image.", str(img), 8, device="cpu",
                                              quantize=mode)
    bad = run("--quantize", "int3")
    assert bad.returncode != 0 and "invalid choice: 'int3'" in bad.stderr


def test_fp16_weights_compute_in_fp32(realistic, tiny_factory, red_image, tmp_path):
    """fp16 mode: the decoder's and the CMM's Linear weights stored in float16 (the tied embedding table, the SSM and
    the vision tower stay fp32); the model computes exactly the fp32 model whose weights are rounded to float16; the
    compiled decoding step (reduction mode, the conversion fused into the weight stream) gives the eager tokens; the
    mode round-trips through a model directory; a weight float16 cannot hold keeps its layer in fp32."""
    from firebolt_vl.hub import load_model_dir, save_model_dir
    from firebolt_vl.quantize import HalfWeightLinear

    model, proc, inputs = realistic
    q = quantize_model(copy.deepcopy(model), "fp16")
    names = q.firebolt_quantized_layers
    assert names == sorted(target_linears(model)) and any("lm_head" in n for n in names)
    lm = q.language_model
    assert lm.get_output_embeddings().weight.dtype == torch.float16
    assert lm.get_input_embeddings().weight.dtype == torch.float32  # the tie is broken, the table keeps fp32
    assert all(p.dtype == torch.float32 for p in q.cmm.ssm.parameters()) and q.dtype == torch.float32
    rounded = copy.deepcopy(model)
    for name, m in target_linears(rounded).items():
        m.weight = torch.nn.Parameter(m.weight.detach().half().float(), requires_grad=False)
    ref, got, exact = _logits(model, inputs), _logits(q, inputs), _logits(rounded, inputs)
    assert (got - exact).abs().max() <= 1e-5 * exact.abs().max()
    rel = ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    assert 0 < rel <= 2e-3, rel

    wide, wide_proc = tiny_factory()  # varied greedy tokens
    q = quantize_model(copy.deepcopy(wide), "fp16")
    enc = wide_proc(wide_proc.build_prompt("Describe the image.", True), images=red_image)
    eager = q.generate(**enc, max_new_tokens=12, ignore_eos=True)
    assert torch.equal(q.generate(**enc, max_new_tokens=12, ignore_eos=True, compile="reduction"), eager)

    out = save_model_dir(wide, wide_proc, tmp_path / "m", quantize="fp16")
    loaded, _ = load_model_dir(out)
    assert loaded.firebolt_quantization == "fp16" and read_mode(out) == "fp16"
    assert torch.equal(loaded.generate(**enc, max_new_tokens=12, ignore_eos=True), eager)

    big = torch.nn.Linear(4, 3)
    with torch.no_grad():
        big.weight[0, 0] = 1e5
    assert not HalfWeightLinear.convert(big) and type(big) is torch.nn.Linear and big.weight.dtype == torch.float32


def test_targets_exclude_the_ssm_and_vision(realistic):
    model, _, _ = realistic
    names = list(target_linears(model))
    assert names and all(n.startswith(("language_model.", "cmm.")) for n in names)
    assert not any(".ssm." in n for n in names)
    assert {"cmm.q_proj", "cmm.k_proj", "cmm.v_proj", "cmm.film_in", "cmm.film_out"} <= set(names)
