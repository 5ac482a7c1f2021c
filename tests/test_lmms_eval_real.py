"""The lmms-eval plugin under the real lmms-eval 0.7.x evaluator (not a stand-in).

lmms-eval is installed without its heavy dependencies (``pip install --no-deps lmms-eval==0.7.3`` plus the light
packages its core imports: no torchvision, no CUDA wheels). A task is defined over a small local POPE-format file; the
texts the evaluator gets from the plugin must equal what ``firebolt-vl eval`` generates for the same items. The
generations are compared, not lmms-eval's POPE / MMMU-open metrics (which are wrong)."""

import json
import textwrap

import pytest

evaluator = pytest.importorskip("lmms_eval.evaluator", reason="lmms-eval (0.7.x) is not installed: pip install "
                                                               "--no-deps lmms-eval==0.7.3 plus its light imports")
from lmms_eval.tasks import TaskManager  # noqa: E402

TASK = "firebolt_local_pope"
QUESTIONS = ["Is there a red circle in the image?", "Is there a dog in the image?",
             "Is there a green square in the image?", "Is there a circle in the image?"]


@pytest.fixture(scope="module")
def setup(tiny_factory, tmp_path_factory):
    from PIL import Image, ImageDraw

    from firebolt_vl.hub import save_model_dir

    root = tmp_path_factory.mktemp("lmms_real")
    model, processor = tiny_factory()
    model_dir = save_model_dir(model, processor, root / "model")
    data = root / "pope"
    data.mkdir()
    lines = []
    for i, (q, color) in enumerate(zip(QUESTIONS, [(220, 20, 20), (20, 200, 20), (20, 20, 220), (200, 200, 0)])):
        img = Image.new("RGB", (40 + 8 * i, 36), (240, 240, 240))
        ImageDraw.Draw(img).ellipse((6, 6, 26, 26), fill=color)
        img.save(data / f"img{i}.png")
        lines.append(json.dumps({"question_id": 100 + i, "image": f"img{i}.png", "text": q,
                                 "label": "yes" if i % 2 == 0 else "no"}))
    (data / "coco_pope_random.json").write_text("\n".join(lines) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    # doc_to_text gives the prompt `firebolt-vl eval` uses for POPE; the image is the same file
    (tasks / "utils.py").write_text(textwrap.dedent(f"""
        import os
        from PIL import Image
        from firebolt_vl.eval.prompts import short_answer_prompt

        DATA = {str(data)!r}

        def doc_to_visual(doc):
            return [Image.open(os.path.join(DATA, doc["image"])).convert("RGB")]

        def doc_to_text(doc, lmms_eval_specific_kwargs=None):
            return short_answer_prompt(doc["text"])

        def process_results(doc, results):
            return {{"exact": float(results[0].strip().lower() == doc["label"])}}
    """))
    (tasks / f"{TASK}.yaml").write_text(textwrap.dedent(f"""
        task: {TASK}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {str(data / "coco_pope_random.json")}
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: label
        generation_kwargs:
          max_new_tokens: 12
          temperature: 0
          do_sample: false
          until: ["<never-emitted-stop>"]
        process_results: !function utils.process_results
        metric_list:
          - metric: exact
            aggregation: mean
            higher_is_better: true
    """))
    return model_dir, data, tasks


def _filelock_has_api() -> bool:
    try:
        import filelock._api  # noqa: F401
    except ImportError:
        return False
    return True


def test_real_evaluator_generations_equal_firebolt_eval(setup, tmp_path, monkeypatch):
    from firebolt_vl.eval import load_benchmark
    from firebolt_vl.eval.runner import evaluate
    from firebolt_vl.hub import load_model_dir

    model_dir, data, tasks = setup
    if not _filelock_has_api():
        # lmms-eval 0.7.3's evaluator patches filelock 3.x internals (filelock._api) against nested load_dataset
        # deadlocks; filelock 4 has no such module. One local task never nests load_dataset: skip that patch.
        monkeypatch.setattr(evaluator, "_enable_reentrant_filelocks", lambda: None)
    results = evaluator.simple_evaluate(
        model="firebolt_vl", model_args=f"pretrained={model_dir},dtype=float32",
        tasks=[TASK], task_manager=TaskManager(include_path=str(tasks)), log_samples=True, device="cpu",
        batch_size=2)
    samples = results["samples"][TASK]
    assert sorted(s["doc_id"] for s in samples) == [0, 1, 2, 3]
    lmms_text = {s["doc_id"]: s["resps"][0][0] for s in samples}

    items = load_benchmark("pope", data)
    net, processor = load_model_dir(str(model_dir), "cpu", None)
    out = tmp_path / "run"
    evaluate(net, processor, "pope", data, out, batch_size=2, max_new_tokens=12, items=items, progress=False)
    ours = {}
    for line in (out / "predictions.jsonl").read_text().splitlines():
        rec = json.loads(line)
        ours[rec["question_id"]] = rec["answer"]
    assert [it.question_id for it in items] == [f"random-{100 + i}" for i in range(4)]
    assert {i: ours[f"random-{100 + i}"] for i in range(4)} == lmms_text
    assert any(t.strip() for t in lmms_text.values())  # the comparison is not between empty strings
    assert TASK in results["results"]
