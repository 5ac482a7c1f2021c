"""`firebolt-vl bench`: the tiny-preset run end to end (JSON summary, every variant, PNGs), the benchmark's decoding loops
against the models' own generate, byte accounting, and the CMM decoding speed-up (FiLM tables) against forward.

Speed is measured by the benchmark itself, never asserted here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

VARIANTS = ["firebolt", "firebolt_nocache", "prepend", "lfm2_vl", "lfm2"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    cmd = [sys.executable, "-m", "firebolt_vl.cli", "bench", "--preset", "tiny", "--device", "cpu", "--new-tokens", "8",
           "--nocache-tokens", "3", "--warmup", "1", "--repeats", "2", "--threads", "1", "--scaling-lengths", "16,32",
           "--scaling-grids", "1,3", "--output", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def _positive(x):
    return isinstance(x, (int, float)) and x > 0


def test_tiny_bench_summary_and_files(tiny_run):
    out, proc = tiny_run
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    summary = json.loads(lines[-1])  # the last line printed is the JSON summary
    assert summary["preset"] == "tiny" and summary["device"] == "cpu"
    assert set(summary["variants"]) == set(VARIANTS)
    for name, v in summary["variants"].items():
        for key in ("ttft_s", "decode_tok_s", "e2e_s", "peak_mem_mb"):
            assert _positive(v[key]), (name, key, v[key])
        if name != "firebolt_nocache":
            assert _positive(v["bound_fraction"]), name
    assert summary["variants"]["firebolt_nocache"]["new_tokens"] == 3
    assert summary["variants"]["firebolt"]["new_tokens"] == 8
    assert _positive(summary["bandwidth_gbps"])
    for key in ("decode_vs_lfm2", "decode_vs_nocache", "bandwidth_fraction", "ttft_vs_lfm2_vl",
                "gpu_decode_tok_s_batch1", "gpu_decode_tok_s_batch32"):
        assert key in summary["targets"]
    assert summary["targets"]["gpu_decode_tok_s_batch1"]["value"] is None  # no GPU here: stated, not faked

    result = json.loads((out / "results.json").read_text())
    assert result["gpu"]["note"]
    assert set(result["variants"]) == set(VARIANTS)
    for name, entry in result["variants"].items():
        e = entry["batches"]["1"]
        assert e["tokens_identical_across_runs"], name  # greedy decoding is deterministic
        assert e["decode_tok_s"]["n"] == 2 and e["decode_tok_s"]["median"] > 0
        if entry["kind"] == "cached":
            for stage in ("preprocess_s", "vision_s", "fusion_s", "prefill_s"):
                assert e[stage]["median"] >= 0, (name, stage)
            assert e["bytes_per_step"]["weights"] > 0 and e["bound_tok_s"] > 0
    assert result["variants"]["lfm2_vl"]["image_tokens"] == 64  # 128 px tile, patch 8, unshuffle x2
    nc = result["variants"]["firebolt_nocache"]["batches"]["1"]
    assert nc["late_in_answer"]["prefix_tokens"] == nc["prompt_tokens"] + 8 - 3  # no-cache measured late too
    assert nc["full_answer_per_token_s_estimate"] > 0
    # the benchmark's loops produce exactly what the models' generate produces
    for name in ("firebolt", "prepend", "lfm2"):
        assert result["consistency"][name]["tokens_match_generate"], name
    sc = result["scaling"]
    assert [r["text_tokens"] for r in sc["prompt_length"]["designs"]["firebolt"]] == [16, 32]
    assert set(sc["grids"]["designs"]) == {"firebolt", "prepend", "lfm2_vl"}
    assert all(r["total_s"] > 0 for rows in sc["grids"]["designs"].values() for r in rows)
    pngs = [Path(p) for p in summary["plots"]]
    assert len(pngs) >= 4
    for p in pngs:
        assert p.parent == out and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def suite():
    from firebolt_vl.bench.suite import build_suite

    torch.set_num_threads(1)
    return build_suite("tiny", torch.device("cpu"), torch.float32, ["firebolt", "prepend", "lfm2_vl", "lfm2"])


def test_lockstep_solo_and_static_cache_decode_the_same_tokens(suite):
    from firebolt_vl.bench.runner import StaticRunner, run_cached, run_lockstep

    variants = list(suite.variants.values())
    recs, _ = run_lockstep(variants, 1, 7)
    static = StaticRunner("static")  # static caches + fixed state buffers, eager (the compiled/CUDA-graph layout)
    for v in variants:
        solo = run_cached(v, 1, 7)
        assert torch.equal(solo["tokens"], recs[v.name]["tokens"]), v.name
        assert len(set(solo["tokens"][0].tolist())) > 1, v.name  # a real sequence, not a constant
        assert torch.equal(run_cached(v, 1, 7, static, max_new_tokens=9)["tokens"], solo["tokens"]), v.name
        assert recs[v.name]["decode_tok_s_median_step"] > 0
    two = run_cached(suite.variants["firebolt"], 2, 4)["tokens"]
    assert torch.equal(two[0], two[1])  # identical rows decode identically


def test_byte_accounting(suite):
    from firebolt_vl.bench.suite import cmm_step_bytes, decoder_step_bytes, module_bytes

    lm = suite.variants["lfm2"].model
    emb = lm.get_input_embeddings().weight
    assert lm.get_output_embeddings().weight is emb  # tied
    all_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())  # the tied matrix counted once
    assert module_bytes(lm) == all_bytes
    # the tied head reads the whole matrix, the embedding lookup one row per batch row
    assert decoder_step_bytes(lm, lm.get_input_embeddings(), lm.get_output_embeddings(), 3) == all_bytes + 3 * emb.shape[1] * 4
    cmm = suite.variants["firebolt"].model.cmm
    assert 0 < cmm_step_bytes(cmm) < module_bytes(cmm)  # k/v projections and FiLM matrices are not read per token


@pytest.mark.parametrize("ssm", ["s4", "s4d", "mamba"])
def test_cmm_step_with_film_tables_matches_forward(ssm):
    """Decoding steps (eval, no grad) take FiLM parameters from per-image tables; same outputs as forward, rows
    without an image included."""
    from firebolt_vl.cmm import CrossModalModulator

    torch.manual_seed(0)
    cmm = CrossModalModulator(32, 24, heads=2, head_dim=8, top_k=3, dropout=0.1, ssm_type=ssm,
                              ssm_kwargs={"d_state": 8}).eval()
    x_t = torch.randn(3, 10, 32)
    memory = cmm.grid_memory(torch.randn(3, 5, 24), torch.tensor([True, False, True]))
    with torch.no_grad():
        full, _ = cmm(x_t, memory)
        y, state = cmm(x_t[:, :4], memory)
        steps = [y]
        for t in range(4, 10):
            y_t, state = cmm.step(x_t[:, t], memory, state)
            steps.append(y_t[:, None])
    assert memory.film_tables is not None and memory.film_tables[0].shape == (3, 5, 64)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # tables follow weight changes
        cmm.film_in.bias.add_(1.0)
        a, _ = cmm.step(x_t[:, 4], memory, state)
    b, _ = cmm.step(x_t[:, 4], memory, state)  # grad enabled: the matrix path
    torch.testing.assert_close(a, b.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_s4_short_sequence_scan_matches_the_kernel_path(dtype):
    """At inference short inputs run the S4 recurrence instead of building the length-L kernel: same outputs and
    states, with padding (left and interior) and a carried state."""
    from firebolt_vl.ssm.s4 import S4Block

    torch.manual_seed(0)
    s4 = S4Block(16, d_state=8).eval().to(dtype)
    x = torch.randn(3, 9, 16, dtype=dtype)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, 4] = 0  # a hole
    state = s4.init_state(3)
    state[0].normal_()
    kernel = S4Block(16, d_state=8).eval().to(dtype)
    kernel.load_state_dict(s4.state_dict())
    kernel.scan_max_tokens = 0  # force the FFT/generating-function path
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    with torch.no_grad():
        for kw in ({}, {"mask": mask}, {"mask": mask, "state": state}, {"state": state}):
            y1, s1 = s4(x, **kw)
            y2, s2 = kernel(x, **kw)
            real = kw.get("mask", torch.ones(3, 9)).bool()
            torch.testing.assert_close(y1[real].float(), y2[real].float(), **tol)
            torch.testing.assert_close(s1[0], s2[0], atol=1e-4, rtol=1e-4)


def test_s4_batch1_long_scan_matches_the_kernel_path():
    """Batch 1 on CPU scans at any length (cheaper than the kernel there); same outputs and state."""
    from firebolt_vl.ssm.s4 import S4Block

    torch.manual_seed(1)
    s4 = S4Block(16, d_state=8).eval()
    kernel = S4Block(16, d_state=8).eval()
    kernel.load_state_dict(s4.state_dict())
    kernel.scan_max_tokens = 0
    x = torch.randn(1, 300, 16)
    with torch.no_grad():
        (y1, s1), (y2, s2) = s4(x), kernel(x)
    torch.testing.assert_close(y1, y2, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(s1[0], s2[0], atol=2e-4, rtol=2e-4)


# ------------------------------------------------------------------------------------------- the release's format
def _tiny_release_model(tmp_path=None):
    """bench/release_model at tiny shapes: random weights in the release's format, converted by convert_release."""
    from firebolt_vl.bench.release_model import build_release_model
    from firebolt_vl.bench.suite import bench_tokenizer
    from firebolt_vl.presets import tiny_text_config, tiny_vision_config

    tok = bench_tokenizer()
    text = tiny_text_config(len(tok) + 1, tokenizer=tok, initializer_range=0.5)
    vision = tiny_vision_config("siglip", image_size=256, patch=32)
    return build_release_model(text, vision, tok, seed=0, check_tokens=520)


