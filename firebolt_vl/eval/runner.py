"""Batched greedy evaluation of a Firebolt-VL model on a benchmark, resumable, with exact scoring.

``evaluate(model, processor, "pope", "/data/POPE", "runs/pope")`` (or ``firebolt-vl eval ...``) does:

1. load the benchmark's items (:func:`firebolt_vl.eval.load_benchmark`); every item carries the benchmark's standard
   prompt, which is wrapped in the chat template by ``processor.build_prompt(prompt, with_image=...)``;
2. plan the batches: the item list is cut into windows of ``sort_window`` items, each window is sorted by prompt
   length (longest first, ties by position) and cut into batches of ``batch_size`` -- less left padding, and the
   plan depends only on the items and ``batch_size``, so a resumed run batches every item exactly as an uninterrupted
   run would;
3. generate greedily batch by batch (images are decoded and preprocessed one batch ahead in a background thread),
   appending ``{"question_id", "answer"}`` lines to ``OUT/predictions.jsonl``, flushed and fsynced after each batch;
4. score all items with the benchmark's exact scorer, write ``OUT/scores.json`` atomically and return the scores.

Resuming: question_ids already in ``predictions.jsonl`` are skipped; a truncated last line (a run killed mid-write)
is cut off first. ``OUT/run.json`` records what the predictions belong to (benchmark, data, split, a fingerprint of
the weights, dtype, max_new_tokens); resuming into a folder of a different run -- another benchmark, or another
model / a further-trained one -- is refused (use another output folder or ``overwrite=True``).

Bad items do not stop the run: an image that cannot be read (missing, corrupt, too large) or a prompt the processor
refuses gets the answer ``""`` (scored as wrong) and an ``"error"`` field in its predictions line, and is counted
in ``scores.json`` as ``n_errors``. Such items count as done on a resume; delete their lines to retry them.

Glossary: B batch rows, T prompt tokens (left padded), S image side, N_img images in the batch.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

PREDICTIONS_FILE = "predictions.jsonl"
SCORES_FILE = "scores.json"
RUN_FILE = "run.json"
SUBMISSION_FILE = "vqav2_submission.json"
DEFAULT_MAX_NEW_TOKENS = 32  # short answers and option letters; raise it for open-ended MMMU answers
DEFAULT_SORT_WINDOW_BATCHES = 16  # items sorted by length within windows of this many batches
# run.json fields that must match to resume into an output folder (the rest -- model path, limit, batch size,
# device -- may change)
_RUN_KEYS = ("benchmark", "data", "split", "weights", "dtype", "max_new_tokens")
_FINGERPRINT_SAMPLES = 256  # elements hashed per tensor


# ======================================================================================================
# predictions file
# ======================================================================================================


def read_prediction_records(path) -> Tuple[Dict[str, dict], int, bool]:
    """Parse a predictions JSONL written by :func:`evaluate`.

    Returns ``(records, valid_bytes, needs_newline)``: ``records`` maps ``str(question_id)`` to the line's object
    (the last line wins), ``valid_bytes`` is the length of the intact prefix of the file (a truncated last line is
    excluded), ``needs_newline`` is True when that prefix does not end with a newline (a complete last record
    written without its newline). A malformed line that is not the last one raises ValueError naming it."""
    path = Path(path)
    if not path.exists():
        return {}, 0, False
    data = path.read_bytes()
    records: Dict[str, dict] = {}
    pos, lineno, valid = 0, 0, 0
    needs_newline = False
    while pos < len(data):
        end = data.find(b"\n", pos)
        last = end == -1
        line = data[pos:] if last else data[pos:end]
        nxt = len(data) if last else end + 1
        lineno += 1
        if line.strip():
            try:
                rec = json.loads(line.decode("utf-8"))
                if not isinstance(rec, dict) or "question_id" not in rec or "answer" not in rec:
                    raise ValueError("not a {question_id, answer} object")
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                if last or not data[nxt:].strip():  # the final line: a write cut short
                    break
                raise ValueError(f"{path}:{lineno}: malformed predictions line ({e}); fix or delete it") from None
            records[str(rec["question_id"])] = rec
            needs_newline = last
        valid = nxt
        pos = nxt
    return records, valid, needs_newline


def _repair_predictions(path: Path, valid_bytes: int, needs_newline: bool) -> None:
    """Cut a truncated last line off and end the file with a newline, so appended lines stay well-formed."""
    if not path.exists():
        return
    size = path.stat().st_size
    if size == valid_bytes and not needs_newline:
        return
    with open(path, "r+b") as f:
        f.truncate(valid_bytes)
        if needs_newline:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
        f.flush()
        os.fsync(f.fileno())


def _append_records(f, records: Sequence[dict]) -> None:
    """Append JSONL lines and make them durable (one write, flush, fsync)."""
    if not records:
        return
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    f.flush()
    os.fsync(f.fileno())


# ======================================================================================================
# batching
# ======================================================================================================


def plan_batches(lengths: Sequence[int], batch_size: int, window: int) -> List[List[int]]:
    """Batches of item indices: windows of ``window`` consecutive items, each sorted by length (longest first, ties
    by index) and cut into ``batch_size`` rows; ``window <= 1`` keeps the data order. Depends only on the lengths and
    sizes (deterministic)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if window <= 1:  # no sorting: the data order
        return [list(range(b, min(len(lengths), b + batch_size))) for b in range(0, len(lengths), batch_size)]
    window = max(int(window), batch_size)
    batches = []
    for start in range(0, len(lengths), window):
        idx = sorted(range(start, min(len(lengths), start + window)), key=lambda i: (-lengths[i], i))
        batches.extend(idx[b : b + batch_size] for b in range(0, len(idx), batch_size))
    return batches


