"""Score a predictions file against a benchmark (the ``firebolt-vl score`` command).

Prediction files are read in the forms the official tools, LLaVA and lmms-eval write, as they are:

* JSONL, one object per line: the id under ``question_id`` (ours, LLaVA's answer files) or ``doc_id`` (lmms-eval's
  ``samples_<task>.jsonl``, whose raw generation ``resps[0][0]`` is used), the text under ``answer``,
  ``prediction`` or ``text``; an optional ``category`` / ``split`` field names the POPE split. A truncated last line
  -- an interrupted run -- is ignored with a warning; a malformed line elsewhere is an error.
* a JSON array of ``{"question_id", "answer"}`` objects (the VQAv2 / EvalAI result file);
* a folder of MME ``<subtask>.txt`` files (the eval tool's ``Your_Results``; lines
  ``image\\tquestion\\tGT\\tresponse``), or one such file;
* a ``.tsv`` with ``index`` and ``prediction`` columns (MMBench, VLMEvalKit).

Ids are matched exactly, never by position (see :func:`match_predictions`): ``7`` and ``"7"`` are the same id; an id
given twice keeps the last line (POPE refuses it: official ids repeat across the split files). No prediction matching
any item is an error (exit status 2) naming the id forms expected and seen; items without a prediction are scored as
wrong and reported (coverage), or left out with ``--only-predicted``, which says what it left out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import warnings
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .loaders import load_benchmark
from .scorers import format_table, score

_ANSWER_KEYS = ("answer", "prediction", "text")
_SPLIT_KEYS = ("category", "split")


class NoMatchingPredictions(ValueError):
    """No prediction id matches an item (the CLI exits with status 2 and this message)."""


class AmbiguousPredictions(ValueError):
    """Prediction ids that could mean several items (refused; the message says how to fix the file)."""


@dataclass
class PredictionRecord:
    """One prediction as read: ``qid`` as written (``None`` for MME result lines, matched by image and question),
    the text, extra fields (POPE ``split``, lmms-eval ``doc_id``, MME ``subtask`` / ``image`` / ``question``) and
    where it came from (``file:line``)."""

    qid: Any
    answer: str
    fields: Dict[str, Any] = field(default_factory=dict)
    where: str = ""


# ======================================================================================================
# reading
# ======================================================================================================


def _text(v) -> str:
    return "" if v is None else str(v)


def _lmms_eval_response(rec: dict) -> Optional[str]:
    """The raw generation of an lmms-eval sample record: ``resps[0][0]`` (or ``resps[0]``), else
    ``filtered_resps[0]``."""
    for key in ("resps", "filtered_resps"):
        v = rec.get(key)
        while isinstance(v, list) and v:
            v = v[0]
        if isinstance(v, str):
            return v
    return None


def _record_from_object(rec: Any, where: str) -> PredictionRecord:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: not a JSON object")
    fields: Dict[str, Any] = {}
    if "question_id" in rec:
        qid = rec["question_id"]
    elif "doc_id" in rec:
        qid = rec["doc_id"]
        fields["doc_id"] = rec["doc_id"]
    else:
        raise ValueError(f"{where}: missing 'question_id' (or lmms-eval's 'doc_id')")
    key = next((k for k in _ANSWER_KEYS if k in rec), None)
    if key is not None:
        answer = _text(rec[key])
    else:
        answer = _lmms_eval_response(rec)
        if answer is None:
            raise ValueError(f"{where}: missing 'answer' (or 'prediction', 'text', lmms-eval's 'resps')")
    for k in _SPLIT_KEYS:
        if rec.get(k) is not None and "doc_id" not in fields:
            fields["split"] = str(rec[k]).strip().lower()
            break
    return PredictionRecord(qid, answer, fields, where)


def _read_jsonl(path: str, text: str) -> List[PredictionRecord]:
    lines = text.split("\n")
    numbered = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip()]
    out = []
    for pos, (lineno, line) in enumerate(numbered):
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if pos == len(numbered) - 1:
                warnings.warn(f"{where}: ignoring a truncated last line ({e})")
                break
            raise ValueError(f"{where}: malformed predictions line ({e})") from e
        out.append(_record_from_object(rec, where))
    return out


def _read_mme_results(paths: Sequence[str]) -> List[PredictionRecord]:
    """MME eval-tool result files: ``<subtask>.txt`` with ``image\\tquestion\\tGT\\tresponse`` lines (the response is
    taken as written, minus the line end)."""
    out = []
    for p in paths:
        sub = os.path.splitext(os.path.basename(p))[0]
        with open(p, encoding="utf-8", newline="") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\n").rstrip("\r")
                if not line.strip():
                    continue
                parts = line.split("\t")
                if len(parts) != 4:
                    raise ValueError(f"{p}:{lineno}: an MME result line has 4 tab-separated fields "
                                     f"(image, question, GT, response), got {len(parts)}")
                img, question, gt, response = parts
                out.append(PredictionRecord(None, response, {"subtask": sub, "image": img, "question": question,
                                                             "gt": gt}, f"{p}:{lineno}"))
    return out


def _read_tsv(path: str) -> List[PredictionRecord]:
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))  # base64 image columns
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        cols = reader.fieldnames or []
        if "index" not in cols or "prediction" not in cols:
            raise ValueError(f"{path}: a predictions TSV needs 'index' and 'prediction' columns (has "
                             f"{', '.join(cols[:12])})")
        return [PredictionRecord(row["index"], _text(row["prediction"]), {}, f"{path}:{n + 2}")
                for n, row in enumerate(reader)]


def read_prediction_records(path) -> Tuple[List[PredictionRecord], str]:
    """(records in file order, form) from a predictions file or folder in any accepted form (module doc). Forms:
    ``jsonl``, ``json-array``, ``mme-results``, ``tsv``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        txts = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".txt"))
        if not txts:
            raise ValueError(f"{path}: a predictions folder must hold MME result files <subtask>.txt")
        return _read_mme_results(txts), "mme-results"
    if path.endswith(".txt"):
        return _read_mme_results([path]), "mme-results"
    if path.endswith(".tsv"):
        return _read_tsv(path), "tsv"
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path}: malformed JSON array of predictions ({e})") from e
        return [_record_from_object(rec, f"{path}[{i}]") for i, rec in enumerate(data)], "json-array"
    return _read_jsonl(path, text), "jsonl"


