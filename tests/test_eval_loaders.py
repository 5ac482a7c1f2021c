"""Loader tests on tiny files written into tmp_path, one per supported layout."""

import base64
import io
import json
import pickle
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from firebolt_vl.eval import BenchmarkDataError, load_benchmark, score
from firebolt_vl.eval.prompts import LETTER_INSTRUCTION, SHORT_ANSWER_INSTRUCTION
from firebolt_vl.eval.score import main as score_main
from firebolt_vl.eval.score import read_predictions, score_predictions_file

IMG_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def png(color=RED, size=(4, 3)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def write_image(path, color=RED, size=(4, 3)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def write_parquet(path, columns, image_cols=("image",), row_group_size=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for k, v in columns.items():
        if k in image_cols:
            arrays[k] = pa.array([None if b is None else {"bytes": b, "path": None} for b in v], type=IMG_TYPE)
        else:
            arrays[k] = pa.array(v)
    pq.write_table(pa.table(arrays), str(path), row_group_size=row_group_size)


def pixel(it):
    """The test colour nearest to the image's first pixel (JPEG is lossy)."""
    p = it.load_image().getpixel((0, 0))
    return min((RED, GREEN, BLUE), key=lambda c: sum((a - b) ** 2 for a, b in zip(c, p)))


# ------------------------------------------------------------------------------------------------ VQAv2


def _vqa_answers(values):
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(values)]


def test_vqav2_lmms_parquet(tmp_path):
    write_parquet(tmp_path / "data" / "validation-00000-of-00001.parquet", {
        "question_id": [11, 12, 13], "question": ["Is it red?", "How many?", "What color?"],
        "answers": [_vqa_answers(["yes"] * 10), _vqa_answers(["2"] * 10), _vqa_answers(["blue"] * 10)],
        "answer_type": ["yes/no", "number", "other"], "question_type": ["is it", "how many", "what color"],
        "image_id": [1, 2, 3], "multiple_choice_answer": ["yes", "2", "blue"],
        "image": [png(RED), png(GREEN), png(BLUE)],
    }, row_group_size=2)
    write_parquet(tmp_path / "data" / "testdev-00000-of-00001.parquet", {
        "question_id": [99], "question": ["Why?"], "answers": pa.array([None], type=pa.list_(pa.struct(
            [("answer", pa.string()), ("answer_confidence", pa.string()), ("answer_id", pa.int64())]))),
        "image": [png()]})
    items = load_benchmark("vqav2", tmp_path)
    assert [it.question_id for it in items] == [11, 12, 13]
    assert items[0].prompt == "Is it red?\n" + SHORT_ANSWER_INSTRUCTION
    assert items[1].meta["answers"] == ["2"] * 10 and items[1].meta["answer_type"] == "number"
    assert pixel(items[2]) == BLUE and pixel(items[0]) == RED  # second row group, then back to the first
    assert pickle.loads(pickle.dumps(items[1])).load_image().getpixel((0, 0)) == GREEN
    assert len(load_benchmark("vqav2", tmp_path, limit=2)) == 2
    dev = load_benchmark("vqav2", tmp_path, split="testdev")
    assert dev[0].meta["answers"] is None
    res = score("vqav2", items + dev, {11: "Yes", 12: "two", 13: "red"})
    assert res["overall"] == pytest.approx(200 / 3) and res["n_unscored"] == 1


def _write_vqav2_official(root):
    root.mkdir(parents=True, exist_ok=True)
    qs = {"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "Is there a cat?", "question_id": 420},
        {"image_id": 42, "question": "How many cats?", "question_id": 421},
        {"image_id": 7, "question": "What color?", "question_id": 70}]}
    anns = {"annotations": [
        {"question_id": 420, "image_id": 42, "answer_type": "yes/no", "question_type": "is there",
         "multiple_choice_answer": "no", "answers": _vqa_answers(["yes", "yes"] + ["no"] * 8)},
        {"question_id": 421, "image_id": 42, "answer_type": "number", "question_type": "how many",
         "multiple_choice_answer": "2", "answers": _vqa_answers(["2"] * 10)},
        {"question_id": 70, "image_id": 7, "answer_type": "other", "question_type": "what color",
         "multiple_choice_answer": "red", "answers": _vqa_answers(["red"] * 10)}]}
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(qs))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(anns))
    write_image(root / "val2014" / "COCO_val2014_000000000042.jpg", GREEN)