@dataclass
class _Loaded:
    """A batch whose images are decoded: the rows still usable and the errors of the others."""

    rows: List[int]  # item indices
    images: list  # RGB PIL image or None per row
    errors: Dict[int, str] = field(default_factory=dict)  # item index -> error message


def _error_text(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _load_item_image(item, max_pixels):
    """The item's image as RGB PIL through :func:`firebolt_vl.processing.load_image` (clear errors; files and bytes are
    checked against ``max_pixels`` from the header, before decoding)."""
    import base64

    from ..processing import load_image
    from .loaders import BytesImage, FileImage

    ref = item.image
    if isinstance(ref, FileImage):
        return load_image(ref.path, max_pixels)
    if isinstance(ref, BytesImage):
        data = base64.b64decode(ref.data) if isinstance(ref.data, str) else ref.data
        return load_image(bytes(data), max_pixels)
    image = item.load_image()
    if image is None:
        raise ValueError("the item's image reference gave no image")
    return load_image(image, max_pixels)


def _load_batch(processor, items, prompt_errors: Dict[int, str], batch: Sequence[int]) -> _Loaded:
    """Decode the batch's images (runs in the prefetch thread: no tokenizer use here); failures are recorded."""
    loaded = _Loaded([], [])
    for i in batch:
        if i in prompt_errors:
            loaded.errors[i] = prompt_errors[i]
            continue
        image = None
        if items[i].image is not None:
            try:
                image = _load_item_image(items[i], processor.max_image_pixels)
            except Exception as e:  # noqa: BLE001 - a bad image must not kill the run
                loaded.errors[i] = _error_text(e)
                continue
        loaded.rows.append(i)
        loaded.images.append(image)
    return loaded


def _process_batch(processor, prompts: Sequence[Optional[str]], loaded: _Loaded) -> Tuple[List[int], Optional[dict]]:
    """(rows, processor inputs) of a loaded batch; rows the processor refuses (e.g. a prompt over the token limit)
    move to ``loaded.errors`` and the rest is processed without them."""
    rows, images = loaded.rows, loaded.images
    if not rows:
        return [], None
    try:
        return rows, processor([prompts[i] for i in rows], images=images)
    except Exception:  # noqa: BLE001 - find the offending rows one by one, keep the rest
        keep, keep_images = [], []
        for i, im in zip(rows, images):
            try:
                processor([prompts[i]], images=[im])
            except Exception as e:  # noqa: BLE001
                loaded.errors[i] = _error_text(e)
                continue
            keep.append(i)
            keep_images.append(im)
        return keep, (processor([prompts[i] for i in keep], images=keep_images) if keep else None)


# ======================================================================================================
# generation
# ======================================================================================================


def _model_device(model):
    return next(model.parameters()).device


def generate_answers(model, processor, inputs: dict, max_new_tokens: int, compile: Optional[str] = None) -> List[str]:
    """Greedy answers (stripped text) for one processed batch (`compile`: see FireboltForConditionalGeneration.generate)."""
    import torch

    device = _model_device(model)
    batch = {k: v.to(device) for k, v in inputs.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, compile=compile)  # (B, T + new)
    prompt_len = batch["input_ids"].shape[1]
    return [text.strip() for text in processor.batch_decode(out[:, prompt_len:].cpu())]


def model_fingerprint(model) -> str:
    """A cheap identity of the weights: SHA-1 over every state-dict tensor's name, shape, dtype and the raw bytes of
    up to 256 evenly strided elements (any training step or another checkpoint changes it; the device does not)."""
    import hashlib

    import torch

    h = hashlib.sha1()
    with torch.no_grad():
        for name, t in _plain_tensors(model.state_dict()):
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // _FINGERPRINT_SAMPLES)][:_FINGERPRINT_SAMPLES].cpu().contiguous()
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _plain_tensors(state: dict):
    """(name, tensor) pairs with torchao's quantized weights (firebolt_vl.quantize) split into their stored parts
    (integer data, scales, zero points), which are ordinary tensors."""
    import torch

    for name, t in state.items():
        parts = getattr(t, "tensor_data_names", None)
        if parts:
            for part in (*parts, *getattr(t, "optional_tensor_data_names", ())):
                if isinstance(getattr(t, part, None), torch.Tensor):
                    yield f"{name}.{part}", getattr(t, part)
        else:
            yield name, t


def _model_identity(model) -> Optional[str]:
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        return None
    return os.path.abspath(name) if os.path.isdir(name) else str(name)


def _check_run(out: Path, run: dict, overwrite: bool) -> None:
    """Refuse to resume predictions of a different run; ``overwrite`` starts afresh."""
    pred, run_file = out / PREDICTIONS_FILE, out / RUN_FILE
    if overwrite:
        for p in (pred, run_file, out / SCORES_FILE, out / SUBMISSION_FILE):
            if p.exists():
                p.unlink()
        return
    if not run_file.exists():
        return
    try:
        old = json.loads(run_file.read_text(encoding="utf-8"))
    except ValueError:
        return  # unreadable record: nothing to compare with
    if not pred.exists():
        return
    for k in _RUN_KEYS:
        if old.get(k) is not None and run.get(k) is not None and old.get(k) != run.get(k):
            what = ("another model's weights" if k == "weights"
                    else f"another run ({k}: {old.get(k)!r}, now {run.get(k)!r})")
            raise ValueError(f"{out} holds predictions of {what}; use another output folder or overwrite "
                             f"(--overwrite / overwrite=True)")


# ======================================================================================================
# entry point
# ======================================================================================================


def evaluate(
    model,
    processor,
    benchmark: str,
    data,
    output_dir,
    split: Optional[str] = None,
    limit: Optional[int] = None,
    batch_size: int = 8,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    *,
    items: Optional[list] = None,
    model_id: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
    sort_window: Optional[int] = None,
    mode: Optional[str] = None,
    seed: Optional[int] = None,
    compile: Optional[str] = None,
) -> dict:
    """Evaluate ``model`` on ``benchmark`` (see the module doc); returns the scores dict also written to
    ``output_dir/scores.json`` (the scorer's keys, plus ``n_errors``).

    ``items``: already loaded items of ``data`` (skips loading). ``model_id``: what run.json records as the model
    (default: the model's ``name_or_path``). ``overwrite``: discard earlier predictions in ``output_dir`` instead of
    resuming. ``sort_window``: items per length-sorting window (default 16 batches; 1 keeps the data order).
    ``mode`` / ``seed``: the scoring reference to reproduce and its random-fallback seed (see ``scorers.score``).
    ``compile``: decode through a static cache and a compiled step (``generate(compile=...)``; the same answers within
    float rounding, so it does not stop a run from resuming; run.json records it).
    For VQAv2 test splits (no answers) the EvalAI file ``vqav2_submission.json`` is written as well."""
    from ..processing import atomic_write_text
    from . import BENCHMARKS, load_benchmark
    from .scorers import score, scoring_options, write_vqav2_submission

    name = str(benchmark).lower()
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose from {', '.join(BENCHMARKS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    scoring_options(name, mode, seed)  # a bad mode / seed fails before any generation
    if items is None:
        items = load_benchmark(name, data, split=split, limit=limit)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output is not a folder: {out}")
    out.mkdir(parents=True, exist_ok=True)
    run = {"benchmark": name, "data": os.path.abspath(os.fspath(data)) if data is not None else None,
           "split": split, "model": model_id or _model_identity(model), "weights": model_fingerprint(model),
           "dtype": str(model.dtype).replace("torch.", ""), "max_new_tokens": int(max_new_tokens)}
    _check_run(out, run, overwrite)
    pred_path = out / PREDICTIONS_FILE
    records, valid_bytes, needs_newline = read_prediction_records(pred_path)
    _repair_predictions(pred_path, valid_bytes, needs_newline)
    atomic_write_text(out / RUN_FILE, json.dumps({**run, "limit": limit, "batch_size": batch_size, "compile": compile},
                                                    indent=2) + "\n")

    # prompts and lengths of every item (the batch plan must not depend on what is already done)
    prompts: List[Optional[str]] = []
    prompt_errors: Dict[int, str] = {}
    for i, it in enumerate(items):
        try:
            prompts.append(processor.build_prompt(it.prompt, with_image=it.image is not None))
        except Exception as e:  # noqa: BLE001 - an unusable prompt is the item's error
            prompts.append(None)
            prompt_errors[i] = _error_text(e)
    ok = [i for i, p in enumerate(prompts) if p is not None]
    lengths = [0] * len(items)
    if ok:
        ids = processor.tokenizer([prompts[i] for i in ok], add_special_tokens=False)["input_ids"]
        extra = getattr(processor, "image_seq_length", 1) - 1  # <image> is expanded by the processor
        for i, seq in zip(ok, ids):
            lengths[i] = len(seq) + (extra if items[i].image is not None else 0)
    window = sort_window if sort_window is not None else batch_size * DEFAULT_SORT_WINDOW_BATCHES
    done = set(records)
    plan = plan_batches(lengths, batch_size, window)
    pending = [[i for i in b if str(items[i].question_id) not in done] for b in plan]
    pending = [b for b in pending if b]
    n_done = sum(1 for it in items if str(it.question_id) in done)

    if pending:
        _run_batches(model, processor, items, prompts, prompt_errors, pending, pred_path, records, max_new_tokens,
                     progress, n_done, compile)

    predictions = {it.question_id: records[str(it.question_id)]["answer"] for it in items
                   if str(it.question_id) in records}
    result = score(name, items, predictions, mode=mode, seed=seed)
    result["n_errors"] = sum(1 for it in items if "error" in records.get(str(it.question_id), {}))
    atomic_write_text(out / SCORES_FILE, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    if name == "vqav2" and result.get("n_unscored"):
        write_vqav2_submission(predictions, out / SUBMISSION_FILE, question_ids=[it.question_id for it in items])
    return result


def _run_batches(model, processor, items, prompts, prompt_errors, pending, pred_path: Path, records: Dict[str, dict],
                 max_new_tokens: int, progress: bool, n_done: int, compile: Optional[str] = None) -> None:
    """Generate the pending batches, appending each batch's lines durably; images load one batch ahead."""
    from tqdm.auto import tqdm

    t0, n_new = time.perf_counter(), 0
    bar = tqdm(total=n_done + sum(len(b) for b in pending), initial=n_done, desc="eval", unit="q",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-images")
    try:
        with open(pred_path, "a", encoding="utf-8") as f:
            future = pool.submit(_load_batch, processor, items, prompt_errors, pending[0])
            for k in range(len(pending)):
                loaded = future.result()
                if k + 1 < len(pending):  # decode the next batch's images while the model works
                    future = pool.submit(_load_batch, processor, items, prompt_errors, pending[k + 1])
                rows, inputs = _process_batch(processor, prompts, loaded)  # tokenizer: main thread only
                answers = generate_answers(model, processor, inputs, max_new_tokens, compile) if rows else []
                lines = [{"question_id": items[i].question_id, "answer": a} for i, a in zip(rows, answers)]
                lines += [{"question_id": items[i].question_id, "answer": "", "error": msg}
                          for i, msg in sorted(loaded.errors.items())]
                _append_records(f, lines)
                for rec in lines:
                    records[str(rec["question_id"])] = rec
                n_new += len(lines)
                bar.update(len(lines))
                if loaded.errors:
                    bar.set_postfix(errors=sum(1 for r in records.values() if "error" in r))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    dt = time.perf_counter() - t0
    if progress and n_new:
        print(f"eval: {n_new} answers in {dt:.1f} s ({n_new / max(dt, 1e-9):.2f}/s)", file=sys.stderr)