def read_predictions(path) -> Dict[Any, str]:
    """{question_id: answer} from a predictions file in any accepted form (the last of repeated ids wins; MME result
    lines are keyed ``(subtask, image, question)``). Use :func:`match_predictions` to map them onto items."""
    records, _ = read_prediction_records(path)
    preds: "OrderedDict[str, tuple]" = OrderedDict()
    for r in records:
        qid = r.qid if r.qid is not None else (r.fields["subtask"], r.fields["image"], r.fields["question"])
        skey = str(qid)
        preds.pop(skey, None)
        preds[skey] = (qid, r.answer)
    return {qid: ans for qid, ans in preds.values()}


# ======================================================================================================
# matching ids to items
# ======================================================================================================

_ID_FORMS = {
    "vqav2": "the integer VQAv2 question_id (JSONL, or the EvalAI result JSON array)",
    "pope": "'<split>-<question_id>' (e.g. 'random-1'), or the official question_id of one split file: score that "
            "split with --split, or give each line a \"category\" field",
    "mme": "'<subtask>/<image>#<k>' (k = 0, 1: the image's questions in file order), or the eval tool's "
           "Your_Results folder of <subtask>.txt files",
    "ai2d": "'row-<n>' (n = the 0-based row of the parquet split = lmms-eval's doc_id), or lmms-eval "
            "samples_<task>.jsonl records (doc_id)",
    "scienceqa": "the problem id (pid) with the official problems.json + pid_splits.json as --data; 'row-<n>' "
                 "(0-based parquet rows) or lmms-eval doc_id records with the lmms-lab parquet",
    "mmmu": "the MMMU id (e.g. 'validation_Art_Theory_1')",
    "mmbench": "the MMBench index (JSONL, or a TSV with 'index' and 'prediction' columns)",
    "synthetic": "the record's 'id'",
}


def _examples(values, n: int = 3) -> str:
    vals = list(values)
    shown = ", ".join(repr(v) for v in vals[:n])
    return shown + (f", ... ({len(vals)} in all)" if len(vals) > n else "")


