"""Issue 17: the scorers against their named references, the official id forms, the refusals and the coverage.

Every expected value is computed by hand from the reference's code (cited in the scorer docstrings); no downloaded
data: the benchmark files are written here in the official layouts."""

import json
import random

import pytest

from firebolt_vl.cli import main as cli_main
from firebolt_vl.eval import score
from firebolt_vl.eval.loaders import EvalItem
from firebolt_vl.eval.score import AmbiguousPredictions, NoMatchingPredictions, score_predictions_file
from firebolt_vl.eval.scorers import (
    ai2d_lmms_eval_filter, mme_parse, scienceqa_llava_parse, scienceqa_official_parse, vqa_accuracy,
    vqa_evalai_normalize, vqa_evalai_process_punctuation, write_vqav2_submission,
)
from firebolt_vl.testing import vqa_annotation, write_vqav2_official


def item(qid, **meta):
    return EvalItem(question_id=qid, image=None, prompt="q", meta=meta)


# ------------------------------------------------------------------------------------------------ VQAv2 modes


def test_vqaeval_leaves_the_prediction_alone_when_the_answers_agree():
    # GT-Vision-Lab: ten identical answers -> no processing on either side: "Two" != "2"
    assert vqa_accuracy("Two", ["2"] * 10, mode="vqaeval") == 0.0
    assert vqa_accuracy(" 2\n", ["2"] * 10, mode="vqaeval") == 1.0  # only whitespace is cleaned
    # EvalAI always processes the prediction: "Two" -> "2"
    assert vqa_accuracy("Two", ["2"] * 10, mode="evalai") == 1.0


def test_evalai_processes_ground_truth_punctuation_only():
    # answers differ -> EvalAI processes their punctuation only: "ten" stays "ten", the prediction becomes "10"
    answers = ["ten"] * 3 + ["x"] * 7
    assert vqa_accuracy("ten", answers, mode="evalai") == 0.0
    # vqaeval normalises both sides: 3 x "10"; positions holding it see 2 others (2/3), the 7 others see 3 -> 0.9
    assert vqa_accuracy("ten", answers, mode="vqaeval") == pytest.approx(0.9)
    answers = ["an apple"] * 3 + ["pear"] * 7
    assert vqa_accuracy("an apple", answers, mode="evalai") == 0.0  # "apple" != "an apple"
    assert vqa_accuracy("an apple", answers, mode="vqaeval") == pytest.approx(0.9)
    assert vqa_accuracy("apple!", ["apple!"] * 3 + ["pear"] * 7, mode="evalai") == pytest.approx(0.9)


@pytest.mark.parametrize("raw,expected", [
    ("(hello), world!", "hello world"),  # leading "(" and trailing "!" stripped; ")," touching -> spaces, squeezed
    ("t-shirt", "t shirt"),              # a mark between letters -> space
    ("3,000", "3000"),                   # digit,digit comma deleted
    ("yes.", "yes"),                     # period not followed by a digit deleted
    ("1.5", "1.5"),
])
def test_evalai_punctuation(raw, expected):
    assert vqa_evalai_process_punctuation(raw) == expected


def test_vqav2_mode_in_result_and_bad_mode():
    items = [item(1, answers=["2"] * 10, answer_type="number", question_type="how many")]
    assert score("vqav2", items, {1: "Two"})["mode"] == "evalai"  # the default: the test-dev server
    res = score("vqav2", items, {1: "Two"}, mode="vqaeval")
    assert res["mode"] == "vqaeval" and res["overall"] == 0.0
    with pytest.raises(ValueError, match="evalai, vqaeval"):
        score("vqav2", items, {1: "Two"}, mode="official")
    with pytest.raises(ValueError, match="no modes"):
        score("pope", [], {}, mode="evalai")


