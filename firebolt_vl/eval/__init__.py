"""Evaluation subsystem: benchmark loaders, prompts and exact scorers.

Typical use (the generation loop lives elsewhere)::

    from firebolt_vl.eval import load_benchmark, score, format_table
    items = load_benchmark("pope", "/data/POPE", split="random", limit=100)
    preds = {it.question_id: model_answer(it.load_image(), it.prompt) for it in items}
    result = score("pope", items, preds)
    print(format_table("pope", result))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from .loaders import (BenchmarkDataError, BytesImage, EvalItem, FileImage, FirstImage, ImageRef, LOADERS,
                      ParquetImage, load_benchmark)
from .scorers import SCORERS, format_table, write_vqav2_submission


@dataclass(frozen=True)
class BenchmarkSpec:
    """Registry entry of a benchmark."""

    name: str
    description: str
    default_split: Optional[str]
    splits: Tuple[str, ...]
    main_metric: str
    loader: Callable
    scorer: Callable


BENCHMARKS = {
    "vqav2": BenchmarkSpec("vqav2", "VQAv2 open-ended VQA accuracy (%); modes evalai (default) / vqaeval",
                           "validation / val2014",
                           ("validation", "testdev", "test", "val2014", "test-dev2015"), "overall",
                           LOADERS["vqav2"], SCORERS["vqav2"]),
    "pope": BenchmarkSpec("pope", "POPE object hallucination, yes/no (% metrics, mean over splits)", None,
                          ("random", "popular", "adversarial"), "overall.f1", LOADERS["pope"], SCORERS["pope"]),
    "mme": BenchmarkSpec("mme", "MME yes/no; perception score (max 2000), cognition (max 800)", "test", ("test",),
                         "perception", LOADERS["mme"], SCORERS["mme"]),
    "ai2d": BenchmarkSpec("ai2d", "AI2D diagrams, accuracy (%), lmms-eval's rule", "test", ("test",), "overall",
                          LOADERS["ai2d"], SCORERS["ai2d"]),
    "mmmu": BenchmarkSpec("mmmu", "MMMU (validation), accuracy (%)", "validation", ("validation", "dev", "test"),
                          "overall", LOADERS["mmmu"], SCORERS["mmmu"]),
    "scienceqa": BenchmarkSpec("scienceqa", "ScienceQA-IMG, accuracy (%); modes llava (default) / official", "test",
                               ("test", "validation", "train"), "overall", LOADERS["scienceqa"],
                               SCORERS["scienceqa"]),
    "mmbench": BenchmarkSpec("mmbench", "MMBench (en) circular evaluation, accuracy (%)", "dev", ("dev", "test"),
                             "overall", LOADERS["mmbench"], SCORERS["mmbench"]),
    "synthetic": BenchmarkSpec("synthetic", "Synthetic families (vqa / pope / letter scorers)", "test",
                               ("test", "val"), "overall", LOADERS["synthetic"], SCORERS["synthetic"]),
}

from .score import (  # noqa: E402
    AmbiguousPredictions, NoMatchingPredictions, match_predictions, read_prediction_records, read_predictions,
    score_predictions_file,
)
from .scorers import score  # noqa: E402,F811  (importing the ``score`` submodule rebinds the package attribute)

__all__ = [
    "BENCHMARKS", "BenchmarkSpec", "BenchmarkDataError", "EvalItem", "ImageRef", "FileImage", "BytesImage",
    "ParquetImage", "FirstImage", "load_benchmark", "score", "format_table", "write_vqav2_submission",
    "read_predictions", "score_predictions_file", "read_prediction_records", "match_predictions",
    "NoMatchingPredictions", "AmbiguousPredictions",
]
