"""llama.cpp beside our LFM2 (firebolt_vl.bench.llamacpp): the GGUF converted from a tiny random LFM2 by llama.cpp's
own converter computes the same function as transformers' model. Skipped, with the reason, when llama-cpp-python (an
optional extra that CI does not build) or llama.cpp's converter (its source tree: $FIREBOLT_LLAMA_CPP_SRC) is absent;
the skip path itself is always checked."""

import json

import numpy as np
import pytest
import torch

from firebolt_vl.bench import llamacpp as L


def test_absent_llamacpp_is_a_clean_skip(monkeypatch, tmp_path):
    monkeypatch.setattr(L, "llama_cpp_version", lambda: None)
    res = L.run_llamacpp_comparison(preset="tiny", src=tmp_path)
    assert res["skipped"] and "not installed" in res["reason"]
    # the bench hook records the skip and its reason, and the goal as unmeasured
    (tmp_path / "results.json").write_text("{}")
    result = {"device": "cpu", "threads": 1, "settings": {"new_tokens": 8}, "targets": {},
              "results_path": str(tmp_path / "results.json")}
    L.attach(result, True, "tiny")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["llamacpp"]["skipped"] and saved["llamacpp"]["reason"] == res["reason"]
    assert saved["targets"][L.GOAL[0]]["met"] is None


def test_split_variants():
    assert L.split_variants("firebolt,lfm2,llamacpp", None) == ("firebolt,lfm2", True)
    assert L.split_variants("llamacpp", "/src") == ("lfm2", "/src")
    assert L.split_variants("firebolt", None) == ("firebolt", None)


def test_missing_converter_is_a_clean_skip(monkeypatch, tmp_path):
    monkeypatch.setattr(L, "llama_cpp_version", lambda: "0.0")
    monkeypatch.delenv(L.SRC_ENV, raising=False)
    ok, reason, tree = L.availability(tmp_path)
    assert not ok and tree is None and "convert_hf_to_gguf.py" in reason


def _require_llamacpp():
    ok, reason, tree = L.availability()
    if not ok:
        pytest.skip(reason)
    return tree


def test_gguf_computes_the_same_function(tmp_path):
    """F32 GGUF logits at every prompt position == transformers fp32 logits (tiny random LFM2, wide init), and Q8_0
    close; then greedy decoding through llama.cpp (its caches: KV and short-conv state) follows transformers'."""
    tree = _require_llamacpp()
    from transformers import AutoConfig, AutoModelForCausalLM

    from firebolt_vl.bench.suite import bench_tokenizer
    from firebolt_vl.presets import tiny_text_config

    tok = bench_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(**tiny_text_config(len(tok), tokenizer=tok, initializer_range=0.5))).eval()
    hf = L.save_hf(model, tok, tmp_path / "hf")
    paths = L.build_ggufs(hf, tmp_path, tree, ("f32", "q8_0"), threads=1)["paths"]
    ids = tok("a red circle above a blue square, and a yellow triangle", add_special_tokens=False)["input_ids"]
    par = L.parity(model, paths, ids, threads=1)
    scale = par["reference_logit_std"]
    assert par["f32"]["max_abs_diff"] < 1e-3 * max(1.0, par["reference_logit_absmax"]), par
    assert par["f32"]["argmax_agree"] == 1.0
    print(json.dumps(par))
    assert par["q8_0"]["max_abs_diff"] < scale, par  # quantized: close, not equal

    # greedy decoding: llama.cpp's F32 tokens == ours
    lm = L.LlamaCppLM(paths["f32"], threads=1, n_ctx=128)
    try:
        t = lm.prefill(ids)
        mine = [t]
        for _ in range(7):
            t = lm.step(t)
            mine.append(t)
    finally:
        lm.close()
    seq = list(ids)
    with torch.no_grad():  # greedy argmax over the full prefix every step (EOS not special: as the bench)
        for _ in range(8):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    assert mine == seq[len(ids):]
    assert np.isfinite(par["q8_0"]["mean_abs_diff"])