def test_vqav2_result_array_scores_as_the_server(tmp_path, recwarn):
    write_vqav2_official(tmp_path, [{"question_id": q, "image_id": q, "question": "?"} for q in (1, 2, 3)],
                  [vqa_annotation(1, ["2"] * 10, "number"), vqa_annotation(2, ["ten"] * 3 + ["x"] * 7), vqa_annotation(3, ["red"] * 10)])
    raw = {1: "Two.\n", 2: "ten", 3: " Red "}
    sub = tmp_path / "vqav2_submission.json"
    assert write_vqav2_submission(raw, sub) == 3
    assert json.loads(sub.read_text())[0] == {"question_id": 1, "answer": "Two."}  # whitespace-cleaned only
    res = score_predictions_file("vqav2", tmp_path, sub, mode="evalai")
    # evalai by hand: "Two." -> "2" (1.0); "ten" -> "10" vs "ten" x3 (0); "Red" -> "red" (1.0)
    assert res["overall"] == pytest.approx(100 * 2 / 3)
    assert not [w for w in recwarn if "truncated" in str(w.message)]  # read as one JSON array
    # the file and the raw predictions score the same (what the server sees is what we scored)
    items = [item(1, answers=["2"] * 10), item(2, answers=["ten"] * 3 + ["x"] * 7), item(3, answers=["red"] * 10)]
    assert score("vqav2", items, raw, mode="evalai")["overall"] == pytest.approx(res["overall"])
    # normalize=True writes the server's own processing; the server processing it again changes nothing here
    write_vqav2_submission(raw, sub, normalize=True)
    assert [e["answer"] for e in json.loads(sub.read_text())] == ["2", "10", "red"]
    assert score_predictions_file("vqav2", tmp_path, sub)["overall"] == pytest.approx(100 * 2 / 3)
    # vqaeval: "Two." vs ten "2" -> 0 (raw compare), "ten" -> 0.9, " Red " -> "Red" != "red" -> 0
    raw_file = tmp_path / "raw.json"
    write_vqav2_submission(raw, raw_file)
    assert score_predictions_file("vqav2", tmp_path, raw_file, mode="vqaeval")["overall"] == pytest.approx(30.0)
    assert vqa_evalai_normalize(" an Apple\t") == "apple"


# ------------------------------------------------------------------------------------------------ ScienceQA


@pytest.mark.parametrize("text,expected", [
    ("A", "A"), ("B. dog", "B"), ("The answer is C because it is hot", "C"), ("The answer is D.", "D"),
    ("b", None), ("(B)", None), ("**B**", None), ("B)", None), ("B.dog", None), ("B.", None), (" B", None),
    ("The answer is A. The answer is B.", None),  # two matches -> FAILED
    ("F", None),                                   # only A-E are bare options
    ("The answer is F.", "F"),                     # the regex takes any capital; beyond the choices it is wrong
    ("The answer is B", None),                     # the unescaped '.' needs a character after the letter
])
def test_scienceqa_llava_parse(text, expected):
    assert scienceqa_llava_parse(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("The answer is B.", "B"), (" The answer is B. ", "B"), ("B", None), ("B. dog", None),
    ("The answer is B ", None),  # stripped first: nothing after the letter
])
def test_scienceqa_official_parse(text, expected):
    assert scienceqa_official_parse(text) == expected


def _sqa_items():
    return [item(f"p{i}", answer="B", answer_index=1, choices=["x", "y", "z"], subject="natural science")
            for i in range(10)]


def test_scienceqa_adversarial_answers_llava_mode():
    items = _sqa_items()
    answers = ["b", "(B)", "**B**", "B)", "B.dog", "B", "B. y", "The answer is B because", "The answer is D.", ""]
    res = score("scienceqa", items, {it.question_id: a for it, a in zip(items, answers)})
    # right: "B", "B. y", "The answer is B because" -> 3 of 10; "D" is beyond 3 choices (-1)
    assert res["mode"] == "llava" and res["overall"] == pytest.approx(30.0)
    assert res["n_unparsed"] == 6  # the five lenient forms and ""


def test_scienceqa_official_mode_random_fallback():
    items = _sqa_items()
    answers = ["B", "The answer is B.", "The answer is A.", "x", "The answer is D."] + ["B"] * 5
    preds = {it.question_id: a for it, a in zip(items, answers)}
    res = score("scienceqa", items, preds, mode="official", seed=3)
    rng = random.Random(3)
    draws = [rng.choice(range(3)) for _ in range(8)]  # items 0, 3, 4 (D is beyond 3 choices) and 5..9 fall back
    expected = 1 + sum(d == 1 for d in draws)  # item 1 is right, item 2 wrong
    assert res["n_random_fallback"] == 8 and res["seed"] == 3
    assert res["overall"] == pytest.approx(100 * expected / 10)


def _sqa_official(root):
    problems = {str(p): {"question": f"Q{p}?", "choices": ["a", "b", "c"], "answer": p % 3, "hint": "",
                         "image": "image.png", "subject": "natural science", "split": "test"}
                for p in (5, 9, 14)}
    problems["2"] = {"question": "text only", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None,
                     "split": "test"}
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"test": ["2", "5", "9", "14"]}))


def test_scienceqa_llava_answer_file_keyed_by_pid(tmp_path):
    _sqa_official(tmp_path)
    # LLaVA's answer file: question_id = pid; answers: pid 5 -> index 2 (C), 9 -> 0 (A), 14 -> 2 (C)
    lines = [{"question_id": "5", "prompt": "<image>\nQ5?", "text": "C"},
             {"question_id": "9", "prompt": "<image>\nQ9?", "text": "B"},
             {"question_id": "14", "prompt": "<image>\nQ14?", "text": "The answer is C."}]
    f = tmp_path / "answers.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines))
    res = score_predictions_file("scienceqa", tmp_path, f)
    assert res["n_items"] == 3 and res["n_predicted"] == 3
    assert res["overall"] == pytest.approx(100 * 2 / 3)  # pid 9 wrong; pid "5" is pid 5, not row 5


