"""Exact scorer tests: expected values computed by hand from the official counting rules."""

import json
import math
import random

import pytest

from firebolt_vl.eval import BENCHMARKS, format_table, score
from firebolt_vl.eval.loaders import EvalItem
from firebolt_vl.eval.scorers import (
    mme_parse, mme_subtask_scores, mmbench_extract_letter, mmmu_eval_open, mmmu_extract_numbers,
    mmmu_parse_multi_choice, mmmu_parse_open, parse_letter_answer, pope_metrics, pope_parse, score_mmbench,
    score_mme, score_mmmu, score_pope, score_synthetic, score_vqav2, vqa_accuracy, vqa_normalize,
    vqa_process_punctuation, write_vqav2_submission,
)


def item(qid, **meta):
    return EvalItem(question_id=qid, image=None, prompt="q", meta=meta)


# ------------------------------------------------------------------------------------------------ VQAv2


@pytest.mark.parametrize("raw,expected", [
    ("Two.", "2"),              # period not followed by a digit dropped, number word -> digit
    ("yes.", "yes"),
    ("Yes", "yes"),
    ("1.5", "1.5"),             # period followed by a digit kept
    ("5.", "5"),
    ("10.5.", "10.5"),
    ("the cat's", "cat's"),     # article dropped; "'" is not in the punctuation list
    ("dont", "don't"),          # contractions map
    ("Thats it", "that's it"),
    ("A dog!", "dog"),          # '!' not touching a space -> replaced by a space
    ("red - white", "red white"),  # '-' touching a space -> deleted
    ("t-shirt", "t shirt"),
    ("3,000", "3000"),          # digit,digit comma -> every punctuation mark deleted
    ("none", "0"),
    ("An apple\tand\nthe pear ", "apple and pear"),
])
def test_vqa_normalize(raw, expected):
    assert vqa_normalize(raw) == expected


def test_vqa_punctuation_only_touching_space_is_deleted():
    assert vqa_process_punctuation("a/b") == "a b"
    assert vqa_process_punctuation("a / b") == "a  b"


def test_vqa_leave_one_out_by_position_with_duplicates():
    answers = ["yes", "yes"] + ["no"] * 8
    # positions holding "yes": 1 other match -> 1/3; the 8 others: 2 matches -> 2/3; mean = (2/3 + 16/3) / 10
    assert vqa_accuracy("yes", answers) == pytest.approx(0.6, abs=1e-12)
    assert vqa_accuracy("Yes.", answers) == pytest.approx(0.6, abs=1e-12)
    assert vqa_accuracy("no", answers) == pytest.approx(1.0)
    # 3 x "red": red positions 2/3 each, the 7 others 3/3 -> (2 + 7) / 10
    assert vqa_accuracy("red", ["red"] * 3 + [f"c{i}" for i in range(7)]) == pytest.approx(0.9)
    assert vqa_accuracy("blue", ["red"] * 10) == 0.0
    # one match: 9 positions see it (1/3), its own position sees none -> 3/10
    assert vqa_accuracy("two", ["2"] + ["x"] * 9) == pytest.approx(0.3)


def test_vqa_gt_normalised_only_when_answers_differ():
    # official quirk: ten identical answers are compared un-normalised against the normalised prediction
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 9 + ["shirt"]) == 1.0  # answers differ: both sides normalised
    assert vqa_accuracy("2", ["2"] * 10) == 1.0


def test_score_vqav2_answer_types_and_unscored():
    items = [
        item(1, answers=["yes", "yes"] + ["no"] * 8, answer_type="yes/no", question_type="is the"),
        item(2, answers=["2"] * 10, answer_type="number", question_type="how many"),
        item(3, answers=["red"] * 10, answer_type="other", question_type="what color"),
        item(4, answers=None, answer_type=None, question_type=None),  # test-dev: no answers
    ]
    res = score_vqav2(items, {1: "Yes", "2": "two", 3: "blue", 4: "x"})
    assert res["overall"] == pytest.approx(100 * (0.6 + 1.0 + 0.0) / 3)
    assert res["per_answer_type"] == pytest.approx({"yes/no": 60.0, "number": 100.0, "other": 0.0})
    assert res["n"] == 3 and res["n_unscored"] == 1 and res["n_missing"] == 0
    assert res["main"] == res["overall"]


