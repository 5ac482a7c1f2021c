"""Exact scorers of the evaluation benchmarks.

Each scorer reproduces one named reference implementation, quirks included (repository, file and commit in the
scorer's docstring; ``/work/shared/REFERENCE.md`` section 3 has the rules):

* VQAv2 -- two modes: ``evalai`` (default; Cloud-CV/VQA-Challenge, the EvalAI test-dev server's code) and ``vqaeval``
  (GT-Vision-Lab/VQA ``vqaEval.py``). They differ (see :func:`vqa_accuracy`).
* POPE -- AoiDragon/POPE ``evaluate.py`` / haotian-liu/LLaVA ``llava/eval/eval_pope.py``.
* MME -- BradyFU MME ``eval_tool/calculation.py`` (no stripping of the response).
* AI2D -- no official scorer: lmms-eval's ``ai2d`` task (``^\\s*([A-Z])\\.`` filter, exact match ignoring case and
  ``string.punctuation``).
* ScienceQA-IMG -- two modes: ``llava`` (default; LLaVA ``eval_science_qa.py`` feeding lupantech's accuracy) and
  ``official`` (lupantech/ScienceQA ``run_gpt3.py``: "The answer is X." else a seeded random choice).
* MMMU -- MMMU-Benchmark ``eval/eval_utils.py`` (multiple-choice parse with a seeded random fallback, open-answer
  parse with indicator words and numbers).
* MMBench -- VLMEvalKit circular evaluation with the rule-based (exact-matching, no judge model) letter extraction.

All accuracy-like numbers are reported in percent (0-100); counts are ints. Every result dict carries
``main_metric`` (a name) and ``main`` (its value) besides the benchmark's own keys, and the coverage:
``n_items`` (items scored), ``n_predicted`` (those with a prediction), ``coverage`` (percent); scorers with modes
also carry ``mode``.

Predictions are ``{question_id: text}``; ids are matched exactly by ``str(question_id)`` (so int 7 and "7" are the
same id), never by position. An item without a prediction is scored as the empty answer (wrong) and counted in
``n_missing``. Reading prediction files in the official tools' forms and mapping their ids onto the items is
:mod:`firebolt_vl.eval.score`'s job.
"""

from __future__ import annotations

import math
import random
import re
import string
import warnings
from collections import OrderedDict, defaultdict
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

# ======================================================================================================
# prediction lookup
# ======================================================================================================


def _prediction_lookup(predictions: Mapping[Any, Any]) -> Dict[str, str]:
    out = {}
    for k, v in predictions.items():
        out[str(k)] = "" if v is None else str(v)
    return out


def _get_prediction(lookup: Dict[str, str], qid: Any) -> Tuple[str, bool]:
    """(text, missing)."""
    key = str(qid)
    if key in lookup:
        return lookup[key], False
    return "", True


def _pct(num: float, den: float) -> float:
    return 100.0 * num / den if den else 0.0


def _mean(values: Sequence[float]) -> float:
    return float(sum(values)) / len(values) if values else 0.0


# ======================================================================================================
# VQAv2
# ======================================================================================================

_VQA_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
              "!"]
# The official pattern, including its ineffective "(?!<=\d)" (meant as a look-behind): a period not followed by a digit.
_VQA_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VQA_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_VQA_MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                   "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_ARTICLES = ("a", "an", "the")
# The official contractions table, verbatim (keys with capitals can never match lower-cased words: official quirk).
_VQA_CONTRACTIONS = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've", 'couldnt': "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", 'didnt': "didn't", 'doesnt': "doesn't",
    'dont': "don't", 'hadnt': "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", 'hasnt': "hasn't",
    'havent': "haven't", 'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've", 'hes': "he's",
    'howd': "how'd", 'howll': "how'll", 'hows': "how's", "Id've": "I'd've", "I'dve": "I'd've", 'Im': "I'm",
    'Ive': "I've", 'isnt': "isn't", 'itd': "it'd", "itd've": "it'd've", "it'dve": "it'd've", 'itll': "it'll",
    "let's": "let's", 'maam': "ma'am", 'mightnt': "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", 'mightve': "might've", 'mustnt': "mustn't", 'mustve': "must've",
    'neednt': "needn't", 'notve': "not've", 'oclock': "o'clock", 'oughtnt': "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", 'shant': "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", 'shouldve': "should've",
    'shouldnt': "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": 'somebodyd', "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    'somebodyll': "somebody'll", 'somebodys': "somebody's", 'someoned': "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", 'someonell': "someone'll",
    'someones': "someone's", 'somethingd': "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", 'somethingll': "something'll", 'thats': "that's", 'thered': "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", 'therere': "there're", 'theres': "there's",
    'theyd': "they'd", "theyd've": "they'd've", "they'dve": "they'd've", 'theyll': "they'll",
    'theyre': "they're", 'theyve': "they've", 'twas': "'twas", 'wasnt': "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", 'weve': "we've", 'werent': "weren't", 'whatll': "what'll", 'whatre': "what're",
    'whats': "what's", 'whatve': "what've", 'whens': "when's", 'whered': "where'd", 'wheres': "where's",
    'whereve': "where've", 'whod': "who'd", "whod've": "who'd've", "who'dve": "who'd've", 'wholl': "who'll",
    'whos': "who's", 'whove': "who've", 'whyll': "why'll", 'whyre': "why're", 'whys': "why's",
    'wont': "won't", 'wouldve': "would've", 'wouldnt': "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", 'yall': "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", 'youd': "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", 'youll': "you'll", 'youre': "you're", 'youve': "you've",
}


def vqa_process_punctuation(text: str) -> str:
    """Official ``processPunctuation``: each punctuation mark is deleted when it touches a space (or the text has a
    digit,digit comma), otherwise replaced by a space; then periods not followed by a digit are deleted."""
    out = text
    comma_number = _VQA_COMMA_STRIP.search(text) is not None
    for p in _VQA_PUNCT:
        if (p + " " in text or " " + p in text) or comma_number:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official call is ``periodStrip.sub("", outText, re.UNICODE)``: re.UNICODE (32) lands in ``count``.
    return _VQA_PERIOD_STRIP.sub("", out, count=32)