def test_vqav2_official_json(tmp_path):
    _write_vqav2_official(tmp_path)
    items = load_benchmark("vqav2", tmp_path)
    assert [it.question_id for it in items] == [420, 421, 70]
    assert items[0].meta["answers"][:3] == ["yes", "yes", "no"]
    assert items[0].load_image().size == (4, 3)
    with pytest.raises(BenchmarkDataError, match="COCO_val2014_000000000007.jpg"):
        items[2].load_image()
    (tmp_path / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(BenchmarkDataError, match=r"\[vqav2\].*annotations"):
        load_benchmark("vqav2", tmp_path)


# ------------------------------------------------------------------------------------------------ POPE


def test_pope_lmms_parquet(tmp_path):
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", {
        "id": ["0", "1", "2", "3"], "question_id": ["1", "2", "1", "2"],
        "question": ["Is there a dog in the image?"] * 4, "answer": ["yes", "no", "no", "yes"],
        "image_source": ["a", "a", "b", "b"], "category": ["random", "random", "adversarial", "adversarial"],
        "image": [png()] * 4})
    items = load_benchmark("pope", tmp_path)
    assert [it.question_id for it in items] == ["random-1", "random-2", "adversarial-1", "adversarial-2"]
    assert items[0].prompt == "Is there a dog in the image?\n" + SHORT_ANSWER_INSTRUCTION
    assert [it.meta["label"] for it in items] == ["yes", "no", "no", "yes"]
    adv = load_benchmark("pope", tmp_path, split="adversarial")
    assert [it.meta["split"] for it in adv] == ["adversarial", "adversarial"]
    write_parquet(tmp_path / "bad" / "test-00000-of-00001.parquet", {
        "question_id": ["1"], "question": ["q"], "category": ["random"], "image": [png()]})
    with pytest.raises(BenchmarkDataError, match=r"\[pope\] missing column 'answer'"):
        load_benchmark("pope", tmp_path / "bad")


def test_pope_lmms_full_config(tmp_path):
    write_parquet(tmp_path / "Full" / "popular-00000-of-00001.parquet", {
        "question_id": ["5"], "question": ["Is there a car?"], "answer": ["no"], "image": [png(BLUE)]})
    items = load_benchmark("pope", tmp_path)
    assert [it.question_id for it in items] == ["popular-5"]
    assert pixel(items[0]) == BLUE