def test_write_vqav2_submission(tmp_path):
    path = tmp_path / "sub" / "answers.json"
    n = write_vqav2_submission({"12": " two\n", 7: "yes"}, path, question_ids=[7, 12, 99])
    assert n == 3
    data = json.loads(path.read_text())
    assert data == [{"question_id": 7, "answer": "yes"}, {"question_id": 12, "answer": "two"},
                    {"question_id": 99, "answer": ""}]
    assert [p.name for p in path.parent.iterdir()] == ["answers.json"]  # no temp file left behind
    write_vqav2_submission({5: "Two."}, path, normalize=True)
    assert json.loads(path.read_text()) == [{"question_id": 5, "answer": "2"}]
    with pytest.raises(ValueError):
        write_vqav2_submission({"abc": "x"}, path)


# ------------------------------------------------------------------------------------------------ POPE


@pytest.mark.parametrize("text,expected", [
    ("No, there is not.", "no"),
    ("Yes. no", "yes"),             # only the text before the first '.'
    ("Not sure", "yes"),            # official: only the exact words No / no / not count ("Not" does not)
    ("I do not think so", "no"),
    ("There is no dog", "no"),
    ("NO", "yes"),                  # case-sensitive word match, as officially
    ("no.", "no"),
    ("yes", "yes"),
    ("", "yes"),
    ("Yes, there is a dog, no doubt", "no"),
])
def test_pope_parse(text, expected):
    assert pope_parse(text) == expected


def test_pope_metrics_yes_ratio_uses_predictions():
    m = pope_metrics(["yes", "no", "no", "no"], ["yes", "yes", "yes", "no"])
    # TP=1 FN=2 TN=1 FP=0
    assert (m["TP"], m["FN"], m["TN"], m["FP"]) == (1, 2, 1, 0)
    assert m["accuracy"] == pytest.approx(50.0)
    assert m["precision"] == pytest.approx(100.0)
    assert m["recall"] == pytest.approx(100 / 3)
    assert m["f1"] == pytest.approx(50.0)      # 2 * 1 * (1/3) / (4/3)
    assert m["yes_ratio"] == pytest.approx(25.0)  # 1 predicted yes of 4 (the labels are 75% yes)


def test_score_pope_per_split_and_average():
    items = [
        item("random-1", label="yes", split="random"), item("random-2", label="no", split="random"),
        item("adversarial-1", label="yes", split="adversarial"), item("adversarial-2", label="no", split="adversarial"),
    ]
    preds = {"random-1": "Yes, there is.", "random-2": "No.", "adversarial-1": "Yes", "adversarial-2": "Yes"}
    res = score_pope(items, preds)
    assert res["splits"]["random"]["accuracy"] == 100.0
    assert res["splits"]["adversarial"]["accuracy"] == 50.0
    assert res["splits"]["adversarial"]["precision"] == 50.0
    assert res["splits"]["adversarial"]["yes_ratio"] == 100.0
    # adversarial F1: p = 1/2, r = 1 -> 2/3
    assert res["splits"]["adversarial"]["f1"] == pytest.approx(200 / 3)
    assert res["overall"]["accuracy"] == pytest.approx(75.0)
    assert res["overall"]["f1"] == pytest.approx((100 + 200 / 3) / 2)
    assert res["overall"]["yes_ratio"] == pytest.approx(75.0)
    assert res["main"] == res["overall"]["f1"]
    assert list(res["splits"]) == ["random", "adversarial"]


# ------------------------------------------------------------------------------------------------ MME