def vqa_process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lower-case, number words to digits, drop articles, fix contractions."""
    words = []
    for word in text.lower().split():
        word = _VQA_MANUAL_MAP.get(word, word)
        if word not in _VQA_ARTICLES:
            words.append(word)
    return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(answer: str) -> str:
    """Full VQA answer normalisation (newlines/tabs to spaces, strip, punctuation, digits/articles/contractions)."""
    text = str(answer).replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(text))


# EvalAI's challenge code (Cloud-CV/VQA-Challenge) processes punctuation with regular expressions instead.
_EVALAI_P = r"\\;/\"`\[\](){}<>@=+_\-,?!"
_EVALAI_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
_EVALAI_PUNC_STRIP = re.compile(r"(?<=[ " + _EVALAI_P + r"])([" + _EVALAI_P + r"])|([" + _EVALAI_P + r"])(?=[ "
                                + _EVALAI_P + r"])")
_EVALAI_PUNC_STRIP2 = re.compile(r"(?<=[a-zA-Z])([" + _EVALAI_P + r"])(?=[a-zA-Z])")
_EVALAI_PUNC_STRIP_BEGIN = re.compile(r"\A([ " + _EVALAI_P + r"]+)(?=[a-zA-Z0-9 ])")
_EVALAI_PUNC_STRIP_END = re.compile(r"(?<=[a-zA-Z0-9 ])([ " + _EVALAI_P + r"]+)\Z")
_EVALAI_SPACE_CLEANUP = re.compile(r"([ ]+)")

VQA_MODES = ("evalai", "vqaeval")
VQA_DEFAULT_MODE = "evalai"


def vqa_evalai_process_punctuation(text: str) -> str:
    """EvalAI challenge ``processPunctuation`` (Cloud-CV/VQA-Challenge ``PythonEvaluationTools/vqaEvaluation/
    vqaEval.py``, commit 853234efc31b74857185b06a9fdab31d990c1710): strip punctuation runs at the start and the end,
    delete digit,digit commas, replace a punctuation mark touching a space or another mark by a space, squeeze spaces,
    replace a mark between two letters by a space, then delete periods not followed by a digit (at most 32: the
    ``re.UNICODE`` passed as ``count``)."""
    out = _EVALAI_PUNC_STRIP_BEGIN.sub("", text)
    out = _EVALAI_PUNC_STRIP_END.sub("", out)
    out = _EVALAI_COMMA_STRIP.sub("", out)
    out = _EVALAI_PUNC_STRIP.sub(" ", out)
    out = _EVALAI_SPACE_CLEANUP.sub(" ", out)
    out = _EVALAI_PUNC_STRIP2.sub(" ", out)
    out = _EVALAI_PUNC_STRIP2.sub("", out)
    return _VQA_PERIOD_STRIP.sub("", out, count=32)


def _vqa_clean_ws(text) -> str:
    return str(text).replace("\n", " ").replace("\t", " ").strip()


def vqa_evalai_normalize(answer: str) -> str:
    """What the EvalAI server does to every submitted answer: whitespace clean-up, its punctuation processing, then
    number words / articles / contractions."""
    return vqa_process_digit_article(vqa_evalai_process_punctuation(_vqa_clean_ws(answer)))


def vqa_accuracy(prediction: str, gt_answers: Sequence[str], mode: str = VQA_DEFAULT_MODE) -> float:
    """VQA accuracy of one prediction in [0, 1]. For each of the N human answers *by position*, the score is
    ``min(1, #(other answers equal to the processed prediction) / 3)``; the accuracy is the mean over the N.

    ``mode="evalai"`` -- the test-dev server (Cloud-CV/VQA-Challenge ``PythonEvaluationTools/vqaEvaluation/
    vqaEval.py``, commit 853234efc31b74857185b06a9fdab31d990c1710, ``VQAEval.evaluate``): the prediction is always
    whitespace-cleaned and processed (:func:`vqa_evalai_normalize`); the ground-truth answers are taken as they are
    when all identical, else only their punctuation is processed (no number words, no articles: "ten" never equals
    "10", "an apple" never equals "apple").

    ``mode="vqaeval"`` -- GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (commit
    c4e6a0e4e84b9702d99800d3393652d92b5df224): prediction and answers are whitespace-cleaned; only when the answers are
    not all identical are both processed (:func:`vqa_process_punctuation` + :func:`vqa_process_digit_article`), so
    "Two" against ten "2" scores 0.
    """
    if not gt_answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    if mode == "evalai":
        res = vqa_evalai_normalize("" if prediction is None else prediction)
        gts = [str(a) for a in gt_answers]
        if len(set(gts)) > 1:
            gts = [vqa_evalai_process_punctuation(a) for a in gts]
    elif mode == "vqaeval":
        res = _vqa_clean_ws("" if prediction is None else prediction)
        gts = [_vqa_clean_ws(a) for a in gt_answers]
        if len(set(gts)) > 1:
            gts = [vqa_process_digit_article(vqa_process_punctuation(a)) for a in gts]
            res = vqa_process_digit_article(vqa_process_punctuation(res))
    else:
        raise ValueError(f"unknown VQAv2 mode {mode!r}; choose one of {', '.join(VQA_MODES)}")
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == res)
        accs.append(min(1.0, matches / 3.0))
    return sum(accs) / len(accs)


def score_vqav2(items, predictions, mode: str = VQA_DEFAULT_MODE) -> dict:
    """VQAv2 accuracy (percent), overall and per answer type / question type, in ``mode`` (``evalai``, the default:
    what the test-dev server computes; ``vqaeval``: GT-Vision-Lab's local evaluator; see :func:`vqa_accuracy`).

    The server's rounding of its chunk means to 2 decimals (Cloud-CV/VQA-Challenge ``main.py``) is not reproduced:
    per-question accuracies are equal, the overall may differ in the last printed digit. Items whose
    ``meta["answers"]`` is None (test-dev / test) cannot be scored locally: they are counted in ``n_unscored`` (use
    :func:`write_vqav2_submission`)."""
    if mode not in VQA_MODES:
        raise ValueError(f"unknown VQAv2 mode {mode!r}; choose one of {', '.join(VQA_MODES)}")
    lookup = _prediction_lookup(predictions)
    accs, per_at, per_qt = [], defaultdict(list), defaultdict(list)
    n_missing = n_unscored = 0
    for it in items:
        answers = it.meta.get("answers")
        if not answers:
            n_unscored += 1
            continue
        pred, missing = _get_prediction(lookup, it.question_id)
        n_missing += missing
        acc = vqa_accuracy(pred, answers, mode=mode)
        accs.append(acc)
        per_at[str(it.meta.get("answer_type") or "unknown")].append(acc)
        per_qt[str(it.meta.get("question_type") or "unknown")].append(acc)
    out = {
        "mode": mode,
        "overall": 100.0 * _mean(accs),
        "per_answer_type": {k: 100.0 * _mean(v) for k, v in sorted(per_at.items())},
        "per_question_type": {k: 100.0 * _mean(v) for k, v in sorted(per_qt.items())},
        "n": len(accs), "n_missing": n_missing, "n_unscored": n_unscored,
    }
    return _with_main(out, "overall", out["overall"])


def write_vqav2_submission(predictions: Mapping[Any, Any], path, question_ids: Optional[Iterable[Any]] = None,
                           normalize: bool = False) -> int:
    """Write the EvalAI VQAv2 result file ``[{"question_id": int, "answer": str}, ...]`` atomically (temporary file in
    the same folder, then ``os.replace``). Answers are whitespace-cleaned (newlines/tabs to spaces, stripped);
    ``normalize=True`` also applies :func:`vqa_evalai_normalize` (the server's own processing; it processes every
    answer anyway). ``firebolt-vl score vqav2 --mode evalai --predictions <this file>`` scores the file as the server
    does.

    ``question_ids``: every id the server expects (the test-dev phase wants the whole test2015 question set); the
    file then holds exactly those ids, ``""`` where there is no prediction. Returns the number of entries written. Raises ValueError on a
    non-integer id."""
    import json
    import os
    import tempfile

    def _qid(q) -> int:
        try:
            if isinstance(q, bool):
                raise ValueError
            if isinstance(q, float) and not q.is_integer():
                raise ValueError
            return int(q)
        except (TypeError, ValueError):
            raise ValueError(f"VQAv2 question_id must be an integer, got {q!r}") from None

    answers: Dict[int, str] = {}
    for q, a in predictions.items():
        text = "" if a is None else str(a).replace("\n", " ").replace("\t", " ").strip()
        answers[_qid(q)] = vqa_evalai_normalize(text) if normalize else text
    if question_ids is not None:
        ids = list(OrderedDict.fromkeys(_qid(q) for q in question_ids))
        extra = len(set(answers) - set(ids))
        if extra:
            warnings.warn(f"write_vqav2_submission: {extra} predictions are not in question_ids and were left out")
    else:
        ids = list(answers)
    entries = [{"question_id": q, "answer": answers.get(q, "")} for q in ids]
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".vqav2_submission.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entries, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return len(entries)


# ======================================================================================================
# POPE
# ======================================================================================================

POPE_SPLITS = ("random", "popular", "adversarial")


def pope_parse(text: str) -> str:
    """Official POPE answer parse: keep the text before the first '.', delete commas, split on single spaces; a word
    exactly ``No``, ``not`` or ``no`` gives "no", anything else "yes" (so "Not sure" is "yes", as officially)."""
    text = "" if text is None else str(text)
    if text.find(".") != -1:
        text = text.split(".")[0]
    text = text.replace(",", "")
    words = text.split(" ")
    if "No" in words or "not" in words or "no" in words:
        return "no"
    return "yes"


def pope_metrics(parsed_predictions: Sequence[str], labels: Sequence[str]) -> dict:
    """POPE metrics with "yes" as the positive class (a label other than "no" counts as yes, as officially).

    Returns accuracy, precision, recall, f1 and yes_ratio (share of *predicted* yes) in percent, plus TP/FP/TN/FN and n.
    A zero denominator gives 0 (the official script would divide by zero)."""
    if len(parsed_predictions) != len(labels):
        raise ValueError("predictions and labels differ in length")
    tp = fp = tn = fn = 0
    for p, l in zip(parsed_predictions, labels):
        pred_pos = p != "no"
        label_pos = str(l).strip().lower() != "no"
        if pred_pos and label_pos:
            tp += 1
        elif pred_pos:
            fp += 1
        elif not label_pos:
            tn += 1
        else:
            fn += 1
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": _pct(tp + tn, n), "precision": 100.0 * precision, "recall": 100.0 * recall, "f1": 100.0 * f1,
        "yes_ratio": _pct(tp + fp, n), "TP": tp, "FP": fp, "TN": tn, "FN": fn, "n": n,
    }


_POPE_AVG_KEYS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def _pope_by_split(rows: List[Tuple[str, str, str]]) -> dict:
    """rows: (split, parsed prediction, label) -> {"splits": {...}, "overall": mean over splits}."""
    groups: Dict[str, Tuple[list, list]] = OrderedDict()
    order = {s: i for i, s in enumerate(POPE_SPLITS)}
    for split, pred, label in sorted(rows, key=lambda r: (order.get(r[0], len(order)), r[0])):
        groups.setdefault(split, ([], []))
        groups[split][0].append(pred)
        groups[split][1].append(label)
    splits = {s: pope_metrics(p, l) for s, (p, l) in groups.items()}
    overall = {k: _mean([m[k] for m in splits.values()]) for k in _POPE_AVG_KEYS}
    overall["n"] = sum(m["n"] for m in splits.values())
    return {"overall": overall, "splits": splits}


def score_pope(items, predictions) -> dict:
    """POPE per split (``meta["split"]``) and the overall average over splits (main metric: mean F1).

    Reproduces AoiDragon/POPE ``evaluate.py`` (commit f3ec604337f1d1c9723ef8d01b4accacf8badb3d) and haotian-liu/LLaVA
    ``llava/eval/eval_pope.py`` (commit c121f0432da27facab705978f83c4ada465e46fd), one split file at a time; those
    pair answers with labels by position, here they are matched by id (see :mod:`firebolt_vl.eval.score`)."""
    lookup = _prediction_lookup(predictions)
    rows, n_missing = [], 0
    for it in items:
        pred, missing = _get_prediction(lookup, it.question_id)
        n_missing += missing
        rows.append((str(it.meta.get("split") or "all"), pope_parse(pred), str(it.meta["label"])))
    out = _pope_by_split(rows)
    out["n_missing"] = n_missing
    return _with_main(out, "overall.f1", out["overall"]["f1"])


# ======================================================================================================
# MME
# ======================================================================================================

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_parse(text: str) -> str:
    """MME parse (BradyFU/Awesome-Multimodal-Large-Language-Models ``tools/eval_tool.zip`` -> ``calculation.py``,
    commit 1c1d69e138b57cf8b0400427927bfb8ed4285458, ``parse_pred_ans``): lower-cased, exactly "yes"/"no", else
    "yes"/"no" inside the first 4 characters, else "other" (always wrong). Nothing is stripped, as officially: " yes"
    is yes (" yes" holds "yes") but "  yes" is other. (The official tool reads the response with the line's "\n";
    trailing whitespace cannot change the result, so it is not added.)"""
    p = ("" if text is None else str(text)).lower()
    if p in ("yes", "no"):
        return p
    prefix = p[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_subtask_scores(rows: Sequence[Tuple[Any, str, str]]) -> dict:
    """rows: (image key, ground truth yes/no, raw prediction) of one subtask.
    acc = % questions right; acc_plus = % images with all (both) questions right; score = acc + acc_plus."""
    per_image: Dict[Any, List[bool]] = OrderedDict()
    correct = other = 0
    for image_key, gt, pred in rows:
        gt = str(gt).strip().lower()
        if gt not in ("yes", "no"):
            raise ValueError(f"MME ground truth must be yes/no, got {gt!r}")
        parsed = mme_parse(pred)
        ok = parsed == gt
        correct += ok
        other += parsed == "other"
        per_image.setdefault(image_key, []).append(ok)
    n = len(rows)
    n_img = len(per_image)
    plus = sum(1 for v in per_image.values() if all(v))
    acc, acc_plus = _pct(correct, n), _pct(plus, n_img)
    return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "n": n, "n_images": n_img, "n_other": other}


def score_mme(items, predictions) -> dict:
    """MME (BradyFU ``eval_tool/calculation.py``, see :func:`mme_parse`): per-subtask acc / acc+ / score;
    ``perception`` = sum of the 10 perception subtask scores (max 2000),
    ``cognition`` = sum of the cognition subtasks present (max 800). Main metric: perception."""
    lookup = _prediction_lookup(predictions)
    by_cat: Dict[str, list] = defaultdict(list)
    n_missing = 0
    for it in items:
        pred, missing = _get_prediction(lookup, it.question_id)
        n_missing += missing
        cat = str(it.meta["category"])
        by_cat[cat].append((it.meta.get("image_key", it.question_id), it.meta["answer"], pred))
    known = list(MME_PERCEPTION) + list(MME_COGNITION)
    cats = [c for c in known if c in by_cat] + sorted(c for c in by_cat if c not in known)
    subtasks = {c: mme_subtask_scores(by_cat[c]) for c in cats}
    out: Dict[str, Any] = {}
    out["perception"] = sum(subtasks[c]["score"] for c in MME_PERCEPTION if c in subtasks)
    missing_p = [c for c in MME_PERCEPTION if c not in subtasks]
    if any(c in subtasks for c in MME_COGNITION):
        out["cognition"] = sum(subtasks[c]["score"] for c in MME_COGNITION if c in subtasks)
    out["subtasks"] = subtasks
    out["n"] = sum(s["n"] for s in subtasks.values())
    out["n_missing"] = n_missing
    if missing_p:
        out["perception_subtasks_missing"] = missing_p
    return _with_main(out, "perception", out["perception"])


# ======================================================================================================
# lettered multiple choice (AI2D, ScienceQA-IMG, synthetic "letter")
# ======================================================================================================

_LETTER_DOT = re.compile(r"^([A-Z])\.")
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")  # unescaped '.', as in the references: any character but "\n"


def parse_letter_answer(response: str, answer_is_fallback: bool = False) -> Optional[str]:
    """Lenient option-letter parse, used by the synthetic benchmark's ``letter`` scorer only (AI2D and ScienceQA follow
    their references: :func:`ai2d_lmms_eval_filter`, :func:`scienceqa_llava_parse`).

    * the whole response, ignoring case, whitespace and punctuation, is one letter ("b", "(B)", "B.") -> it;
    * the response starts with a capital letter followed by '.' ("B. a cat") -> that letter;
    * ``answer_is_fallback``: exactly one "The answer is X." -> X;
    * otherwise None (unparsed, wrong).
    """
    r = ("" if response is None else str(response)).strip()
    core = re.sub(r"[\W_]", "", r)
    if len(core) == 1 and core.isalpha() and core.isascii():
        return core.upper()
    m = _LETTER_DOT.match(r)
    if m:
        return m.group(1)
    if answer_is_fallback:
        found = _ANSWER_IS.findall(r)
        if len(found) == 1:
            return found[0]
    return None


# ---------------------------------------------------------------------------------------------------- AI2D

_AI2D_LETTER = re.compile(r"^\s*([A-Z])\.")
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def ai2d_lmms_eval_filter(response: str) -> str:
    """lmms-eval ``ai2d`` filter (EvolvingLMMs-Lab/lmms-eval ``lmms_eval/tasks/ai2d/utils.py``
    ``MultiChoiceRegexFilter.apply``, tag v0.7.2 = commit cb45ac4d4a667ea5ef89c7a148bff69b3489b981): a response that
    starts (after optional whitespace) with a capital letter and '.' gives that letter; otherwise the raw text."""
    text = "" if response is None else str(response)
    m = _AI2D_LETTER.match(text)
    return m.group(1) if m else text


def ai2d_exact_match(filtered: str, target: str) -> bool:
    """lmms-eval ``exact_match`` with ``ignore_case`` and ``ignore_punctuation`` (``lmms_eval/api/metrics.py``
    ``exact_match_hf_evaluate``): lower-case both, delete ``string.punctuation`` (ASCII only: "。", "（", "“" stay),
    compare exactly (spaces count: "( B )" -> " b " is wrong)."""
    return filtered.lower().translate(_PUNCT_TABLE) == str(target).lower().translate(_PUNCT_TABLE)


def score_ai2d(items, predictions) -> dict:
    """AI2D accuracy (percent) by lmms-eval's rule, the de-facto scorer (there is no official one): the
    ``flexible-extract`` filter (:func:`ai2d_lmms_eval_filter`) then exact match ignoring case and punctuation against
    the answer letter (``lmms_eval/tasks/ai2d/ai2d.yaml``, v0.7.2). ``n_unparsed``: responses the filter left as raw
    text that are not one letter after dropping case and punctuation."""
    lookup = _prediction_lookup(predictions)
    hits = []
    n_missing = n_unparsed = 0
    for it in items:
        pred, missing = _get_prediction(lookup, it.question_id)
        n_missing += missing
        filtered = ai2d_lmms_eval_filter(pred)
        core = filtered.translate(_PUNCT_TABLE)
        n_unparsed += not (len(core) == 1 and core.isalpha())
        hits.append(ai2d_exact_match(filtered, str(it.meta["answer"]).strip()))
    out: Dict[str, Any] = {"overall": 100.0 * _mean(hits), "n": len(hits), "n_unparsed": n_unparsed,
                           "n_missing": n_missing}
    return _with_main(out, "overall", out["overall"])


# ---------------------------------------------------------------------------------------------------- ScienceQA

SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")
SCIENCEQA_MODES = ("llava", "official")
SCIENCEQA_DEFAULT_MODE = "llava"
SCIENCEQA_SEED = 10


def scienceqa_llava_parse(response: str) -> Optional[str]:
    """LLaVA's ScienceQA parse (haotian-liu/LLaVA ``llava/eval/eval_science_qa.py``, commit
    c121f0432da27facab705978f83c4ada465e46fd): the response is exactly one of A-E; else it is at least 3 characters,
    starts with one of A-E and then ". "; else ``The answer is ([A-Z]).`` (unescaped '.') matches exactly once;
    else None ("FAILED"). Nothing is stripped or case-folded: "b", "(B)", "B.", "B)", "**B**", "B.dog", " B" fail;
    "The answer is C because ..." gives C."""
    text = "" if response is None else str(response)
    if text in SCIENCEQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else None


def scienceqa_official_parse(response: str) -> Optional[str]:
    """lupantech/ScienceQA ``models/run_gpt3.py`` (commit 360b71cb6a36b9e3161dc9b65e9d86458b7d13a3,
    ``get_gpt3_result``): the stripped response must hold ``The answer is ([A-Z]).`` exactly once; else None
    ("FAILED", then a random choice in :func:`score_scienceqa`). A bare "B" is FAILED."""
    text = ("" if response is None else str(response)).strip()
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else None


def score_scienceqa(items, predictions, mode: str = SCIENCEQA_DEFAULT_MODE, seed: int = SCIENCEQA_SEED) -> dict:
    """ScienceQA-IMG accuracy (percent) with a per-subject breakdown, in ``mode``:

    * ``llava`` (default; what small-VLM papers report): :func:`scienceqa_llava_parse`; a letter beyond the item's
      choices or a failed parse is index -1 (wrong) -- LLaVA's ``get_pred_idx``; the accuracy is lupantech's
      ``acc_has_image`` (``tools/evaluate_acc.py``, commit 360b71cb6a36b9e3161dc9b65e9d86458b7d13a3) over the image
      questions, an item without a prediction counting as wrong (LLaVA's "FAILED"). (LLaVA's own printed
      "IMG-Accuracy" leaves items without a prediction out; the coverage shows them.)
    * ``official``: :func:`scienceqa_official_parse`; a failed parse or a letter beyond the choices takes
      ``random.choice(range(len(choices)))`` from one ``random.Random(seed)`` (run_gpt3's ``--seed``, default 10)
      consumed in item order. (run_gpt3 also draws its few-shot examples from the same generator, so its exact draws
      depend on that run; the count of random fallbacks is reported as ``n_random_fallback``.)
    """
    if mode not in SCIENCEQA_MODES:
        raise ValueError(f"unknown ScienceQA mode {mode!r}; choose one of {', '.join(SCIENCEQA_MODES)}")
    lookup = _prediction_lookup(predictions)
    rng = random.Random(seed)
    hits, per = [], defaultdict(list)
    n_missing = n_unparsed = n_random = 0
    for it in items:
        pred, missing = _get_prediction(lookup, it.question_id)
        n_missing += missing
        n_choices = len(it.meta.get("choices") or SCIENCEQA_OPTIONS)
        valid = SCIENCEQA_OPTIONS[:n_choices]
        if mode == "llava":
            letter = scienceqa_llava_parse("FAILED" if missing else pred)
            idx = valid.index(letter) if letter in valid else -1
        else:
            letter = scienceqa_official_parse(pred)
            if letter in valid:
                idx = valid.index(letter)
            else:
                idx = rng.choice(range(n_choices))
                n_random += 1
        n_unparsed += letter is None
        gold = it.meta.get("answer_index")
        if gold is None:
            gold = SCIENCEQA_OPTIONS.index(str(it.meta["answer"]).strip().upper())
        ok = idx == int(gold)
        hits.append(ok)
        per[str(it.meta.get("subject") or "unknown")].append(ok)
    out: Dict[str, Any] = {"mode": mode, "overall": 100.0 * _mean(hits), "n": len(hits), "n_unparsed": n_unparsed,
                           "n_missing": n_missing}
    if mode == "official":
        out["seed"] = seed
        out["n_random_fallback"] = n_random
    if per:
        out["per_subject"] = {k: {"acc": 100.0 * _mean(v), "n": len(v)} for k, v in sorted(per.items())}
    return _with_main(out, "overall", out["overall"])


# ======================================================================================================
# MMMU
# ======================================================================================================

MMMU_DOMAINS = OrderedDict([
    ("Art and Design", ["Art", "Art_Theory", "Design", "Music"]),
    ("Business", ["Accounting", "Economics", "Finance", "Manage", "Marketing"]),
    ("Science", ["Biology", "Chemistry", "Geography", "Math", "Physics"]),
    ("Health and Medicine", ["Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                             "Pharmacy", "Public_Health"]),
    ("Humanities and Social Science", ["History", "Literature", "Sociology", "Psychology"]),
    ("Tech and Engineering", ["Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                              "Energy_and_Power", "Materials", "Mechanical_Engineering"]),
])
MMMU_SUBJECT_TO_DOMAIN = {s: d for d, subs in MMMU_DOMAINS.items() for s in subs}
MMMU_SEED = 42


def mmmu_subject_from_id(item_id: str) -> str:
    """``"validation_Art_Theory_12"`` -> ``"Art_Theory"`` (as the official scripts do)."""
    return "_".join(str(item_id).split("_")[1:-1])


def mmmu_choices(options: Sequence[str]) -> Tuple[Dict[str, str], List[str]]:
    """(index2ans, all_choices) for lettered options A, B, ..."""
    index2ans, all_choices = {}, []
    for i, opt in enumerate(options):
        letter = chr(ord("A") + i)
        index2ans[letter] = opt
        all_choices.append(letter)
    return index2ans, all_choices


def mmmu_parse_multi_choice(response: str, all_choices: Sequence[str], index2ans: Mapping[str, str],
                            rng: Optional[random.Random] = None) -> str:
    """MMMU ``parse_multi_choice_response``.

    Strip ``,.!?;:'`` at the ends (one character kind after another), pad with spaces; candidates are "(X)"
    matches, else " X " matches, else (response over 5 words) options whose text appears (case-insensitive). No
    candidate -> ``rng.choice(all_choices)``; several -> the one whose last occurrence is latest.

    The official module calls ``random.seed(42)`` once at import and then draws from the global generator in the
    order responses are parsed; :func:`score_mmmu` reproduces that with one ``random.Random(42)`` per scoring run,
    consumed in item order. Called alone without ``rng``, a fresh ``random.Random(42)`` is used.
    """
    if rng is None:
        rng = random.Random(MMMU_SEED)
    response = "" if response is None else str(response)
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = " " + response + " "

    index_ans = True
    ans_with_brack = False
    candidates = []
    for choice in all_choices:
        if f"({choice})" in response:
            candidates.append(choice)
            ans_with_brack = True
    if len(candidates) == 0:
        for choice in all_choices:
            if f" {choice} " in response:
                candidates.append(choice)
    if len(candidates) == 0 and len(response.split()) > 5:
        for index, ans in index2ans.items():
            if str(ans).lower() in response.lower():
                candidates.append(index)
                index_ans = False

    if len(candidates) == 0:
        return rng.choice(list(all_choices))
    if len(candidates) == 1:
        return candidates[0]
    starts = []
    for can in candidates:
        if index_ans:
            if ans_with_brack:
                starts.append(response.rfind(f"({can})"))
            else:
                starts.append(response.rfind(f" {can} "))
        else:
            starts.append(response.lower().rfind(str(index2ans[can]).lower()))
    best = max(range(len(starts)), key=lambda i: (starts[i], -i))  # np.argmax: first of the maxima
    return candidates[best]


def _mmmu_check_is_number(string: str) -> bool:
    try:
        float(string.replace(",", ""))
        return True
    except ValueError:
        return False


def mmmu_normalize_str(string: str) -> list:
    """MMMU ``normalize_str``: a number -> [float rounded to 2 places]; else lower-cased, and a single character is
    padded (``[" x", "x "]``) to avoid trivial matches."""
    string = str(string).strip()
    if _mmmu_check_is_number(string):
        return [round(float(string.replace(",", "")), 2)]
    string = string.lower()
    if len(string) == 1:
        return [" " + string, string + " "]
    return [string]


def mmmu_extract_numbers(string: str) -> list:
    """MMMU ``extract_numbers``: numbers with thousands commas, scientific notation, then simple numbers."""
    pattern_commas = r"-?\b\d{1,3}(?:,\d{3})+\b"
    pattern_scientific = r"-?\d+(?:\.\d+)?[eE][+-]?\d+"
    pattern_simple = r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"
    return re.findall(pattern_commas, string) + re.findall(pattern_scientific, string) + \
        re.findall(pattern_simple, string)


def _mmmu_key_subresponses(response: str) -> list:
    response = response.strip().strip(".").lower()
    sub_responses = re.split(r"\.\s(?=[A-Z])|\n", response)
    indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    key_responses = []
    for index, resp in enumerate(sub_responses):
        if index == len(sub_responses) - 1:
            indicators.extend(["="])
        shortest = None
        for indicator in indicators:
            if indicator in resp:
                tail = resp.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in [":", ",", ".", "!", "?", ";", ":", "'"]:
            key_responses.append(shortest)
    if len(key_responses) == 0:
        return [response]
    return key_responses


def mmmu_parse_open(response: str) -> list:
    """MMMU ``parse_open_response``: the shortest tails after indicator words (per sentence; '=' also in the last
    one), plus every number in them; all normalised (numbers to floats rounded to 2 places); duplicates removed."""
    response = "" if response is None else str(response)
    key_responses = _mmmu_key_subresponses(response)
    pred_list = list(key_responses)
    for resp in key_responses:
        pred_list.extend(mmmu_extract_numbers(resp))
    out = []
    for p in pred_list:
        out.extend(mmmu_normalize_str(p))
    # the official code returns list(set(...)); order does not matter to eval_open
    seen, uniq = set(), []
    for p in out:
        if p not in seen:
            seen.add(p)
            uniq.append(p)
    return uniq


def mmmu_eval_multi_choice(gold, pred: str) -> bool:
    if isinstance(gold, (list, tuple)):
        return any(g == pred for g in gold)
    return gold == pred


def mmmu_eval_open(gold, pred_list: Sequence) -> bool:
    """MMMU ``eval_open``: a string prediction is right when a normalised string answer is a substring of it; a
    number prediction when it equals a normalised number answer."""
    norm_answers = []
    if isinstance(gold, (list, tuple)):
        for answer in gold:
            norm_answers.extend(mmmu_normalize_str(answer))
    else:
        norm_answers = mmmu_normalize_str(gold)
    for pred in pred_list:
        if isinstance(pred, str):
            for norm_ans in norm_answers:
                if isinstance(norm_ans, str) and norm_ans in pred:
                    return True
        else:
            if pred in norm_answers:
                return True
    return False


def score_mmmu(items, predictions, seed: int = MMMU_SEED) -> dict:
    """MMMU: instance-level accuracy (percent) overall, per subject and per domain. One ``random.Random(seed)``
    serves the multiple-choice random fallbacks in item order."""
    lookup = _prediction_lookup(predictions)
    rng = random.Random(seed)
    per_subject: Dict[str, list] = defaultdict(list)
    hits = []
    n_missing = n_random = n_mc = n_open = 0
    for it in items:
        pred, missing = _get_prediction(lookup, it.question_id)
        n_missing += missing
        meta = it.meta
        if meta.get("question_type") == "multiple-choice":
            n_mc += 1
            index2ans, all_choices = mmmu_choices(meta.get("options") or [])
            if not all_choices:
                ok = False
            else:
                before = rng.getstate()
                parsed = mmmu_parse_multi_choice(pred, all_choices, index2ans, rng)
                n_random += rng.getstate() != before
                ok = mmmu_eval_multi_choice(meta["answer"], parsed)
        else:
            n_open += 1
            ok = mmmu_eval_open(meta["answer"], mmmu_parse_open(pred))
        hits.append(ok)
        per_subject[str(meta.get("subject") or "unknown")].append(ok)

    subjects = {}
    for d, subs in MMMU_DOMAINS.items():
        for s in subs:
            if s in per_subject:
                subjects[s] = {"acc": 100.0 * _mean(per_subject[s]), "n": len(per_subject[s])}
    for s in sorted(per_subject):
        if s not in subjects:
            subjects[s] = {"acc": 100.0 * _mean(per_subject[s]), "n": len(per_subject[s])}
    domains = {}
    for d, subs in MMMU_DOMAINS.items():
        vals = [v for s in subs for v in per_subject.get(s, [])]
        if vals:
            domains[d] = {"acc": 100.0 * _mean(vals), "n": len(vals)}
    out = {"overall": 100.0 * _mean(hits), "per_domain": domains, "per_subject": subjects, "n": len(hits),
           "n_multiple_choice": n_mc, "n_open": n_open, "n_random_fallback": n_random, "n_missing": n_missing}
    return _with_main(out, "overall", out["overall"])


# ======================================================================================================
# MMBench (circular evaluation, exact matching)
# ======================================================================================================

_MMBENCH_REJECT = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                   "I'm sorry, but without the image provided", "Cannot determine the answer")
_MMBENCH_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
MMBENCH_CIRCULAR_OFFSET = 1_000_000


def mmbench_infer_option(answer: str, choices: Mapping[str, str]):
    """VLMEvalKit ``can_infer_option``: after replacing ``.()[],:;!*#{}`` by spaces, exactly one option letter among
    the words and it is within the last 5 words -> it; no option letter but a word "Z" -> "Z" (a refusal, wrong);
    else "answer is X" (case-insensitive) -> X; else False. Refusal phrases give "Z"."""
    for err in _MMBENCH_REJECT:
        if err in answer:
            return "Z"
    mod = answer
    for c in ".()[],:;!*#{}":
        mod = mod.replace(c, " ")
    splits = [x.strip() for x in mod.split()]
    count = sum(1 for c in choices if c in splits)
    if count == 1:
        for ch in choices:
            if ch in splits and splits.index(ch) > (len(splits) - 5):
                return ch
    elif count == 0 and "Z" in splits:
        return "Z"
    m = _MMBENCH_VERBOSE_ANSWER.search(answer or "")
    if m and m.group(1).upper() in choices:
        return m.group(1).upper()
    return False


def mmbench_infer_text(answer: str, choices: Mapping[str, str]):
    """VLMEvalKit ``can_infer_text``: exactly one option text inside the (not overly long) answer -> its letter."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return False
    cands = [k for k, v in choices.items() if str(v).lower() in answer]
    return cands[0] if len(cands) == 1 else False


def mmbench_extract_letter(answer: str, choices: Mapping[str, str]) -> Optional[str]:
    """Rule-based (exact-matching, no judge model) letter extraction: option letter, else option text; None when
    nothing can be inferred (unparsed: scored 0)."""
    answer = "" if answer is None else str(answer)
    r = mmbench_infer_option(answer, choices)
    if not r:
        r = mmbench_infer_text(answer, dict(choices))
    return r or None


def score_mmbench(items, predictions) -> dict:
    """MMBench circular evaluation: rows are grouped by ``index % 1e6``; a group (one per main row, index < 1e6,
    present in ``items``) scores 1 only when every rotation's extracted letter equals that rotation's answer.
    Accuracy in percent overall, per category and per l2-category (of the main row); ``single_pass`` is the plain
    accuracy of the main rows alone."""
    lookup = _prediction_lookup(predictions)
    rows_by_group: Dict[int, list] = defaultdict(list)
    main_rows = OrderedDict()
    n_unparsed = n_missing = n_unscored = 0
    for it in items:
        if it.meta.get("answer") is None:  # test split: no ground truth here
            n_unscored += 1
            continue
        pred, missing = _get_prediction(lookup, it.question_id)
        n_missing += missing
        letter = mmbench_extract_letter(pred, it.meta["options"])
        n_unparsed += letter is None
        ok = letter is not None and letter == str(it.meta["answer"]).strip()
        idx = int(it.meta["index"])
        g = idx % MMBENCH_CIRCULAR_OFFSET
        rows_by_group[g].append(ok)
        if idx == g:
            main_rows[g] = (it, ok)
    group_hits, single, per_cat, per_l2 = [], [], defaultdict(list), defaultdict(list)
    for g, (it, ok_main) in main_rows.items():
        hit = all(rows_by_group[g])
        group_hits.append(hit)
        single.append(ok_main)
        per_cat[str(it.meta.get("category") or "unknown")].append(hit)
        per_l2[str(it.meta.get("l2_category") or "unknown")].append(hit)
    out = {
        "overall": 100.0 * _mean(group_hits),
        "per_l2_category": {k: {"acc": 100.0 * _mean(v), "n": len(v)} for k, v in sorted(per_l2.items())},
        "per_category": {k: {"acc": 100.0 * _mean(v), "n": len(v)} for k, v in sorted(per_cat.items())},
        "single_pass": 100.0 * _mean(single),
        "n_groups": len(group_hits), "n_rows": sum(len(v) for v in rows_by_group.values()),
        "n_unparsed": n_unparsed, "n_missing": n_missing, "n_unscored": n_unscored,
    }
    return _with_main(out, "overall", out["overall"])


# ======================================================================================================
# synthetic
# ======================================================================================================


def score_synthetic(items, predictions) -> dict:
    """Synthetic benchmark: each record names its scorer.

    * ``vqa`` -- VQA accuracy against the single answer repeated 10 times, the answer normalised first (i.e. a
      normalised exact match);
    * ``pope`` -- POPE parse and metrics (per ``pope_split``);
    * ``letter`` -- letter accuracy (:func:`parse_letter_answer`).

    Reported per family (a family mixing scorers is split as ``family/scorer``), plus ``overall`` = mean of the
    per-item correctness over all items (percent)."""
    lookup = _prediction_lookup(predictions)
    fam_scorers: Dict[str, set] = defaultdict(set)
    for it in items:
        fam_scorers[str(it.meta.get("family") or "default")].add(it.meta["scorer"])
    groups: Dict[str, list] = OrderedDict()
    all_hits = []
    n_missing = 0
    for it in items:
        pred, missing = _get_prediction(lookup, it.question_id)
        n_missing += missing
        fam = str(it.meta.get("family") or "default")
        scorer = it.meta["scorer"]
        key = fam if len(fam_scorers[fam]) == 1 else f"{fam}/{scorer}"
        answer = str(it.meta["answer"])
        if scorer == "vqa":
            val = float(vqa_normalize(pred) == vqa_normalize(answer))  # a normalised exact match
            row = val
        elif scorer == "pope":
            parsed = pope_parse(pred)
            label = pope_parse(answer)
            val = float(parsed == label)
            row = (str(it.meta.get("pope_split") or "all"), parsed, label)
        elif scorer == "letter":
            letter = parse_letter_answer(pred)
            gold = parse_letter_answer(answer) or answer.strip().upper()
            val = float(letter is not None and letter == gold)
            row = val
        else:
            raise ValueError(f"unknown synthetic scorer {scorer!r} for item {it.question_id!r}")
        groups.setdefault(key, [scorer, []])[1].append(row)
        all_hits.append(val)
    families = {}
    for key, (scorer, rows) in groups.items():
        if scorer == "pope":
            res = _pope_by_split(rows)
            fam = {"scorer": "pope"}
            fam.update(res["overall"])  # mean over pope splits (a single split: its own metrics)
            if len(res["splits"]) > 1:
                fam["splits"] = res["splits"]
        else:
            fam = {"scorer": scorer, "accuracy": 100.0 * _mean(rows), "n": len(rows)}
        families[key] = fam
    out = {"overall": 100.0 * _mean(all_hits), "families": families, "n": len(all_hits), "n_missing": n_missing}
    return _with_main(out, "overall", out["overall"])


# ======================================================================================================
# dispatch and tables
# ======================================================================================================


def _with_main(out: dict, name: str, value: float) -> dict:
    res = {"main_metric": name, "main": value}
    res.update(out)
    return res


SCORERS: Dict[str, Callable] = {
    "vqav2": score_vqav2, "pope": score_pope, "mme": score_mme, "ai2d": score_ai2d, "mmmu": score_mmmu,
    "scienceqa": score_scienceqa, "mmbench": score_mmbench, "synthetic": score_synthetic,
}


SCORER_MODES: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "vqav2": (VQA_MODES, VQA_DEFAULT_MODE), "scienceqa": (SCIENCEQA_MODES, SCIENCEQA_DEFAULT_MODE),
}