def test_pope_official_jsonl(tmp_path):
    lines = [{"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a cat in the image?",
              "label": "yes"},
             {"question_id": 2, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a bus in the image?",
              "label": "no"}]
    (tmp_path / "coco_pope_random.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (tmp_path / "coco_pope_popular.json").write_text(json.dumps(lines[0]) + "\n")
    write_image(tmp_path / "val2014" / "COCO_val2014_000000000001.jpg", GREEN)
    items = load_benchmark("pope", tmp_path)
    assert [it.question_id for it in items] == ["random-1", "random-2", "popular-1"]
    assert items[1].meta["label"] == "no" and items[1].prompt.startswith("Is there a bus in the image?\n")
    assert items[0].load_image().size == (4, 3)
    with pytest.raises(BenchmarkDataError, match="pope_adversarial"):
        load_benchmark("pope", tmp_path, split="adversarial")
    (tmp_path / "coco_pope_popular.json").write_text(json.dumps({"question_id": 1, "image": "x.jpg"}) + "\n")
    with pytest.raises(BenchmarkDataError, match="missing key 'text'"):
        load_benchmark("pope", tmp_path, split="popular")


# ------------------------------------------------------------------------------------------------ MME


def test_mme_lmms_parquet(tmp_path):
    write_parquet(tmp_path / "data" / "test-00000-of-00001-abc.parquet", {
        "question_id": ["code_reasoning/0020.png", "code_reasoning/0020.png", "10002.jpg"],
        "question": ["Is the output 3? Please answer yes or no.", "Is the output 4? Please answer yes or no.",
                     "Is this a painting? Please answer yes or no."],
        "answer": ["Yes", "No", "Yes"], "category": ["code_reasoning", "code_reasoning", "artwork"],
        "image": [png(RED), png(RED), png(GREEN)]})
    items = load_benchmark("mme", tmp_path)
    assert [it.question_id for it in items] == ["code_reasoning/0020.png#0", "code_reasoning/0020.png#1",
                                                 "artwork/10002.jpg#0"]
    assert items[0].meta["image_key"] == items[1].meta["image_key"]
    assert items[2].prompt == "Is this a painting?\n" + SHORT_ANSWER_INSTRUCTION
    res = score("mme", items, {items[0].question_id: "Yes", items[1].question_id: "No",
                               items[2].question_id: "No"})
    assert res["cognition"] == 200.0 and res["perception"] == 0.0


def test_mme_official_folders(tmp_path):
    (tmp_path / "existence").mkdir()
    write_image(tmp_path / "existence" / "000000006040.jpg", RED)
    (tmp_path / "existence" / "000000006040.txt").write_text(
        "Is there a train in this image? Please answer yes or no.\tYes\n"
        "Is there a bed in this image? Please answer yes or no.\tNo\n")
    write_image(tmp_path / "artwork" / "images" / "10002.jpg", GREEN)
    (tmp_path / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (tmp_path / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork created by A? Please answer yes or no.\tYes\r\n"
        "Is this artwork created by B? Please answer yes or no.\tNo\r\n")
    items = load_benchmark("mme", tmp_path)
    assert [it.meta["category"] for it in items] == ["existence", "existence", "artwork", "artwork"]
    assert items[0].question_id == "existence/000000006040.jpg#0"
    assert items[3].meta["answer"] == "No" and items[3].meta["image_key"] == "artwork/10002.jpg"
    assert pixel(items[0]) == RED and pixel(items[2]) == GREEN


def test_mme_eval_tool_txt(tmp_path):
    write_image(tmp_path / "count" / "5.png", BLUE)
    (tmp_path / "count.txt").write_text("5.png\tAre there two dogs? Please answer yes or no.\tYes\n"
                                        "5.png\tAre there three dogs? Please answer yes or no.\tNo\n")
    items = load_benchmark("mme", tmp_path)
    assert [it.question_id for it in items] == ["count/5.png#0", "count/5.png#1"]
    assert pixel(items[1]) == BLUE
    (tmp_path / "count.txt").write_text("5.png\tAre there two dogs?\n")
    with pytest.raises(BenchmarkDataError, match="expected 3 tab-separated fields"):
        load_benchmark("mme", tmp_path)


# ------------------------------------------------------------------------------------------------ AI2D, ScienceQA


def test_ai2d_parquet_and_missing_column(tmp_path):
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", {
        "question": ["Which stage is shown?"], "options": [["egg", "larva", "adult"]], "answer": ["1"],
        "image": [png()]})
    items = load_benchmark("ai2d", tmp_path)
    assert items[0].prompt == ("Which stage is shown?\nA. egg\nB. larva\nC. adult\n" + LETTER_INSTRUCTION)
    assert items[0].meta["answer"] == "B" and items[0].question_id == "row-0"  # lmms-eval doc_id 0, as "row-0"
    write_parquet(tmp_path / "bad" / "test-00000-of-00001.parquet", {
        "question": ["q"], "answer": ["0"], "image": [png()]})
    with pytest.raises(BenchmarkDataError) as e:
        load_benchmark("ai2d", tmp_path / "bad")
    assert "'options'" in str(e.value) and "[ai2d]" in str(e.value) and "test-00000-of-00001.parquet" in str(e.value)
    assert isinstance(e.value, ValueError)
    with pytest.raises(BenchmarkDataError, match="no parquet file for split 'validation'"):
        load_benchmark("ai2d", tmp_path, split="validation")