@pytest.mark.parametrize("text,expected", [
    ("Yes", "yes"), ("no", "no"), ("No.", "no"), ("yes, there is", "yes"), ("Nope", "no"),
    (" no", "no"), ("There is a dog", "other"), ("The answer is yes", "other"), ("", "other"),
])
def test_mme_parse(text, expected):
    assert mme_parse(text) == expected


def test_mme_acc_plus_needs_both_right():
    rows = [("img1", "Yes", "yes"), ("img1", "No", "no"),    # both right
            ("img2", "Yes", "yes"), ("img2", "No", "yes"),   # one right
            ("img3", "Yes", "maybe"), ("img3", "No", "No")]  # "other" + right
    s = mme_subtask_scores(rows)
    assert s["acc"] == pytest.approx(100 * 4 / 6)
    assert s["acc_plus"] == pytest.approx(100 / 3)
    assert s["score"] == pytest.approx(100 * 4 / 6 + 100 / 3)
    assert s["n_other"] == 1 and s["n_images"] == 3


def test_score_mme_perception_and_cognition_sums():
    items = []
    for cat, preds in [("existence", ["yes", "no", "yes", "no"]), ("count", ["yes", "yes", "no", "no"]),
                       ("code_reasoning", ["no", "no", "no", "no"])]:
        for k, p in enumerate(preds):
            items.append(item(f"{cat}/{k // 2}.png#{k % 2}", category=cat, image_key=f"{cat}/{k // 2}.png",
                              answer=["Yes", "No"][k % 2], pred=p))
    preds = {it.question_id: it.meta["pred"] for it in items}
    res = score_mme(items, preds)
    # existence: 4/4 -> 100 + 100; count: yes,yes | no,no -> 2/4 right, no image fully right -> 50 + 0
    assert res["subtasks"]["existence"]["score"] == pytest.approx(200.0)
    assert res["subtasks"]["count"]["score"] == pytest.approx(50.0)
    assert res["perception"] == pytest.approx(250.0)
    # code_reasoning: 2/4, no image fully right
    assert res["cognition"] == pytest.approx(50.0)
    assert res["main"] == pytest.approx(250.0)
    assert "position" in res["perception_subtasks_missing"]


# ------------------------------------------------------------------------------------------------ AI2D / ScienceQA


@pytest.mark.parametrize("text,expected", [
    ("B", "B"), ("b", "B"), ("(B)", "B"), ("B.", "B"), (" C. a cat", "C"), ("cat", None),
    ("The answer is C.", None), ("", None),
])
def test_parse_letter_answer(text, expected):
    assert parse_letter_answer(text) == expected


def test_parse_letter_answer_is_fallback_scienceqa():
    assert parse_letter_answer("The answer is C.", answer_is_fallback=True) == "C"
    assert parse_letter_answer("The answer is C. The answer is D.", answer_is_fallback=True) is None


def test_score_ai2d_and_scienceqa():
    items = [item(0, answer="A"), item(1, answer="B"), item(2, answer="C"), item(3, answer="D")]
    res = score("ai2d", items, {0: "A", 1: "b.", 2: "The answer is C.", 3: "nothing"})
    assert res["overall"] == pytest.approx(50.0)
    assert res["n_unparsed"] == 2
    items = [item(0, answer="A", subject="natural science"), item(1, answer="C", subject="language science")]
    res = score("scienceqa", items, {0: "A", 1: "The answer is C."})
    assert res["overall"] == 100.0
    assert res["per_subject"]["language science"] == {"acc": 100.0, "n": 1}


# ------------------------------------------------------------------------------------------------ MMMU

CH = ["A", "B", "C", "D"]
IDX = {"A": "green pear", "B": "red apple", "C": "yellow banana", "D": "blue berry"}


