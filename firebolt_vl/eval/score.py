"""Score a predictions JSONL file against a benchmark (the ``firebolt-vl score`` command).

Predictions file: one ``{"question_id": ..., "answer": "..."}`` object per line (``"prediction"`` or ``"text"`` are
accepted in place of ``"answer"``). A truncated last line -- an interrupted run -- is ignored with a warning; a
malformed line elsewhere is an error. When a question_id appears twice (``7`` and ``"7"`` are the same), the last
line wins.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Any, Dict, Optional, Sequence

from .loaders import load_benchmark
from .scorers import format_table, score

_ANSWER_KEYS = ("answer", "prediction", "text")


def read_predictions(path) -> Dict[Any, str]:
    """{question_id: answer} from a predictions JSONL file (see the module doc)."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    numbered = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip()]
    preds: Dict[str, tuple] = {}
    for pos, (lineno, line) in enumerate(numbered):
        last = pos == len(numbered) - 1
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if last:
                warnings.warn(f"{path}:{lineno}: ignoring a truncated last line ({e})")
                break
            raise ValueError(f"{path}:{lineno}: malformed predictions line ({e})") from e
        if "question_id" not in rec:
            raise ValueError(f"{path}:{lineno}: missing 'question_id'")
        key = next((k for k in _ANSWER_KEYS if k in rec), None)
        if key is None:
            raise ValueError(f"{path}:{lineno}: missing 'answer'")
        qid = rec["question_id"]
        skey = str(qid)  # 7 and "7" are the same question (scorers match ids as strings)
        preds.pop(skey, None)  # the last line wins (and takes the later place)
        preds[skey] = (qid, "" if rec[key] is None else str(rec[key]))
    return {qid: ans for qid, ans in preds.values()}


def score_predictions_file(benchmark: str, data, predictions_path, split: Optional[str] = None,
                           limit: Optional[int] = None, only_predicted: bool = False) -> dict:
    """Load ``benchmark`` from ``data`` (images stay unread), read ``predictions_path`` and score.

    ``only_predicted``: score only the items that have a prediction (a partial run); by default every item is
    scored and those without a prediction count as wrong (``n_missing``)."""
    items = load_benchmark(benchmark, data, split=split, limit=limit)
    preds = read_predictions(predictions_path)
    if only_predicted:
        keys = {str(k) for k in preds}
        items = [it for it in items if str(it.question_id) in keys]
    result = score(benchmark, items, preds)
    known = {str(it.question_id) for it in items}
    extra = sum(1 for k in preds if str(k) not in known)
    if extra:
        result["n_unknown_predictions"] = extra
    return result


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="firebolt-vl score", description=__doc__.splitlines()[0])
    p.add_argument("benchmark", help="vqav2, pope, mme, ai2d, mmmu, scienceqa, mmbench or synthetic")
    p.add_argument("--data", required=True, help="benchmark data folder or file")
    p.add_argument("--predictions", required=True, help="predictions JSONL")
    p.add_argument("--split", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--only-predicted", action="store_true", help="score only items that have a prediction")
    p.add_argument("--output", default=None, help="write the scores as JSON here")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    result = score_predictions_file(args.benchmark, args.data, args.predictions, split=args.split, limit=args.limit,
                                    only_predicted=args.only_predicted)
    print(format_table(args.benchmark, result))
    if args.output:
        tmp = args.output + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, args.output)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