def test_scienceqa_img_parquet(tmp_path):
    cols = {"question": ["Which is a mammal?", "Which word is a noun?", "Which is hot?"],
            "choices": [["frog", "whale"], ["run", "cat", "blue"], ["ice", "fire"]], "answer": [1, 1, 1],
            "hint": ["", None, "Look at the picture."], "subject": ["natural science", "language science",
                                                                      "natural science"],
            "image": [png(RED), None, png(GREEN)]}
    write_parquet(tmp_path / "ScienceQA-IMG" / "test-00000-of-00001.parquet", cols)
    write_parquet(tmp_path / "ScienceQA-FULL" / "test-00000-of-00001.parquet", cols)
    items = load_benchmark("scienceqa", tmp_path)
    assert [it.question_id for it in items] == ["row-0", "row-2"]  # the imageless row is dropped
    assert items[0].prompt == "Which is a mammal?\nA. frog\nB. whale\n" + LETTER_INSTRUCTION
    assert items[1].prompt == "Context: Look at the picture.\nWhich is hot?\nA. ice\nB. fire\n" + LETTER_INSTRUCTION
    assert items[1].meta["answer"] == "B" and pixel(items[1]) == GREEN
    assert len(load_benchmark("scienceqa", tmp_path, limit=1)) == 1


def test_scienceqa_official_layout_is_keyed_by_pid(tmp_path):
    problems = {
        "5": {"question": "Which is a mammal?", "choices": ["frog", "whale"], "answer": 1, "hint": "",
              "image": "image.png", "subject": "natural science", "split": "test"},
        "7": {"question": "Which word is a noun?", "choices": ["run", "cat"], "answer": 1, "hint": "",
              "image": None, "subject": "language science", "split": "test"},
        "12": {"question": "Which is hot?", "choices": ["ice", "fire", "snow"], "answer": 1,
               "hint": "Look at the picture.", "image": "image.png", "subject": "natural science", "split": "test"},
        "20": {"question": "Train?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": "image.png",
               "split": "train"},
    }
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["12", "5", "7"], "train": ["20"]}))
    from PIL import Image
    (tmp_path / "images" / "test" / "12").mkdir(parents=True)
    Image.new("RGB", (4, 4), GREEN).save(tmp_path / "images" / "test" / "12" / "image.png")
    items = load_benchmark("scienceqa", tmp_path)
    assert [it.question_id for it in items] == ["12", "5"]  # pid_splits order; the imageless pid 7 is dropped
    assert items[0].prompt == ("Context: Look at the picture.\nWhich is hot?\nA. ice\nB. fire\nC. snow\n"
                               + LETTER_INSTRUCTION)
    assert items[0].meta["answer"] == "B" and items[0].meta["answer_index"] == 1 and pixel(items[0]) == GREEN
    assert [it.question_id for it in load_benchmark("scienceqa", tmp_path, split="train")] == ["20"]
    with pytest.raises(BenchmarkDataError, match="unknown split 'val'"):
        load_benchmark("scienceqa", tmp_path, split="val")


# ------------------------------------------------------------------------------------------------ MMMU


def test_mmmu_parquet(tmp_path):
    write_parquet(tmp_path / "data" / "validation-00000-of-00001.parquet", {
        "id": ["validation_Art_Theory_1", "validation_Math_3"],
        "question": ["Which option matches <image 2>?", "<image 1> What is x?"],
        "options": ["['a cup', 'a vase', 'a bowl']", "[]"],
        "answer": ["B", "['0.5', '1/2']"], "question_type": ["multiple-choice", "open"],
        "image_1": [png(RED), png(BLUE)], "image_2": [png(GREEN), None], "image_3": [None, None],
    }, image_cols=("image_1", "image_2", "image_3"))
    items = load_benchmark("mmmu", tmp_path)
    mc, op = items
    assert mc.question_id == "validation_Art_Theory_1" and mc.meta["subject"] == "Art_Theory"
    assert mc.prompt == "Which option matches ?\nA. a cup\nB. a vase\nC. a bowl\n\n" + LETTER_INSTRUCTION
    assert pixel(mc) == GREEN  # the only referenced image is <image 2>
    assert mc.meta["image_column"] == "image_2"
    assert op.meta["answer"] == ["0.5", "1/2"] and op.prompt == "What is x?\n\n" + SHORT_ANSWER_INSTRUCTION
    assert pixel(op) == BLUE
    res = score("mmmu", items, {"validation_Art_Theory_1": "(B)", "validation_Math_3": "x is 0.5"})
    assert res["overall"] == 100.0 and res["per_domain"]["Art and Design"]["n"] == 1