@pytest.mark.parametrize("resp,expected", [
    ("(B)", "B"),
    ("B", "B"),
    (" B ", "B"),
    ("B.", "B"),                                      # ,.!?;:' stripped at the ends
    ("The answer is C", "C"),
    ("I think (A) is wrong, (C) is right", "C"),      # several bracketed -> the last
    ("A or D", "D"),                                  # several spaced letters -> the last
    ("I am fairly sure that it shows a red apple here", "B"),   # > 5 words: option text
    ("it is a green pear and not a blue berry at all", "D"),    # several texts -> last occurrence
])
def test_mmmu_parse_multi_choice(resp, expected):
    assert mmmu_parse_multi_choice(resp, CH, IDX) == expected


def test_mmmu_multi_choice_random_fallback_seeded():
    # no candidate -> random.choice after seeding with 42; the first draws of random.Random(42) over A-D: A, A, C
    assert [random.Random(42).choice(CH)] == ["A"]
    rng = random.Random(42)
    assert [mmmu_parse_multi_choice("hmm", CH, IDX, rng) for _ in range(3)] == ["A", "A", "C"]
    # short response (<= 5 words) never matches option text
    assert mmmu_parse_multi_choice("red apple", CH, IDX, random.Random(42)) == "A"


def test_mmmu_open_parse_and_eval():
    assert mmmu_parse_open("The answer is 3.14159") == [3.14]
    assert mmmu_eval_open("3.14", [3.14]) and mmmu_eval_open("3.142", [3.14])
    assert not mmmu_eval_open("3.15", [3.14])
    assert mmmu_parse_open("Therefore, the final result is Paris.") == ["paris"]
    assert mmmu_eval_open("Paris", ["paris"])
    assert set(mmmu_parse_open("The total is 1,234 dollars")) == {"1,234 dollars", 1234.0, 234.0}
    assert mmmu_eval_open("1234", mmmu_parse_open("The total is 1,234 dollars"))
    # official regexes: the simple-number pattern also picks pieces of the scientific one
    assert mmmu_extract_numbers("x = -2.5e3 and 7") == ["-2.5e3", "-2", "3", "7"]
    # last sentence may be an equation
    assert mmmu_eval_open("12", mmmu_parse_open("We add them.\nx = 12"))
    # string answers match as substrings of a string prediction; single characters are padded
    assert mmmu_eval_open(["blue", "navy"], mmmu_parse_open("the color is navy blue"))
    assert not mmmu_eval_open("a", ["ab"])


def test_score_mmmu_subjects_domains_and_seeded_run():
    mc = dict(question_type="multiple-choice", options=["p", "q", "r", "s"])
    items = [
        item("validation_Art_1", answer="A", subject="Art", **mc),   # "hmm" -> random draw A: right
        item("validation_Art_2", answer="B", subject="Art", **mc),   # "hmm" -> draw A: wrong
        item("validation_Math_1", answer="C", subject="Math", **mc),  # "hmm" -> draw C: right
        item("validation_Math_2", answer="0.5", subject="Math", question_type="open", options=[]),
        item("validation_History_1", answer="B", subject="History", **mc),
    ]
    preds = {"validation_Art_1": "hmm", "validation_Art_2": "hmm", "validation_Math_1": "hmm",
             "validation_Math_2": "so the value is 1/2 = 0.50", "validation_History_1": "(C)"}
    res = score_mmmu(items, preds)
    assert res["overall"] == pytest.approx(60.0)
    assert res["per_subject"]["Art"] == {"acc": 50.0, "n": 2}
    assert res["per_subject"]["Math"] == {"acc": 100.0, "n": 2}
    assert res["per_domain"]["Art and Design"]["acc"] == pytest.approx(50.0)
    assert res["per_domain"]["Science"]["acc"] == pytest.approx(100.0)
    assert res["per_domain"]["Humanities and Social Science"]["acc"] == 0.0
    assert res["n_random_fallback"] == 3 and res["n_open"] == 1
    assert score_mmmu(items, preds) == res  # every run reseeds


# ------------------------------------------------------------------------------------------------ MMBench