# ------------------------------------------------------------------------------------------------ AI2D


@pytest.mark.parametrize("text,right", [
    ("B", True), ("b", True), ("(B)", True), ("B.", True), (" B. larva", True), ("**B**", True), ("B!", True),
    ("( B )", False), ("B )", False), ("B。", False), ("（B）", False), ("“B”", False), ("B is right", False),
    ("A. B", False),
])
def test_ai2d_lmms_eval_rule(text, right):
    res = score("ai2d", [item("row-0", answer="B", options=["a", "b", "c"])], {"row-0": text})
    assert res["overall"] == (100.0 if right else 0.0)


def test_ai2d_filter():
    assert ai2d_lmms_eval_filter("  C. cat") == "C" and ai2d_lmms_eval_filter("c. cat") == "c. cat"


def _ai2d_parquet(root, n=3):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, "PNG")
    img = pa.array([{"bytes": buf.getvalue(), "path": None}] * n,
                   type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    (root / "data").mkdir(parents=True)
    pq.write_table(pa.table({"question": [f"q{i}" for i in range(n)], "options": [["a", "b", "c"]] * n,
                             "answer": [str(i % 3) for i in range(n)], "image": img}),
                   str(root / "data" / "test-00000-of-00001.parquet"))


def test_ai2d_one_based_ids_are_refused_and_lmms_eval_samples_accepted(tmp_path, capsys):
    _ai2d_parquet(tmp_path)
    one_based = tmp_path / "p1.jsonl"  # rows 0, 1, 2 have answers A, B, C; keyed 1..3 they would all shift
    one_based.write_text("\n".join(json.dumps({"question_id": i + 1, "answer": "ABC"[i]}) for i in range(3)))
    assert cli_main(["score", "--benchmark", "ai2d", "--data", str(tmp_path), "--predictions", str(one_based)]) == 2
    err = capsys.readouterr().err
    assert "no prediction matches" in err and "'row-0'" in err and "seen 1, 2, 3" in err
    samples = tmp_path / "samples_ai2d.jsonl"  # lmms-eval's log: doc_id + resps
    samples.write_text("\n".join(json.dumps({"doc_id": i, "target": "ABC"[i], "resps": [["ABC"[i] if i else "C"]],
                                             "filtered_resps": ["x"]}) for i in range(3)))
    res = score_predictions_file("ai2d", tmp_path, samples)
    assert res["overall"] == pytest.approx(100 * 2 / 3) and res["coverage"] == 100.0


# ------------------------------------------------------------------------------------------------ MME


@pytest.mark.parametrize("text,expected", [
    (" yes", "yes"), ("  yes", "other"), (" no", "no"), ("\tyes", "yes"), ("\n\nno", "no"), ("   no", "other"),
    ("Yes", "yes"),
])
def test_mme_does_not_strip(text, expected):
    # the first 4 characters as given: "  yes"[:4] == "  ye" holds neither word
    assert mme_parse(text) == expected


def test_mme_your_results_folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "existence.txt").write_text("1.jpg\tIs there a cat?\tYes\n1.jpg\tIs there a dog?\tNo\n"
                                        "2.jpg\tIs there a car?\tYes\n2.jpg\tIs there a bus?\tNo\n")
    (data / "existence").mkdir()
    res_dir = tmp_path / "Your_Results"
    res_dir.mkdir()
    # lines in another order than the data; matched by image and question, not position
    (res_dir / "existence.txt").write_text("2.jpg\tIs there a bus?\tNo\tno\n1.jpg\tIs there a dog?\tNo\tNo\n"
                                           "1.jpg\tIs there a cat?\tYes\t  yes\n2.jpg\tIs there a car?\tYes\tYes\n")
    res = score_predictions_file("mme", data, res_dir)
    # 1.jpg: "  yes" is other (wrong), "No" right; 2.jpg: both right -> acc 75, acc+ 50
    assert res["subtasks"]["existence"]["acc"] == pytest.approx(75.0)
    assert res["subtasks"]["existence"]["acc_plus"] == pytest.approx(50.0)
    assert res["n_predicted"] == 4


# ------------------------------------------------------------------------------------------------ POPE ids