def match_predictions(benchmark: str, items, records: Sequence[PredictionRecord],
                      source: str = "predictions") -> Tuple[Dict[Any, str], dict]:
    """Map prediction records onto the items' ids, exactly. Returns ({item question_id: answer}, report) where the
    report counts ``n_records``, ``n_unknown`` (records matching no item, with ``unknown_examples``) and
    ``n_repeated`` (ids given more than once; the last wins).

    * ``doc_id`` records (lmms-eval) map to ``row-<doc_id>`` (AI2D, ScienceQA parquet);
    * MME result lines map by (subtask/image, question text);
    * POPE: ``<split>-<id>``, or a bare official id with a ``split`` / ``category`` field, or a bare id that exists in
      exactly one loaded split. A bare id present in several loaded splits, or repeated in the file, is refused
      (:class:`AmbiguousPredictions`): the official ids repeat across the split files.
    """
    bench = str(benchmark).lower()
    items = list(items)
    by_key = {str(it.question_id): it for it in items}
    pope_by_source: Dict[str, List[str]] = defaultdict(list)
    mme_by_question: Dict[Tuple[str, str], List[str]] = defaultdict(list)
    if bench == "pope":
        for it in items:
            pope_by_source[str(it.meta.get("source_question_id"))].append(str(it.question_id))
    if bench == "mme":
        for it in items:
            mme_by_question[(str(it.meta.get("image_key")), str(it.meta.get("question", "")).strip())].append(
                str(it.question_id))
    mme_used: Counter = Counter()
    resolved: "OrderedDict[str, str]" = OrderedDict()
    unknown: List[Any] = []
    ambiguous: Dict[str, List[str]] = {}
    bare_seen: Counter = Counter()
    n_repeated = 0
    for r in records:
        key: Optional[str] = None
        if "doc_id" in r.fields:
            if bench not in ("ai2d", "scienceqa"):
                raise ValueError(f"{r.where}: lmms-eval doc_id records can be matched for ai2d and scienceqa (rows of "
                                 f"the lmms-lab parquet) only; write {bench} predictions keyed by question_id")
            key = f"row-{r.fields['doc_id']}"
        elif r.qid is None and "subtask" in r.fields:  # MME result line
            if bench != "mme":
                raise ValueError(f"{r.where}: MME result files score the mme benchmark only")
            cand = (f"{r.fields['subtask']}/{r.fields['image']}", r.fields["question"].strip())
            keys = mme_by_question.get(cand, [])
            k = mme_used[cand]
            mme_used[cand] += 1
            if k < len(keys):
                key = keys[k]
            else:
                unknown.append(f"{cand[0]} {cand[1]!r}")
                continue
        else:
            skey = str(r.qid)
            if bench == "pope" and "split" in r.fields and not skey.startswith(r.fields["split"] + "-"):
                key = f"{r.fields['split']}-{skey}"
            elif skey in by_key:
                key = skey
            elif bench == "pope" and skey in pope_by_source:
                bare_seen[skey] += 1
                cands = pope_by_source[skey]
                if len(cands) > 1:
                    ambiguous[skey] = cands
                    continue
                key = cands[0]
            else:
                key = skey
        if key not in by_key:
            unknown.append(r.qid if r.qid is not None else key)
            continue
        if key in resolved:
            n_repeated += 1
            resolved.pop(key)
        resolved[key] = r.answer
    if ambiguous:
        qid, cands = next(iter(ambiguous.items()))
        raise AmbiguousPredictions(
            f"{source}: {len(ambiguous)} POPE question_ids (e.g. {qid!r}) exist in several loaded splits "
            f"({', '.join(c.split('-')[0] for c in cands)}): the official ids repeat across the split files. Fix: "
            f"score one split at a time with that split's answers (--split random), add a \"category\" field "
            f"naming the split to each line, or key the lines '<split>-<question_id>' (e.g. {cands[0]!r})")
    repeated_bare = [q for q, c in bare_seen.items() if c > 1]
    if bench == "pope" and repeated_bare:
        raise AmbiguousPredictions(
            f"{source}: {len(repeated_bare)} POPE question_ids appear more than once (e.g. {repeated_bare[0]!r}): "
            f"the official ids repeat across the three split files, so one file cannot hold several splits keyed "
            f"by them. Fix: one predictions file per split (--split <name>), a \"category\" field naming the split "
            f"on each line, or ids '<split>-<question_id>'")
    preds = {by_key[k].question_id: v for k, v in resolved.items()}
    report = {"n_records": len(records), "n_unknown": len(unknown), "unknown_examples": unknown[:5],
              "n_repeated": n_repeated}
    return preds, report


# ======================================================================================================
# scoring a file
# ======================================================================================================