def test_mmbench_extract_letter():
    ch = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}
    assert mmbench_extract_letter("B", ch) == "B"
    assert mmbench_extract_letter("(C) bird", ch) == "C"
    assert mmbench_extract_letter("The answer is B.", ch) == "B"
    assert mmbench_extract_letter("dog", ch) == "B"                      # option text
    assert mmbench_extract_letter("I don't know", ch) is None              # unparsed
    assert mmbench_extract_letter("B or C", ch) is None                    # two letters, no option text
    # the letter must be within the last 5 words; else "answer is X" or option text
    assert mmbench_extract_letter("C is what I would choose here today honestly", ch) is None
    assert mmbench_extract_letter("Z", ch) == "Z"                           # parsed, but never right
    assert mmbench_extract_letter("Cannot determine the answer", ch) == "Z"


def test_mmbench_circular_one_wrong_rotation_scores_zero():
    def row(idx, answer, cat, l2):
        return item(idx, index=idx, answer=answer, options={"A": "cat", "B": "dog", "C": "bird"}, category=cat,
                    l2_category=l2)

    items = [row(1, "A", "c1", "L"), row(2, "B", "c1", "L"), row(3, "C", "c2", "M"),
             row(1_000_001, "B", "c1", "L"), row(2_000_001, "C", "c1", "L"),
             row(1_000_002, "C", "c1", "L"), row(1_000_003, "A", "c2", "M")]
    preds = {1: "A", 1_000_001: "B", 2_000_001: "C. bird",      # group 1: all right -> 1
             2: "B", 1_000_002: "A",                              # group 2: one wrong rotation -> 0
             3: "no idea", 1_000_003: "A"}                        # group 3: main unparsed -> 0
    res = score_mmbench(items, preds)
    assert res["overall"] == pytest.approx(100 / 3)
    assert res["n_groups"] == 3 and res["n_rows"] == 7
    assert res["n_unparsed"] == 1
    assert res["per_category"]["c1"] == {"acc": 50.0, "n": 2}
    assert res["per_category"]["c2"] == {"acc": 0.0, "n": 1}
    assert res["per_l2_category"]["L"]["acc"] == 50.0
    assert res["single_pass"] == pytest.approx(200 / 3)  # main rows alone: 1 and 2 right


# ------------------------------------------------------------------------------------------------ synthetic


def test_score_synthetic_families():
    items = [
        item("v1", family="count", scorer="vqa", answer="Two"),
        item("v2", family="count", scorer="vqa", answer="3"),
        item("p1", family="exist", scorer="pope", answer="Yes", pope_split="random"),
        item("p2", family="exist", scorer="pope", answer="No", pope_split="random"),
        item("l1", family="choice", scorer="letter", answer="B"),
    ]
    preds = {"v1": "2", "v2": "three.", "p1": "Yes", "p2": "Yes", "l1": "C"}
    res = score_synthetic(items, preds)
    assert res["families"]["count"]["accuracy"] == 100.0
    assert res["families"]["exist"]["accuracy"] == 50.0
    assert res["families"]["exist"]["yes_ratio"] == 100.0
    assert res["families"]["exist"]["f1"] == pytest.approx(200 / 3)
    assert res["families"]["choice"]["accuracy"] == 0.0
    assert res["overall"] == pytest.approx(60.0)  # 3 of 5 items right


# ------------------------------------------------------------------------------------------------ dispatch


def test_registry_and_table():
    assert set(BENCHMARKS) == {"vqav2", "pope", "mme", "ai2d", "mmmu", "scienceqa", "mmbench", "synthetic"}
    items = [item("random-1", label="yes", split="random")]
    res = score("pope", items, {})
    assert res["n_missing"] == 1 and res["benchmark"] == "pope"
    json.dumps(res)
    table = format_table("pope", res)
    assert "f1" in table and "random" in table
    with pytest.raises(KeyError):
        score("nope", items, {})
    mme = score_mme([item("existence/1.png#0", category="existence", image_key="1", answer="yes")], {})
    assert "existence" in format_table("mme", mme)
    assert not math.isnan(mme["perception"])