def _pope(root, splits=("random",), n=4):
    for s in splits:
        (root / f"coco_pope_{s}.json").write_text("\n".join(json.dumps(
            {"question_id": q, "image": f"{q}.jpg", "text": f"Is there a {s}?", "label": "yes" if q % 2 else "no"})
            for q in range(n)))


def test_pope_official_ids_of_one_split_file(tmp_path):
    _pope(tmp_path)
    f = tmp_path / "answers.jsonl"  # keyed like the label file: question_id 0..3
    f.write_text("\n".join(json.dumps({"question_id": q, "text": "Yes" if q % 2 else "No"}) for q in range(4)))
    res = score_predictions_file("pope", tmp_path / "coco_pope_random.json", f)
    assert res["n_predicted"] == 4 and res["overall"]["accuracy"] == 100.0


def test_pope_ids_repeating_across_splits_are_refused(tmp_path, capsys):
    _pope(tmp_path, ("random", "popular", "adversarial"))
    f = tmp_path / "answers.jsonl"
    f.write_text("\n".join(json.dumps({"question_id": q, "text": "Yes"}) for _ in range(3) for q in range(4)))
    with pytest.raises(AmbiguousPredictions, match="category"):
        score_predictions_file("pope", tmp_path, f)
    # one split loaded, the three splits' answers in one file: the repeated ids are refused too
    with pytest.raises(AmbiguousPredictions, match="more than once"):
        score_predictions_file("pope", tmp_path, f, split="random")
    assert cli_main(["score", "--benchmark", "pope", "--data", str(tmp_path), "--predictions", str(f)]) == 2
    assert "--split random" in capsys.readouterr().err
    # a category field names the split: accepted
    cat = tmp_path / "answers_cat.jsonl"
    cat.write_text("\n".join(json.dumps({"question_id": q, "category": s, "text": "Yes" if q % 2 else "No"})
                             for s in ("random", "popular", "adversarial") for q in range(4)))
    res = score_predictions_file("pope", tmp_path, cat)
    assert res["n_predicted"] == 12 and res["overall"]["f1"] == 100.0


# ------------------------------------------------------------------------------------------------ no silent number


def test_no_matching_prediction_exits_2_and_names_the_forms(tmp_path, capsys):
    _pope(tmp_path)
    f = tmp_path / "answers.jsonl"
    f.write_text("\n".join(json.dumps({"question_id": f"q{q}", "text": "Yes"}) for q in range(4)))
    with pytest.raises(NoMatchingPredictions):
        score_predictions_file("pope", tmp_path, f)
    assert cli_main(["score", "--benchmark", "pope", "--data", str(tmp_path), "--predictions", str(f)]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and "'random-0'" in cap.err and "'q0'" in cap.err and "--split" in cap.err


def test_coverage_is_reported_and_only_predicted_says_what_it_left_out(tmp_path, capsys):
    _pope(tmp_path)
    f = tmp_path / "answers.jsonl"
    f.write_text("\n".join(json.dumps({"question_id": f"random-{q}", "text": "Yes" if q % 2 else "No"})
                           for q in (0, 1, 2)) + "\n" + json.dumps({"question_id": "random-99", "text": "No"}))
    args = ["score", "--benchmark", "pope", "--data", str(tmp_path), "--predictions", str(f), "--table"]
    assert cli_main(args) == 0
    cap = capsys.readouterr()
    assert "1 of 4 items have no prediction" in cap.err and "coverage 75.00%" in cap.err
    assert "1 predictions match no item" in cap.err and "random-99" in cap.err
    assert "coverage: 3 of 4 items have a prediction (75.00%)" in cap.out
    assert cli_main(args + ["--only-predicted"]) == 0
    cap = capsys.readouterr()
    assert "left out 1 without one (e.g. random-3)" in cap.err
    assert "coverage: 3 of 3 items" in cap.out and "n_left_out" in cap.out


def test_mmbench_tsv_prediction_column(tmp_path):
    import csv

    from firebolt_vl.eval.score import read_prediction_records

    f = tmp_path / "pred.tsv"
    with open(f, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(["index", "question", "A", "B", "answer", "prediction"])
        w.writerow([3, "q", "cat", "dog", "B", "B"])
        w.writerow([1000003, "q", "dog", "cat", "A", "The answer is A"])
    records, form = read_prediction_records(f)
    assert form == "tsv" and [(r.qid, r.answer) for r in records] == [("3", "B"), ("1000003", "The answer is A")]
    items = [item(3, index=3, answer="B", options={"A": "cat", "B": "dog"}),
             item(1000003, index=1000003, answer="A", options={"A": "dog", "B": "cat"})]
    from firebolt_vl.eval.score import match_predictions
    preds, report = match_predictions("mmbench", items, records)
    assert score("mmbench", items, preds)["overall"] == 100.0 and report["n_unknown"] == 0