def scoring_options(name: str, mode: Optional[str] = None, seed: Optional[int] = None) -> Dict[str, Any]:
    """The scorer keyword arguments for ``mode`` / ``seed`` of benchmark ``name``; a clear error for an unknown
    benchmark, a mode the benchmark does not have, or a seed it does not use (checked before any generation)."""
    key = str(name).lower()
    if key not in SCORERS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(SCORERS)}")
    kwargs: Dict[str, Any] = {}
    if mode is not None:
        if key not in SCORER_MODES:
            raise ValueError(f"{key} has one scorer, no modes (modes exist for {', '.join(SCORER_MODES)})")
        modes = SCORER_MODES[key][0]
        if mode not in modes:
            raise ValueError(f"unknown {key} mode {mode!r}; choose one of {', '.join(modes)}")
        kwargs["mode"] = mode
    if seed is not None:
        if key not in ("scienceqa", "mmmu"):
            raise ValueError(f"{key} has no random fallback; --seed applies to scienceqa (official mode) and mmmu")
        kwargs["seed"] = int(seed)
    return kwargs


def score(name: str, items, predictions: Mapping[Any, Any], mode: Optional[str] = None,
          seed: Optional[int] = None) -> dict:
    """Score ``predictions`` ({question_id: text}) on the loaded ``items`` of benchmark ``name``. Returns a JSON-able
    dict with ``benchmark``, ``main_metric``, ``main``, the coverage (``n_items``, ``n_predicted``, ``coverage`` in
    percent) and the benchmark's own metrics (percent).

    ``mode``: the reference to reproduce where two disagree (vqav2: ``evalai`` / ``vqaeval``; scienceqa: ``llava`` /
    ``official``); None = the default. ``seed``: the random fallback's seed (scienceqa official mode, mmmu)."""
    key = str(name).lower()
    kwargs = scoring_options(key, mode, seed)
    items = list(items)
    res = SCORERS[key](items, predictions, **kwargs)
    keys = {str(k) for k in predictions}
    n_predicted = sum(1 for it in items if str(it.question_id) in keys)
    out = {"benchmark": key}
    out.update(res)
    out["n_items"] = len(items)
    out["n_predicted"] = n_predicted
    out["coverage"] = _pct(n_predicted, len(items))
    return out


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.2f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    return str(v)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _kv_lines(pairs: List[Tuple[str, Any]]) -> List[str]:
    if not pairs:
        return []
    kw = max(len(k) for k, _ in pairs)
    nw = max([len(_fmt(v)) for _, v in pairs if _is_number(v)] or [0])
    return [f"{k.ljust(kw)}  {_fmt(v).rjust(nw) if _is_number(v) else _fmt(v)}".rstrip() for k, v in pairs]