def test_release_shaped_model_cached_equals_recompute_decoding():
    """The --preset release path at tiny shapes: the converted model has the release's S4 (pair form, 512-tap window)
    and geometry, and its cached greedy decoding gives the release decoding's tokens (use_cache=False) over 64."""
    from firebolt_vl.bench.runner import check_cached_vs_nocache
    from firebolt_vl.bench.suite import QUESTION, FireboltVariant, bench_image

    model, proc, report = _tiny_release_model()
    cfg = model.config
    assert report["l_kernel"] == 512 and cfg.ssm_config == {"d_state": 128, "window": 512}
    check = report["s4_check"]  # the converted S4 vs the release's S4 (float64, dense), 520 tokens: past the window
    assert check["tokens"] == 520 and check["max_abs_err_past_window"] < 1e-4
    assert check["max_abs_err"] < 1e-4 < check["output_scale"]
    assert (cfg.cmm_heads, cfg.cmm_head_dim, cfg.cmm_top_k, cfg.view_size, cfg.tile_size) == (4, 32, 4, None, 128)
    variant = FireboltVariant("firebolt", model, proc, bench_image(256), QUESTION, torch.device("cpu"), torch.float32)
    check = check_cached_vs_nocache(variant, 64)
    assert check["identical"] and check["new_tokens"] == 64 and check["first_difference"] is None
    assert check["distinct_tokens"] > 3  # varied tokens: the comparison means something


