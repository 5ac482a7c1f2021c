"""`firebolt-vl eval` (generate + score, resumable) and `firebolt-vl score` (score a predictions file)."""

from __future__ import annotations

import json
import os
import sys

BENCHMARK_CHOICES = ("vqav2", "pope", "mme", "ai2d", "mmmu", "scienceqa", "mmbench", "synthetic")


MODE_HELP = ("the reference to reproduce: vqav2 evalai (default; the test-dev server) or vqaeval (GT-Vision-Lab); "
             "scienceqa llava (default) or official (lupantech, random fallback)")
SEED_HELP = "seed of the random fallback (scienceqa --mode official: 10; mmmu: 42)"


def add_eval_command_arguments(p):
    from ..quantize import add_quantize_argument
    from ..static_decoding import add_compile_argument

    p.add_argument("--model", required=True, help="Firebolt-VL model directory")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory applied on top of --model")
    p.add_argument("--benchmark", required=True, choices=BENCHMARK_CHOICES)
    p.add_argument("--data", required=True, help="benchmark data folder or file (see firebolt_vl.eval.loaders)")
    p.add_argument("--split", default=None, help="benchmark split (default: the benchmark's own)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N items only")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="answer length limit (default 32)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: as saved)")
    add_quantize_argument(p)
    add_compile_argument(p, "with --batch-size 1 over many questions")
    p.add_argument("--output", required=True, help="folder for predictions.jsonl, scores.json and run.json")
    p.add_argument("--overwrite", action="store_true",
                   help="discard earlier predictions in --output instead of resuming")
    p.add_argument("--mode", default=None, help=MODE_HELP)
    p.add_argument("--seed", type=int, default=None, help=SEED_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def eval_command(
    model: str,
    benchmark: str,
    data: str,
    output: str,
    split: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    device: str = "auto",
    dtype: str | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    adapter: str | None = None,
    quantize: str | None = None,
    mode: str | None = None,
    seed: int | None = None,
    compile: str | None = None,
) -> int:
    """Evaluate a model directory on a benchmark; predictions and scores go to `output`, the table to stdout."""
    from ..hub import check_model_dir, load_model_dir, parse_dtype, resolve_device
    from . import load_benchmark
    from .runner import DEFAULT_MAX_NEW_TOKENS, evaluate
    from ..static_decoding import check_compile_mode
    from .scorers import format_table, scoring_options

    if compile is not None:
        check_compile_mode(compile)
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    if os.path.exists(output) and not os.path.isdir(output):
        raise NotADirectoryError(f"--output is not a folder: {output}")
    check_model_dir(model)  # cheap checks first: model folder, scoring options and data fail before any loading
    scoring_options(benchmark, mode, seed)
    items = load_benchmark(benchmark, data, split=split, limit=limit)
    dev = resolve_device(device)
    net, processor = load_model_dir(model, dev, parse_dtype(dtype), adapter=adapter, quantize=quantize)
    model_id = os.path.abspath(model) + (f"+{os.path.abspath(adapter)}" if adapter else "")
    result = evaluate(net, processor, benchmark, data, output, split=split, limit=limit, batch_size=batch_size,
                      max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS, items=items,
                      model_id=model_id, overwrite=overwrite, progress=not quiet, mode=mode, seed=seed,
                      compile=compile)
    if "mode" in result:
        print(f"{benchmark}: scored in mode {result['mode']}", file=sys.stderr)
    print(format_table(benchmark, result))
    print(f"\npredictions: {os.path.join(output, 'predictions.jsonl')}\nscores: {os.path.join(output, 'scores.json')}")
    return 0


def add_score_command_arguments(p):
    p.add_argument("--benchmark", required=True, choices=BENCHMARK_CHOICES)
    p.add_argument("--data", required=True, help="benchmark data folder or file")
    p.add_argument("--predictions", required=True,
                   help='predictions: JSONL ({"question_id", "answer"} per line; LLaVA answer files; lmms-eval '
                        'samples with doc_id), a JSON array (VQAv2 result file), an MME Your_Results folder, or a '
                        'TSV with index and prediction columns (MMBench)')
    p.add_argument("--split", default=None)
    p.add_argument("--limit", type=int, default=None, help="score the first N items only")
    p.add_argument("--only-predicted", action="store_true",
                   help="score only items that have a prediction (a partial run); by default missing ones are wrong")
    p.add_argument("--mode", default=None, help=MODE_HELP)
    p.add_argument("--seed", type=int, default=None, help=SEED_HELP)
    p.add_argument("--table", action="store_true", help="print a readable table instead of JSON")


def score_command(
    benchmark: str,
    data: str,
    predictions: str,
    split: str | None = None,
    limit: int | None = None,
    only_predicted: bool = False,
    mode: str | None = None,
    seed: int | None = None,
    table: bool = False,
) -> int:
    """Score a predictions file against a benchmark and print the scores (JSON, or a table with --table).

    Coverage warnings go to stderr; no matching prediction at all is an error (exit status 2)."""
    from .score import coverage_messages, score_predictions_file
    from .scorers import format_table

    if not os.path.exists(predictions):
        raise FileNotFoundError(f"predictions file not found: {predictions}")
    result = score_predictions_file(benchmark, data, predictions, split=split, limit=limit,
                                    only_predicted=only_predicted, mode=mode, seed=seed)
    for msg in coverage_messages(result, only_predicted):
        print(msg, file=sys.stderr)
    if "mode" in result:
        print(f"{benchmark}: scored in mode {result['mode']}", file=sys.stderr)
    if table:
        print(format_table(benchmark, result))
    else:
        json.dump(result, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    return 0