def _table_lines(rows: Mapping[str, Mapping[str, Any]]) -> List[str]:
    cols: List[str] = []
    for r in rows.values():
        for c, v in r.items():
            if not isinstance(v, Mapping) and c not in cols:
                cols.append(c)
    table = [[""] + cols] + [[str(k)] + [_fmt(r.get(c, "")) for c in cols] for k, r in rows.items()]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    out = []
    for j, row in enumerate(table):
        out.append("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                             for i, cell in enumerate(row)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def _section_lines(path: str, d: Mapping[str, Any]) -> List[str]:
    lines = ["", f"[{path}]"]
    if d and all(isinstance(v, Mapping) for v in d.values()):
        lines.extend(_table_lines(d))
        for k, row in d.items():
            for c, v in row.items():
                if isinstance(v, Mapping):
                    lines.extend(_section_lines(f"{path}.{k}.{c}", v))
        return lines
    lines.extend(_kv_lines([(str(k), v) for k, v in d.items() if not isinstance(v, Mapping)]))
    for k, v in d.items():
        if isinstance(v, Mapping):
            lines.extend(_section_lines(f"{path}.{k}", v))
    return lines


def format_table(name: str, scores: Mapping[str, Any]) -> str:
    """A plain-text table of a :func:`score` result: the main metric and the scalars first, then one section per
    breakdown (rows of a mapping of mappings become a table: MME subtasks, MMMU subjects, POPE splits, ...)."""
    lines = [f"== {name} =="]
    if "main" in scores:
        lines.append(f"main ({scores.get('main_metric')}): {_fmt(scores['main'])}")
    if "mode" in scores:
        lines.append(f"mode: {scores['mode']}")
    if "n_items" in scores:
        lines.append(f"coverage: {scores.get('n_predicted')} of {scores['n_items']} items have a prediction "
                     f"({_fmt(scores.get('coverage', 0.0))}%)")
    skip = ("benchmark", "main", "main_metric", "mode")
    lines.extend(_kv_lines([(k, v) for k, v in scores.items() if k not in skip and not isinstance(v, Mapping)]))
    for k, v in scores.items():
        if k not in skip and isinstance(v, Mapping):
            lines.extend(_section_lines(k, v))
    return "\n".join(lines)
