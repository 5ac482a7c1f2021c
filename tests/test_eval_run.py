"""`firebolt-vl eval` / `firebolt-vl score` and the evaluate() API on a tiny synthetic test split."""

import json
import shutil

import pytest
import torch

from firebolt_vl.cli import main as cli_main
from firebolt_vl.eval import load_benchmark, score
from firebolt_vl.eval.runner import (PREDICTIONS_FILE, SCORES_FILE, evaluate, plan_batches, read_prediction_records)
from firebolt_vl.eval.score import read_predictions
from firebolt_vl.testing import truncated_jpeg, vqa_annotation, write_vqav2_official


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from firebolt_vl.data.synthetic import generate_synthetic

    out = tmp_path_factory.mktemp("synth") / "data"
    generate_synthetic(out, n_train=0, n_val=0, n_test=3, image_size=64, progress=False)
    return out


@pytest.fixture(scope="module")
def model_dir(tiny_factory, tmp_path_factory):
    from firebolt_vl.hub import save_model_dir

    model, processor = tiny_factory()
    return save_model_dir(model, processor, tmp_path_factory.mktemp("evalmodel") / "model")


@pytest.fixture(scope="module")
def loaded(model_dir):
    from firebolt_vl.hub import load_model_dir

    return load_model_dir(model_dir)