# ------------------------------------------------------------------------------------------------ MMBench


def test_mmbench_tsv_base64_and_circular_copies(tmp_path):
    b64 = base64.b64encode(png(GREEN)).decode()
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
              "l2-category", "comment", "split"]
    rows = [["1", "What is shown?", "nan", "cat", "dog", "", "", "A", "attribute", b64, "s", "FP-S", "", "dev"],
            ["2", "Which animal?", "A hint.", "fish", "bird", "cow", "", "C", "relation", b64, "s", "LR", "", "dev"],
            ["1000001", "What is shown?", "nan", "dog", "cat", "", "", "B", "attribute", "1", "s", "FP-S", "",
             "dev"]]
    f = tmp_path / "MMBench_DEV_EN.tsv"
    f.write_text("\n".join("\t".join(r) for r in [header] + rows) + "\n")
    items = load_benchmark("mmbench", tmp_path)
    assert [it.question_id for it in items] == [1, 2, 1000001]
    assert items[0].prompt == "What is shown?\nA. cat\nB. dog\n" + LETTER_INSTRUCTION
    assert items[1].prompt == "A hint.\nWhich animal?\nA. fish\nB. bird\nC. cow\n" + LETTER_INSTRUCTION
    assert items[0].meta["options"] == {"A": "cat", "B": "dog"}
    assert items[2].meta["l2_category"] == "FP-S" and pixel(items[2]) == GREEN  # image by reference to index 1
    limited = load_benchmark("mmbench", f, limit=1)
    assert [it.question_id for it in limited] == [1, 1000001]
    res = score("mmbench", items, {1: "A", 1000001: "A", 2: "C"})
    assert res["overall"] == 50.0 and res["per_category"]["relation"]["acc"] == 100.0
    (tmp_path / "MMBench_DEV_EN.tsv").write_text("index\tquestion\tA\tB\tanswer\timage\n1\tq\ta\tb\tA\txx\n")
    with pytest.raises(BenchmarkDataError, match="missing column 'category'"):
        load_benchmark("mmbench", tmp_path)


def test_mmbench_lmms_parquet(tmp_path):
    cols = {"index": [3, 1000003], "question": ["Q?", "Q?"], "hint": [None, None], "A": ["x", "y"],
            "B": ["y", "x"], "C": [None, None], "D": [None, None], "answer": ["A", "B"],
            "category": ["ocr", "ocr"], "L2-category": ["FP-C", "FP-C"], "image": [png(), png()]}
    write_parquet(tmp_path / "en" / "dev-00000-of-00001.parquet", cols)
    write_parquet(tmp_path / "cn" / "dev-00000-of-00001.parquet", cols)
    items = load_benchmark("mmbench", tmp_path)
    assert [it.question_id for it in items] == [3, 1000003]
    assert items[1].meta["options"] == {"A": "y", "B": "x"} and items[1].meta["l2_category"] == "FP-C"


# ------------------------------------------------------------------------------------------------ synthetic