def score_predictions_file(benchmark: str, data, predictions_path, split: Optional[str] = None,
                           limit: Optional[int] = None, only_predicted: bool = False, mode: Optional[str] = None,
                           seed: Optional[int] = None) -> dict:
    """Load ``benchmark`` from ``data`` (images stay unread), read ``predictions_path`` (any accepted form), match the
    ids exactly and score.

    Raises :class:`NoMatchingPredictions` when no prediction matches an item (the message names the id forms
    expected and seen), :class:`AmbiguousPredictions` for POPE ids repeated across splits, and ValueError when the
    items have no ground truth here (VQAv2 test-dev, MMBench test: submit them instead).

    By default every item is scored and those without a prediction count as wrong (``n_missing``; the coverage is
    ``n_predicted`` / ``n_items``); ``only_predicted`` scores only the items that have a prediction and records the
    others in ``n_left_out`` / ``left_out_examples``. ``n_unknown_predictions`` counts predictions matching no item.
    :func:`coverage_messages` turns these into the lines the CLI prints on stderr."""
    bench = str(benchmark).lower()
    items = load_benchmark(bench, data, split=split, limit=limit)
    records, form = read_prediction_records(predictions_path)
    source = os.fspath(predictions_path)
    preds, report = match_predictions(bench, items, records, source=source)
    if items and not preds:
        seen = [r.qid if r.qid is not None else f"{r.fields.get('subtask')}/{r.fields.get('image')}"
                for r in records]
        raise NoMatchingPredictions(
            f"no prediction matches an item of {bench}: {len(records)} predictions read from {source} ({form}), "
            f"{len(items)} items loaded from {data}. Expected ids: {_ID_FORMS.get(bench, 'the question_id')}, "
            f"like {_examples([it.question_id for it in items])}; seen {_examples(seen) or 'none'}")
    left_out: List[Any] = []
    if only_predicted:
        keys = {str(k) for k in preds}
        left_out = [it.question_id for it in items if str(it.question_id) not in keys]
        items = [it for it in items if str(it.question_id) in keys]
    result = score(bench, items, preds, mode=mode, seed=seed)
    if result.get("n_unscored") and result.get("n_unscored") == len(items):
        raise ValueError(f"{bench}: the {len(items)} items loaded from {data} have no ground truth here (a test "
                         f"split scored on a server); nothing to score locally"
                         + (" -- write the EvalAI file with write_vqav2_submission" if bench == "vqav2" else ""))
    if report["n_unknown"]:
        result["n_unknown_predictions"] = report["n_unknown"]
        result["unknown_prediction_examples"] = [str(x) for x in report["unknown_examples"]]
    if report["n_repeated"]:
        result["n_repeated_ids"] = report["n_repeated"]
    if only_predicted:
        result["n_left_out"] = len(left_out)
        result["left_out_examples"] = [str(x) for x in left_out[:5]]
    return result


def coverage_messages(result: dict, only_predicted: bool = False) -> List[str]:
    """The stderr lines about coverage of a :func:`score_predictions_file` result (empty when every item has exactly
    one prediction and every prediction an item)."""
    msgs = []
    n_items, n_pred = result.get("n_items", 0), result.get("n_predicted", 0)
    if only_predicted:
        n_left = result.get("n_left_out", 0)
        msgs.append(f"--only-predicted: scored the {n_items} items that have a prediction; left out {n_left} without "
                    f"one" + (f" (e.g. {', '.join(result.get('left_out_examples', []))})" if n_left else ""))
    elif n_pred < n_items:
        msgs.append(f"warning: {n_items - n_pred} of {n_items} items have no prediction and count as wrong "
                    f"(coverage {100.0 * n_pred / n_items:.2f}%); --only-predicted scores the {n_pred} predicted "
                    f"items alone")
    if result.get("n_unknown_predictions"):
        msgs.append(f"warning: {result['n_unknown_predictions']} predictions match no item and were ignored (e.g. "
                    f"{', '.join(result.get('unknown_prediction_examples', []))})")
    if result.get("n_repeated_ids"):
        msgs.append(f"warning: {result['n_repeated_ids']} prediction ids appear more than once; the last line wins")
    return msgs


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="firebolt-vl score", description=__doc__.splitlines()[0])
    p.add_argument("benchmark", help="vqav2, pope, mme, ai2d, mmmu, scienceqa, mmbench or synthetic")
    p.add_argument("--data", required=True, help="benchmark data folder or file")
    p.add_argument("--predictions", required=True, help="predictions file or MME Your_Results folder")
    p.add_argument("--split", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--only-predicted", action="store_true", help="score only items that have a prediction")
    p.add_argument("--mode", default=None, help="vqav2: evalai (default) | vqaeval; scienceqa: llava (default) | "
                                                "official")
    p.add_argument("--seed", type=int, default=None, help="random-fallback seed (scienceqa official mode, mmmu)")
    p.add_argument("--output", default=None, help="write the scores as JSON here")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = score_predictions_file(args.benchmark, args.data, args.predictions, split=args.split,
                                        limit=args.limit, only_predicted=args.only_predicted, mode=args.mode,
                                        seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for m in coverage_messages(result, args.only_predicted):
        print(m, file=sys.stderr)
    print(format_table(args.benchmark, result))
    if args.output:
        tmp = args.output + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, args.output)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