def test_bench_a_model_directory(tmp_path):
    """`bench --model DIR` (e.g. convert-release's output): firebolt and firebolt_nocache from the directory, and the
    cached-vs-recompute token check in the results."""
    from firebolt_vl.hub import save_model_dir

    model, proc, _ = _tiny_release_model()
    save_model_dir(model, proc, tmp_path / "model")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "firebolt_vl.cli", "bench", "--model", str(tmp_path / "model"), "--device", "cpu",
           "--new-tokens", "6", "--nocache-tokens", "3", "--warmup", "0", "--repeats", "1", "--threads", "1",
           "--identity-tokens", "8", "--no-scaling", "--compile", "off", "--output", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc_ = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc_.returncode == 0, proc_.stderr[-3000:]
    summary = json.loads(proc_.stdout.strip().splitlines()[-1])
    assert set(summary["variants"]) == {"firebolt", "firebolt_nocache"}
    assert summary["cached_vs_nocache"] == {"new_tokens": 8, "identical": True}
    result = json.loads((out / "results.json").read_text())
    assert result["model"] == str(tmp_path / "model") and result["consistency"]["firebolt"]["tokens_match_generate"]
    assert any(str(tmp_path / "model") in n for n in result["notes"])


# ------------------------------------------------------------------------------------------- the compiled CPU step
def test_decode_ops_as_reductions_equal_the_library_calls():
    """The decoding fast path's rewrites, equal within rounding: F.linear over one row as (x * W).sum(-1) (+ bias),
    LFM2's short depthwise conv1d as a sum over its taps; several rows, other convolutions and other weight types go
    to the library unchanged."""
    import torch.nn.functional as F

    from firebolt_vl.static_decoding import DecodeOpsAsReductions

    torch.manual_seed(0)
    w, b = torch.randn(48, 40), torch.randn(48)
    for x in (torch.randn(40), torch.randn(1, 40), torch.randn(1, 1, 40)):
        for bias in (None, b):
            with DecodeOpsAsReductions():
                y = F.linear(x, w, bias)
            torch.testing.assert_close(y, F.linear(x, w, bias), atol=1e-5, rtol=1e-5)
            assert y.shape == (*x.shape[:-1], 48)
    x = torch.randn(3, 40)
    with DecodeOpsAsReductions():
        assert torch.equal(F.linear(x, w, b), F.linear(x, w, b))  # several rows: the library call itself
        layer = torch.nn.Linear(40, 48)
        torch.testing.assert_close(layer(x[:1]), F.linear(x[:1], layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    cw, cb = torch.randn(16, 1, 3), torch.randn(16)
    for L in (3, 4, 6):  # decoding: state (k - 1) + new tokens
        xc = torch.randn(2, 16, L)
        for bias in (None, cb):
            ref = F.conv1d(xc, cw, bias, padding=0, groups=16)
            with DecodeOpsAsReductions():
                got = F.conv1d(xc, cw, bias, padding=0, groups=16)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    xc = torch.randn(2, 16, 4)
    with DecodeOpsAsReductions():  # padded / long / not depthwise: the library
        for args in ((cw, None, 1, 1, 1, 16), (torch.randn(8, 16, 3),)):
            torch.testing.assert_close(F.conv1d(xc, *args), F.conv1d(xc, *args))


@pytest.mark.parametrize("mode", ["reduction", "default"])
def test_compiled_decode_step_equals_eager_step(suite, mode):
    """The static-cache step compiled with torch.compile (the CPU default: single-row Linears as reductions) against
    each model's eager step on tiny models: the same greedy tokens and logits within fp32 rounding at every step
    (teacher-forced), Firebolt-VL (CMM recurrence + LFM2) and the bare LFM2."""
    from firebolt_vl.bench.core import check_compiled_step
    from firebolt_vl.bench.runner import StaticRunner

    torch._dynamo.reset()
    static = StaticRunner(mode)
    for name in ("firebolt", "lfm2"):
        check = check_compiled_step(suite.variants[name], static, 6, 10)
        assert check["compared_steps"] == 5
        assert check["compiled_tokens_match_eager"], (name, check)
        assert check["compiled_logits_max_rel_diff"] < 1e-4, (name, check)
    torch._dynamo.reset()


def test_compile_modes_and_the_cpu_default():
    from firebolt_vl.bench.core import CPU_DECODE_COMPILE
    from firebolt_vl.static_decoding import COMPILE_MODES, compile_decode_step

    assert CPU_DECODE_COMPILE in COMPILE_MODES

    def step(x):
        return x + 1

    assert compile_decode_step(step, "static") is step
    with pytest.raises(ValueError, match="compile mode"):
        compile_decode_step(step, "fast")


def test_roofline_tools_count_and_time_matmuls():
    from firebolt_vl.bench.measure import count_flops, measure_matmul

    a, b = torch.randn(8, 16), torch.randn(16, 4)
    flops, out = count_flops(lambda: a @ b)
    assert flops == 2 * 8 * 16 * 4 and out.shape == (8, 4)
    g = measure_matmul([(8, 16, 4)], min_s=0.001, repeats=2)
    assert set(g) == {"8x16x4"} and g["8x16x4"] > 0


def test_threads_default_and_the_competitor():
    import time

    from firebolt_vl.bench.load import Competitor, busy_cores, default_threads

    assert default_threads(2, busy=0.1) == 2 and default_threads(2, busy=0.9) == 1 and default_threads(2, busy=2) == 1
    assert default_threads(1, busy=None) == 1 and default_threads(16, busy=3.4) == 13
    assert 1 <= default_threads() <= (os.cpu_count() or 1)
    b = busy_cores(0.05)
    assert b is None or 0 <= b <= (os.cpu_count() or 1)
    with Competitor("python") as c:
        assert c.proc.poll() is None  # running
        t0 = time.process_time()
    assert c.proc.poll() is not None  # ended with the block
    assert time.process_time() - t0 < 5
    with pytest.raises(ValueError):
        Competitor("gpu")


def test_release_settings_build_native_views(tmp_path):
    """from_components at the release's settings (a 256 px encoder, image 256, 128 px tiles) keeps native views: 256 +
    4 x 64 patch tokens in two encoder calls; another image size resizes the views as before; True/False force it."""
    from firebolt_vl.modeling import FireboltForConditionalGeneration
    from firebolt_vl.presets import tiny_vision_config, write_component_checkpoints

    vision, language = write_component_checkpoints(tmp_path, vision=tiny_vision_config("siglip", image_size=256,
                                                                                       patch=32))
    build = FireboltForConditionalGeneration.from_components
    model, _ = build(str(vision), str(language), cmm_heads=2, cmm_head_dim=8, ssm_config={"d_state": 8})
    assert model.config.view_size is None and model.config.tile_size == 128
    with torch.no_grad():
        assert model.encode_images(torch.randn(1, 3, 256, 256)).shape == (1, 5, 32)
    resized, _ = build(str(vision), str(language), image_size=192, tile_size=96, cmm_heads=2, cmm_head_dim=8,
                       ssm_config={"d_state": 8})
    assert resized.config.view_size == 256
    forced, _ = build(str(vision), str(language), native_views=False, cmm_heads=2, cmm_head_dim=8,
                      ssm_config={"d_state": 8})
    assert forced.config.view_size == 256