@pytest.fixture(scope="module")
def ref_run(model_dir, synth, tmp_path_factory):
    """An uninterrupted `firebolt-vl eval` of the whole test split: (output folder, printed text)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("ref") / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli_main(eval_args(model_dir, synth, out, "--split", "test")) == 0
    return out, buf.getvalue()


def eval_args(model_dir, data, out, *extra):
    return ["eval", "--model", str(model_dir), "--benchmark", "synthetic", "--data", str(data), "--output", str(out),
            "--batch-size", "4", "--max-new-tokens", "3", "--quiet", *extra]


def lines_of(path):
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def test_interrupted_eval_resumes_to_the_same_scores(model_dir, synth, ref_run, tmp_path, monkeypatch, capsys):
    from firebolt_vl.modeling import FireboltForConditionalGeneration

    ref_dir = ref_run[0]
    items = load_benchmark("synthetic", synth)
    n_batches = -(-len(items) // 4)
    assert n_batches >= 4

    real_generate = FireboltForConditionalGeneration.generate
    calls = {"n": 0}

    def interrupting(self, *args, **kwargs):  # Ctrl-C in the middle of the run
        calls["n"] += 1
        if calls["n"] > n_batches // 2:
            raise KeyboardInterrupt
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(FireboltForConditionalGeneration, "generate", interrupting)
    out = tmp_path / "run"
    assert cli_main(eval_args(model_dir, synth, out)) == 130
    partial = lines_of(out / PREDICTIONS_FILE)
    assert len(partial) == 4 * (n_batches // 2) and not (out / SCORES_FILE).exists()
    with open(out / PREDICTIONS_FILE, "a") as f:  # killed in the middle of writing a line
        f.write('{"question_id": "test-0')
    monkeypatch.setattr(FireboltForConditionalGeneration, "generate", real_generate)

    capsys.readouterr()
    assert cli_main(eval_args(model_dir, synth, out)) == 0
    assert "== synthetic ==" in capsys.readouterr().out
    assert (out / SCORES_FILE).read_bytes() == (ref_dir / SCORES_FILE).read_bytes()
    final = lines_of(out / PREDICTIONS_FILE)
    qids = [r["question_id"] for r in final]
    assert len(qids) == len(set(qids)) == len(items)
    assert final[: len(partial)] == partial  # the done part was kept, not redone
    ref = {r["question_id"]: r["answer"] for r in lines_of(ref_dir / PREDICTIONS_FILE)}
    assert {r["question_id"]: r["answer"] for r in final} == ref


def test_compiled_eval_gives_the_same_predictions(model_dir, synth, ref_run, tmp_path, capsys):
    """`eval --compile MODE` decodes through generate(compile=MODE) and answers every question as the eager run does
    (mode "static": the static-cache layout uncompiled; the compiled modes equal it, tests/test_model.py); run.json
    records the mode; an unknown mode is one line with exit 2 before anything loads."""
    from firebolt_vl.modeling import FireboltForConditionalGeneration

    seen = []
    real_generate = FireboltForConditionalGeneration.generate
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FireboltForConditionalGeneration, "generate",
                   lambda self, *a, **kw: seen.append(kw.get("compile")) or real_generate(self, *a, **kw))
        out = tmp_path / "compiled"
        assert cli_main(eval_args(model_dir, synth, out, "--split", "test", "--compile", "static")) == 0
    assert seen and set(seen) == {"static"}
    ref = {r["question_id"]: r["answer"] for r in lines_of(ref_run[0] / PREDICTIONS_FILE)}
    assert {r["question_id"]: r["answer"] for r in lines_of(out / PREDICTIONS_FILE)} == ref
    assert json.loads((out / "run.json").read_text())["compile"] == "static"
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert cli_main(eval_args(model_dir, synth, bad, "--compile", "fast")) == 2
    assert "compile mode" in capsys.readouterr().err and not bad.exists()


def test_score_command_reproduces_score(synth, ref_run, capsys):
    out = ref_run[0]
    pred = out / PREDICTIONS_FILE
    assert cli_main(["score", "--benchmark", "synthetic", "--data", str(synth), "--predictions", str(pred)]) == 0
    printed = json.loads(capsys.readouterr().out)
    items = load_benchmark("synthetic", synth)
    assert printed == score("synthetic", items, read_predictions(pred))
    saved = json.loads((out / SCORES_FILE).read_text())
    assert saved.pop("n_errors") == 0
    assert printed == saved
    # --limit scores the first items like score() on them
    assert cli_main(["score", "--benchmark", "synthetic", "--data", str(synth), "--predictions", str(pred),
                     "--limit", "5"]) == 0
    captured = capsys.readouterr()
    partial = json.loads(captured.out)
    assert partial.pop("n_unknown_predictions") == len(items) - 5  # predictions beyond the limit are counted
    assert len(partial.pop("unknown_prediction_examples")) == 5  # and a few of them named
    assert f"warning: {len(items) - 5} predictions match no item" in captured.err
    assert partial == score("synthetic", items[:5], read_predictions(pred))


def test_eval_synthetic_writes_per_family_scores(synth, ref_run):
    out, table = ref_run
    items = load_benchmark("synthetic", synth, split="test")
    preds = lines_of(out / PREDICTIONS_FILE)
    assert sorted(r["question_id"] for r in preds) == sorted(it.question_id for it in items)
    scores = json.loads((out / SCORES_FILE).read_text())
    assert scores["n"] == len(items) and scores["n_missing"] == 0 and scores["n_errors"] == 0
    expected = {}
    for it in items:
        expected.setdefault(it.meta["family"], set()).add(it.meta["scorer"])
    assert set(scores["families"]) == set(expected)  # one scorer per family: reported under the family name
    for fam, fam_scores in scores["families"].items():
        assert {fam_scores["scorer"]} == expected[fam]
        assert ("f1" in fam_scores) == (fam_scores["scorer"] == "pope")
        assert fam in table
    assert {"vqa", "pope", "letter"} <= {s for v in expected.values() for s in v}
    assert "== synthetic ==" in table


@pytest.mark.parametrize("case", ["data", "predictions"])
def test_missing_file_is_a_one_line_error(model_dir, synth, tmp_path, capsys, case):
    missing = tmp_path / "no_such_data"
    if case == "data":
        rc = cli_main(eval_args(model_dir, missing, tmp_path / "out"))
    else:
        missing = tmp_path / "no_such_predictions.jsonl"
        rc = cli_main(["score", "--benchmark", "synthetic", "--data", str(synth), "--predictions", str(missing)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error:") and str(missing) in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_bad_image_is_recorded_not_fatal(loaded, synth, tmp_path):
    model, processor = loaded
    data = tmp_path / "data"
    shutil.copytree(synth, data)
    items = load_benchmark("synthetic", data, limit=10)
    bad = items[0].image.path
    with open(bad, "wb") as f:
        f.write(truncated_jpeg())
    n_bad = sum(it.image.path == bad for it in items)
    result = evaluate(model, processor, "synthetic", data, tmp_path / "out", limit=10, batch_size=4, max_new_tokens=2,
                      progress=False)
    assert result["n_errors"] == n_bad and result["n"] == 10
    assert json.loads((tmp_path / "out" / SCORES_FILE).read_text()) == result
    recs = {r["question_id"]: r for r in lines_of(tmp_path / "out" / PREDICTIONS_FILE)}
    assert len(recs) == 10
    for it in items:
        rec = recs[it.question_id]
        if it.image.path == bad:
            assert rec["answer"] == "" and "corrupt" in rec["error"]
        else:
            assert "error" not in rec
    # a finished run resumes to a no-op with the same scores
    again = evaluate(model, processor, "synthetic", data, tmp_path / "out", limit=10, batch_size=4, max_new_tokens=2,
                     progress=False)
    assert again == result and len(lines_of(tmp_path / "out" / PREDICTIONS_FILE)) == 10


def test_prompt_over_the_token_limit_is_recorded(loaded, synth, tmp_path, monkeypatch):
    model, processor = loaded
    items = load_benchmark("synthetic", synth)
    lengths = [processor(processor.build_prompt(it.prompt, True), images=it.load_image())["input_ids"].shape[1]
               for it in items]
    limit = sorted(lengths)[len(lengths) // 2]
    assert min(lengths) <= limit < max(lengths)
    monkeypatch.setattr(processor, "max_prompt_tokens", limit)
    result = evaluate(model, processor, "synthetic", synth, tmp_path, batch_size=8, max_new_tokens=1, progress=False)
    recs = {r["question_id"]: r for r in lines_of(tmp_path / PREDICTIONS_FILE)}
    too_long = {it.question_id for it, n in zip(items, lengths) if n > limit}
    assert {q for q, r in recs.items() if "error" in r} == too_long
    assert all("over the limit" in recs[q]["error"] and recs[q]["answer"] == "" for q in too_long)
    assert result["n_errors"] == len(too_long) and len(recs) == len(items)


def test_answers_match_direct_generation(loaded, synth, tmp_path):
    model, processor = loaded
    items = load_benchmark("synthetic", synth, limit=3)
    evaluate(model, processor, "synthetic", synth, tmp_path, limit=3, batch_size=1, max_new_tokens=4, progress=False)
    got = {r["question_id"]: r["answer"] for r in lines_of(tmp_path / PREDICTIONS_FILE)}
    for it in items:
        image = it.load_image()
        inputs = processor(processor.build_prompt(it.prompt, with_image=True), images=image)
        out = model.generate(**inputs, max_new_tokens=4)
        assert got[it.question_id] == processor.decode(out[0, inputs["input_ids"].shape[1]:]).strip()


def test_resume_refuses_another_run(loaded, synth, tmp_path):
    model, processor = loaded
    evaluate(model, processor, "synthetic", synth, tmp_path, limit=2, batch_size=2, max_new_tokens=2, progress=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        evaluate(model, processor, "synthetic", synth, tmp_path, limit=2, max_new_tokens=3, progress=False)
    param = next(model.parameters())
    saved = param.detach().clone()
    try:
        with torch.no_grad():
            param.add_(0.01)  # "trained further"
        with pytest.raises(ValueError, match="another model's weights"):
            evaluate(model, processor, "synthetic", synth, tmp_path, limit=2, max_new_tokens=2, progress=False)
    finally:
        with torch.no_grad():
            param.copy_(saved)
    res = evaluate(model, processor, "synthetic", synth, tmp_path, limit=2, max_new_tokens=3, overwrite=True,
                   progress=False)
    assert res["n"] == 2 and len(lines_of(tmp_path / PREDICTIONS_FILE)) == 2


def test_prediction_records_tolerate_a_cut_last_line(tmp_path):
    p = tmp_path / "p.jsonl"
    good = '{"question_id": 1, "answer": "a"}\n{"question_id": "2", "answer": "b", "error": "x"}\n'
    p.write_text(good + '{"question_id": 3, "ans')
    recs, valid, needs_nl = read_prediction_records(p)
    assert set(recs) == {"1", "2"} and valid == len(good.encode()) and not needs_nl
    p.write_text(good.rstrip("\n"))
    recs, valid, needs_nl = read_prediction_records(p)
    assert set(recs) == {"1", "2"} and needs_nl
    p.write_text('{"question_id": 1, "answer": "a"}\nnot json\n{"question_id": 3, "answer": "c"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2"):
        read_prediction_records(p)


def test_plan_batches_is_deterministic_and_complete():
    lengths = [5, 9, 1, 9, 3, 7, 2, 8, 6, 4]
    plan = plan_batches(lengths, batch_size=3, window=6)
    assert plan == plan_batches(list(lengths), batch_size=3, window=6)
    assert sorted(i for b in plan for i in b) == list(range(10))
    assert plan[:2] == [[1, 3, 5], [0, 4, 2]]  # window 0..5 sorted longest first, ties by position
    assert plan_batches(lengths, 4, window=1) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_eval_mode_reaches_the_scorer_and_a_bad_mode_fails_first(model_dir, tmp_path, capsys):
    """`eval --mode` scores with that reference (the same predictions as `score --mode`); an unknown mode, or a mode
    on a benchmark that has none, is one line with exit 2 before the model loads (no output folder)."""
    from PIL import Image

    data = tmp_path / "vqa"
    (data / "val2014").mkdir(parents=True)
    for q in (1, 2):
        Image.new("RGB", (48, 40), (200, 40 * q, 10)).save(data / "val2014" / f"COCO_val2014_{q:012d}.jpg")
    write_vqav2_official(data, [{"question_id": q, "image_id": q, "question": "What?"} for q in (1, 2)],
                         [vqa_annotation(q, ["x"] * 10) for q in (1, 2)])
    scores = {}
    for mode in ("evalai", "vqaeval"):
        out = tmp_path / mode
        args = ["eval", "--model", str(model_dir), "--benchmark", "vqav2", "--data", str(data), "--output", str(out),
                "--max-new-tokens", "2", "--quiet", "--mode", mode]
        assert cli_main(args) == 0
        scores[mode] = json.loads((out / SCORES_FILE).read_text())
        assert scores[mode]["mode"] == mode
        assert f"vqav2: scored in mode {mode}" in capsys.readouterr().err
        rescored = score("vqav2", load_benchmark("vqav2", data), read_predictions(out / PREDICTIONS_FILE), mode=mode)
        assert rescored["overall"] == scores[mode]["overall"]

    for bench, mode, msg in (("vqav2", "official", "unknown vqav2 mode 'official'; choose one of evalai, vqaeval"),
                             ("synthetic", "evalai",
                              "synthetic has one scorer, no modes (modes exist for vqav2, scienceqa)")):
        out = tmp_path / f"bad-{bench}"
        rc = cli_main(["eval", "--model", str(model_dir), "--benchmark", bench, "--data", str(data), "--output",
                       str(out), "--quiet", "--mode", mode])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err == f"error: {msg}" and not out.exists(), err