def _write_synthetic(root):
    recs = [
        {"id": "s0", "image": "images/0.png", "family": "count", "scorer": "vqa",
         "conversations": [{"from": "human", "value": "<image>\nHow many squares?"}, {"from": "gpt", "value": "3"}]},
        {"id": "s1", "image": "images/0.png", "family": "exist", "scorer": "pope", "pope_split": "random",
         "conversations": [{"from": "human", "value": "<image>\nIs there a circle?"}, {"from": "gpt", "value": "No"}]},
        {"id": "s2", "image": "images/1.png", "family": "choice", "scorer": "letter",
         "conversations": [{"from": "human", "value": "<image>\nWhich color?\nA. red\nB. blue"},
                           {"from": "gpt", "value": "B"}]},
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    write_image(root / "images" / "0.png", RED)
    write_image(root / "images" / "1.png", BLUE)


def test_synthetic_jsonl(tmp_path):
    _write_synthetic(tmp_path)
    items = load_benchmark("synthetic", tmp_path)
    assert [it.question_id for it in items] == ["s0", "s1", "s2"]
    assert items[0].prompt == "How many squares?"
    assert items[2].prompt == "Which color?\nA. red\nB. blue"
    assert items[1].meta == {"answer": "No", "family": "exist", "scorer": "pope", "pope_split": "random"}
    assert pixel(items[2]) == BLUE
    assert load_benchmark("synthetic", tmp_path / "test.jsonl", limit=1)[0].question_id == "s0"
    with pytest.raises(BenchmarkDataError, match="val.jsonl"):
        load_benchmark("synthetic", tmp_path, split="val")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": "x", "conversations": []}) + "\n")
    with pytest.raises(BenchmarkDataError, match="missing key 'scorer'"):
        load_benchmark("synthetic", tmp_path, split="bad")


# ------------------------------------------------------------------------------------------------ score file


def test_score_predictions_file_vqav2_by_hand(tmp_path):
    _write_vqav2_official(tmp_path / "vqa")
    pred = tmp_path / "preds.jsonl"
    pred.write_text(
        json.dumps({"question_id": 420, "answer": "no"}) + "\n"
        + json.dumps({"question_id": 421, "answer": "Two"}) + "\n"
        + json.dumps({"question_id": 420, "answer": "Yes."}) + "\n"  # duplicate: the last wins
        + '{"question_id": 70, "ans')                                 # truncated last line: ignored
    with pytest.warns(UserWarning, match="truncated"):
        res = score_predictions_file("vqav2", tmp_path / "vqa", pred)
    # 420: 'yes' x2 among 10 -> 0.6; 421: '2' x10 -> 1; 70: no prediction -> 0
    assert abs(res["overall"] - 100 * (0.6 + 1.0 + 0.0) / 3) < 1e-9
    assert res["n_missing"] == 1
    with pytest.warns(UserWarning):
        part = score_predictions_file("vqav2", tmp_path / "vqa", pred, only_predicted=True)
    assert abs(part["overall"] - 80.0) < 1e-9


def test_score_predictions_file_synthetic_by_hand(tmp_path):
    _write_synthetic(tmp_path)
    pred = tmp_path / "p.jsonl"
    pred.write_text("\n".join(json.dumps(x) for x in [
        {"question_id": "s0", "answer": "three"}, {"question_id": "s1", "answer": "Yes, there is."},
        {"question_id": "s2", "answer": "B"}]) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = score_predictions_file("synthetic", tmp_path, pred)
    assert abs(res["overall"] - 200 / 3) < 1e-9
    assert res["families"]["exist"]["yes_ratio"] == 100.0


def test_read_predictions_errors(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"question_id": 1, "answer": "a"}\nnot json\n{"question_id": 2, "answer": "b"}\n')
    with pytest.raises(ValueError, match=":2: malformed"):
        read_predictions(p)
    p.write_text('{"question_id": 1, "answer": "a"}\n\n{"question_id": "1", "answer": null}\n')
    assert read_predictions(p) == {"1": ""}  # ids compared as strings: the last line wins


def test_score_command_main(tmp_path, capsys):
    _write_synthetic(tmp_path)
    pred = tmp_path / "p.jsonl"
    pred.write_text(json.dumps({"question_id": "s2", "answer": "B."}) + "\n")
    out = tmp_path / "scores.json"
    assert score_main(["synthetic", "--data", str(tmp_path), "--predictions", str(pred), "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert abs(res["overall"] - 100 / 3) < 1e-9 and res["n_missing"] == 2
    assert "== synthetic ==" in capsys.readouterr().out
