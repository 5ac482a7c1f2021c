"""The training loop: stages, validation perplexity, checkpoints, exact resume, DDP / FSDP.

    run_stage(model, processor, stage, output_dir, ...) -> metrics dict     one stage (the library entry point)
    run_recipe(recipe, output_dir, model=None, stages=None, resume=False)   every stage in order, handing over weights
    evaluate(model, processor, sources, ...) -> {"val_loss", "val_ppl", ...}

Stage directory (`output_dir` of run_stage):
    checkpoints/step-XXXXXXXX/   the last `keep_last` step checkpoints (model dir + optimizer + RNG + data position)
    best/                        model directory with the lowest validation perplexity so far (+ stage.json)
    final/                       the stage's result (best if validated, else last) + stage.json: the stage is done
    metrics.jsonl                one JSON object per line (run_recipe puts one file for all stages in its output):
                                 {"stage", "step", "epoch", "samples", "loss", "lr", "grad_norm", ...} every log_every
                                 steps, {"stage", "step", "val_loss", "val_ppl", ...} per validation,
                                 {"stage", "event": "end", "samples_per_s", "peak_memory_mb", ...} at the end.

Loss: next-token cross-entropy summed over the supervised tokens of the whole optimizer step on every process and
divided by their global count, so gradient accumulation and the number of processes do not change the objective.
Resume is exact: same seed, same data order, same dropout masks (RNG states saved per process) - on CPU the resumed
run ends with bit-identical weights.

LoRA stages (`lora:` in the stage) train peft adapters in the modules with lr > 0; their checkpoints, best/ and
final/ are PEFT adapter directories that refer to the base model directory (`base_dir`: the start model's directory,
or `<stage>/base/` written once when the start model has none). DPO stages (`objective: dpo`) train on preference
pairs against the stage's starting weights (LoRA: adapters disabled; otherwise a frozen copy loaded from base_dir)
and log loss, chosen / rejected rewards, reward margin and preference accuracy (validation: on the val pairs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import torch

from . import checkpoint as ckpt
from .collate import collate
from .data import MixedStream, _EncodeFn, open_source, source_length
from .dist import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown
from .optim import apply_trainable, build_optimizer, build_scheduler, module_of, param_groups, set_train_modes
from .recipe import MODULES, Recipe, RecipeError, RuntimeConfig, StageConfig, to_dict

logger = logging.getLogger(__name__)

FAULT_ENV = "FIREBOLT_TRAIN_FAULT"  # fault injection for tests: "kill_after_step=N" SIGKILLs the process after step N
STAGE_FILE = "stage.json"


# ---------------------------------------------------------------------------------------------- small helpers
class MetricsLog:
    """Append-only JSONL metrics (rank 0 writes; other ranks hold a disabled log)."""

    def __init__(self, path: Optional[Path], enabled: bool):
        self.path = Path(path) if path is not None else None
        self.enabled = enabled and self.path is not None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, default=float) + "\n")

    def drop_after(self, stage: str, step: int, val_step: int) -> None:
        """On resume from checkpoint `step`: forget rows of `stage` logged after it, and validation rows after
        `val_step` (the last validation the checkpoint knows of); the resumed run logs them again."""
        if not self.enabled or not self.path.is_file():
            return
        from ..processing import atomic_write_text

        def stale(r):
            return r.get("stage") == stage and r.get("step", 0) > (val_step if "val_ppl" in r else step)

        rows = [r for r in read_metrics(self.path) if not stale(r)]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))


def read_metrics(path) -> list[dict]:
    """Rows of a metrics.jsonl file (for plotting loss / validation curves); a torn last line is ignored."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class PeakMemory:
    """Peak memory over a stage: max allocated on CUDA, the resident set (VmHWM, reset at start) on CPU, in MiB."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)

    def read(self) -> tuple[float, str]:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda_max_allocated"
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024, "rss_peak"
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_peak"


def _autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _forward_ce(model, batch: dict, pooled: bool) -> torch.Tensor:
    """Summed next-token cross-entropy (fp32) over the batch's supervised tokens."""
    kwargs = {"pool_mask": batch["pool_mask"]} if pooled else {}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch.get("pixel_values"), labels=batch["labels"], supervised_logits_only=True, **kwargs)
    # the forward's loss is the mean over the N supervised tokens (logits (N, V)): the sum is N times it, and 0 (not
    # N x nan) for a batch without any
    n = out.logits.shape[0]
    return out.loss * n if n else out.logits.sum()


def _fault_step() -> Optional[int]:
    spec = os.environ.get(FAULT_ENV, "")
    if spec.startswith("kill_after_step="):
        return int(spec.split("=", 1)[1])
    return None


def _activation_checkpointing(lm, on: bool) -> None:
    """Recompute the decoder's activations in the backward pass (transformers 5 name, with the 4.x fallback)."""
    if hasattr(lm, "activation_checkpointing_enable"):
        if on:
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.activation_checkpointing_disable()
    elif on:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_disable()


def _unwrap(model):
    return getattr(model, "module", model)


def _lr_by_module(optimizer) -> dict[str, float]:
    out = {}
    for g in optimizer.param_groups:
        name = g.get("name", "")
        if "." not in name:
            out[name] = g["lr"]
    return out


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, processor, sources: list, *, max_length: int = 2048, loss_on: str = "assistant",
             batch_size: int = 8, max_samples: Optional[int] = None, info: Optional[DistInfo] = None,
             precision: str = "fp32", data_root: Optional[str] = None) -> dict:
    """Validation loss and perplexity exp(mean token NLL) over `sources` (readers, paths or DataSources), in file
    order, sharded over the processes; every process runs the same number of batches (FSDP needs that)."""
    info = info or DistInfo(device=next(model.parameters()).device)
    readers = [open_source(s, data_root) for s in sources]
    encode = _EncodeFn(processor, max_length, loss_on)
    pooled = getattr(getattr(_unwrap(model), "config", None), "output_mode", "replace") == "pooled"
    limit = None if max_samples is None else math.ceil(max_samples / info.world_size)
    was_training = model.training
    model.eval()

    def batches():
        buf, n = [], 0
        for reader in readers:
            shard = reader.shard(info.rank, info.world_size) if info.distributed else reader
            for rec in shard:
                if limit is not None and n >= limit:
                    break
                try:
                    buf.append(encode(rec))
                except Exception as e:  # SkipExample: counted by the training stream, ignored here
                    if not hasattr(e, "reason"):
                        raise
                    continue
                n += 1
                if len(buf) == batch_size:
                    yield collate(buf, processor)
                    buf = []
        if buf:
            yield collate(buf, processor)

    total_nll, total_tok, samples = 0.0, 0, 0
    it, dummy = batches(), None
    while True:
        batch = next(it, None)
        more = all_reduce_sum([0.0 if batch is None else 1.0], info)[0]
        if more == 0:
            break
        weight = 1.0
        if batch is None:  # this process ran out: run a repeat of its first batch with weight 0 (FSDP lockstep)
            batch, weight = dummy, 0.0
            if batch is None:
                continue
        dummy = dummy or batch
        batch = _to_device(batch, info.device)
        with _autocast(info.device, precision):
            nll = _forward_ce(model, batch, pooled)
        total_nll += weight * float(nll)
        total_tok += int(weight) * batch["n_targets"]
        samples += int(weight) * batch["n_rows"]
    total_nll, total_tok, samples = all_reduce_sum([total_nll, float(total_tok), float(samples)], info)
    if was_training:
        model.train()
    if total_tok == 0:
        return {"val_loss": float("nan"), "val_ppl": float("nan"), "val_tokens": 0, "val_samples": 0}
    loss = total_nll / total_tok
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(total_tok),
            "val_samples": int(samples)}


# ---------------------------------------------------------------------------------------------- wrapping
def _wrap(model, runtime: RuntimeConfig, info: DistInfo):
    """DDP, or FSDP2 (`fully_shard` on each decoder layer and the vision tower, then the root).
    FSDP cannot shard 0-d parameters (the CMM's gate): they stay replicated and `_sync_replicated` averages their
    gradients. Returns (wrapped model, is_fsdp, replicated parameters)."""
    strategy = runtime.strategy
    if not info.distributed:
        return model, False, []
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        scalars = [p for p in model.parameters() if p.ndim == 0]
        kw = {"ignored_params": set(scalars)} if scalars else {}
        lm = model.language_model
        layers = getattr(getattr(lm, "model", lm), "layers", [])
        for layer in layers:
            fully_shard(layer, **kw)
        fully_shard(model.vision, **kw)
        fully_shard(model, **kw)  # the root also holds the fusion module (its methods run outside its forward)
        return model, True, [p for p in scalars if p.requires_grad]
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=runtime.find_unused_parameters), False, []


def _sync_replicated(params: list, info: DistInfo) -> None:
    """Average the gradients of parameters FSDP left replicated (one all-reduce)."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _clip_grad_norm(params: list, max_norm: float, fsdp: bool, info: DistInfo) -> float:
    """Global L2 norm of the gradients, clipped to max_norm. Under FSDP the squared norms of the local shards are
    summed over processes in one all-reduce (replicated parameters counted once)."""
    if not fsdp:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    import torch.distributed as dist

    sharded, replicated = torch.zeros((), dtype=torch.float64, device=info.device), 0.0
    grads = []
    for p in params:
        if p.grad is None:
            continue
        grads.append(p.grad)
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else None
        if g is not None:
            sharded += g.detach().double().pow(2).sum()
        else:
            replicated += float(p.grad.detach().double().pow(2).sum())
    dist.all_reduce(sharded, op=dist.ReduceOp.SUM)
    total = math.sqrt(float(sharded) + replicated)
    coef = max_norm / (total + 1e-6)
    if coef < 1.0 and math.isfinite(total):
        for g in grads:
            g.mul_(coef)
    return total


def _as_specs(data, default: list) -> list:
    """None -> the recipe's sources; a list of records -> one in-memory source; one reader/path -> [it]."""
    if data is None:
        return list(default)
    if isinstance(data, (list, tuple)):
        if data and isinstance(data[0], dict) and "conversations" in data[0]:
            return [list(data)]
        return list(data)
    return [data]


def _stage_sources(stage: StageConfig, train_data, val_data, data_root, image_root):
    train_specs = _as_specs(train_data, stage.data.train)
    val_specs = _as_specs(val_data, stage.data.val)
    if not train_specs:
        raise RecipeError(f"stage {stage.name}: no training data; set stages.{stage.name}.data.train in the recipe "
                          f"or pass --data")
    try:
        train = [(open_source(s, data_root, image_root), s) for s in train_specs]
        val = [open_source(s, data_root, image_root) for s in val_specs]
    except FileNotFoundError as e:
        raise FileNotFoundError(f"stage {stage.name}: {e} (relative data paths are resolved against the data root: "
                                f"{data_root or 'the current directory'}; set --data-root, or --data / --val-data)"
                                ) from None
    return train, val


def _steps_per_epoch(train, micro: int, accum: int, world: int, stage: StageConfig) -> Optional[int]:
    """Optimizer steps one epoch holds for the process with the fewest entries (None if a length is unknown)."""
    per_rank = []
    for r in range(world):
        n = 0
        for reader, spec in train:
            shard = reader.shard(r, world) if world > 1 else reader
            length = source_length(shard)
            if length is None:
                hint = getattr(spec, "num_samples", None)
                if hint is None:
                    return None
                length = hint // world
            n += length
        per_rank.append(n)
    return min(per_rank) // (micro * accum)


def _weights(train, world: int) -> list[float]:
    out = []
    for reader, spec in train:
        w = getattr(spec, "weight", None)
        if w is None:
            shard = reader.shard(0, world) if world > 1 else reader
            w = source_length(shard) or getattr(spec, "num_samples", None) or 1.0
        out.append(float(w))
    return out


# ---------------------------------------------------------------------------------------------- one stage
def run_stage(
    model,
    processor,
    stage: StageConfig,
    output_dir,
    *,
    train_data=None,
    val_data=None,
    runtime: Optional[RuntimeConfig] = None,
    seed: int = 0,
    resume: bool = False,
    metrics_path=None,
    data_root: Optional[str] = None,
    image_root: Optional[str] = None,
    base_dir=None,
) -> dict:
    """Train `model` for one stage; returns the stage's metrics (see the keys at the end).

    model, processor: a FireboltForConditionalGeneration (fp32 weights; moved to the device here) and its processor.
    stage: the StageConfig (which modules train at which lr, batch, schedule, cadence).
    output_dir: the stage directory (checkpoints/, best/, final/, metrics.jsonl).
    train_data / val_data: override stage.data: a list of DataSource / paths / readers, or one list of records.
    runtime: device, precision, DDP/FSDP, workers (default RuntimeConfig()).
    resume: continue from the newest complete checkpoint in output_dir/checkpoints (False: refuse if one exists).
    base_dir: the directory `model` was loaded from (LoRA adapters refer to it; DPO's reference is loaded from it);
        None: LoRA / DPO stages save the start model as output_dir/base once.
    Under torchrun every process calls this; DDP/FSDP is set up from the environment.
    After the call the model holds the stage's final weights (under FSDP it stays sharded: load final_dir instead;
    with LoRA it holds the adapters).
    """
    runtime = runtime or RuntimeConfig()
    info = init_distributed(runtime.device)
    device = info.device
    out = Path(output_dir)
    ckpt_dir = out / "checkpoints"
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.remove_partial(ckpt_dir)
        ckpt.remove_partial(out)
    barrier(info)
    existing = ckpt.latest_checkpoint(ckpt_dir)  # saves are atomic: a listed checkpoint has every rank's file
    if existing is not None and not resume:
        raise RecipeError(f"{out} already holds checkpoints of stage {stage.name} ({existing.name}); pass resume "
                          f"(--resume) to continue it, or use another output directory")

    train, val = _stage_sources(stage, train_data, val_data, data_root, image_root)
    micro, accum = stage.batch_layout(info.world_size)
    spe = _steps_per_epoch(train, micro, accum, info.world_size, stage)
    if spe is None and stage.max_steps is None:
        raise RecipeError(f"stage {stage.name}: a training source has no length (webdataset shards); set max_steps "
                          f"or the source's num_samples")
    if spe == 0:
        raise RecipeError(f"stage {stage.name}: the training data holds less than one optimizer step per process "
                          f"({micro} x {accum} samples); lower batch_size or add data")
    if stage.max_steps is not None:
        total_steps, stop_step, n_epochs = stage.max_steps, stage.max_steps, None
    else:
        total_steps = max(1, math.ceil(stage.epochs * spe))
        n_epochs = math.ceil(stage.epochs)
        stop_step = total_steps if stage.epochs != n_epochs else None

    # ---- model, trainable modules, optimizer
    lrs = stage.lr.as_dict()
    use_lora, dpo = stage.lora is not None, stage.objective == "dpo"
    if (use_lora or dpo) and info.distributed and runtime.strategy == "fsdp":
        raise RecipeError(f"stage {stage.name}: LoRA and DPO stages run in one process or under DDP; strategy fsdp "
                          f"is not supported for them")
    model.to(device=device, dtype=torch.float32)
    counts = apply_trainable(model, lrs)
    resume_from = existing if resume else None
    trainer_state: dict = {}
    rank_state: dict = {}
    optim_file: dict = {}
    if resume_from is not None:
        trainer_state, rank_state, optim_file = ckpt.read_checkpoint(resume_from, info.rank)
        if trainer_state.get("world_size") != info.world_size:
            raise RecipeError(f"{resume_from} was written by {trainer_state.get('world_size')} processes; resume with "
                              f"the same number (this run has {info.world_size})")
        base_dir = trainer_state.get("base_dir") or base_dir
    if (use_lora or dpo) and base_dir is None:
        base_dir = out / "base"  # the stage's starting weights, kept for the adapters / the DPO reference
        if ckpt.resolve_dir(base_dir) is None or resume_from is None:
            if info.is_main:
                ckpt.save_model_atomic(model, processor, {k: v.detach() for k, v in model.state_dict().items()},
                                       base_dir)
            barrier(info)
    base_dir = str(Path(base_dir).resolve()) if base_dir is not None else None
    fingerprint = None
    if use_lora:
        from ..adapters import add_lora, adapter_names, base_fingerprint

        lora_cfg = add_lora(model, stage.lora, [m for m in MODULES if lrs[m] > 0], base_dir=base_dir, seed=seed)
        model.to(device=device)
        fingerprint = base_fingerprint(base_dir, adapter_names(lora_cfg))
        counts = {m: 0 for m in MODULES}
        for n, p in model.named_parameters():
            if p.requires_grad:
                counts[module_of(n)] += p.numel()
    if stage.gradient_checkpointing:
        _activation_checkpointing(model.language_model, True)
    if resume_from is not None:
        if use_lora:
            from ..adapters import load_adapter_weights

            load_adapter_weights(model, resume_from)
        else:
            ckpt.load_model_weights(model, resume_from)
        total_steps = int(trainer_state["total_steps"])  # keep the schedule the run started with
    # groups are decided on the plain module (FSDP replaces the parameters and drops their `_optim` tags)
    groups = param_groups(model, lrs, stage.optim.weight_decay)
    wrapped, fsdp, replicated = _wrap(model, runtime, info)
    params = dict(model.named_parameters())
    for g in groups:
        g["params"] = [params[n] for n in g["param_names"]]
    if fsdp:  # keep sharded (DTensor) and replicated parameters in separate groups: foreach kernels need one kind
        split = []
        for g in groups:
            for want in (True, False):
                names = [n for n in g["param_names"] if hasattr(params[n], "to_local") == want]
                if names:
                    split.append({**g, "name": g["name"] + ("" if want else ".replicated"), "param_names": names,
                                  "params": [params[n] for n in names]})
        groups = split
    fused = device.type == "cuda" and not fsdp
    optimizer = build_optimizer(groups, stage.optim, fused=fused)
    scheduler = build_scheduler(optimizer, total_steps, stage.optim)
    if resume_from is not None:
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(wrapped, optimizer, optim_state_dict=optim_file["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(optim_file["optimizer"])
        scheduler.load_state_dict(optim_file["scheduler"])
    pooled = getattr(model.config, "output_mode", "replace") == "pooled"
    n_train = sum(p.numel() for g in groups for p in g["params"])
    n_total = sum(p.numel() for p in model.parameters())
    optim_mb = 2 * 4 * n_train / 2**20  # AdamW's exp_avg + exp_avg_sq, fp32

    # ---- DPO reference: the stage's starting weights
    ref_model = None
    if dpo and not use_lora:
        from ..hub import load_model_dir

        ref_model = load_model_dir(base_dir, device="cpu", dtype=torch.float32)[0].to(device).eval()
        ref_model.config.freeze_vision = True
        for p in ref_model.parameters():
            p.requires_grad_(False)

    def ref_logps(batch: dict) -> torch.Tensor:
        """(rows,) answer log-probabilities under the reference, without dropout and without gradients."""
        from .dpo import sequence_logps

        with torch.no_grad(), _autocast(device, runtime.precision):
            if ref_model is not None:
                return sequence_logps(ref_model, batch, pooled)
            from ..adapters import adapters_disabled

            was_training = model.training
            model.eval()
            try:
                with adapters_disabled(model):
                    return sequence_logps(model, batch, pooled)
            finally:
                if was_training:
                    set_train_modes(model, lrs)

    # ---- counters and position
    step = int(trainer_state.get("step", 0))
    epoch = int(rank_state.get("epoch", 0))
    data_state = rank_state.get("data")
    samples = int(trainer_state.get("samples", 0))
    tokens_seen = int(trainer_state.get("tokens", 0))
    best_ppl = trainer_state.get("best_val_ppl")
    best_step = trainer_state.get("best_step")
    last_val: dict = trainer_state.get("last_val") or {}
    data_counts: Counter = Counter()
    metrics = MetricsLog(metrics_path or out / "metrics.jsonl", info.is_main)
    if resume_from is not None:
        metrics.drop_after(stage.name, step, last_val.get("step", -1))
        if info.is_main:
            print(f"[{stage.name}] resuming from {resume_from} (step {step}, epoch {epoch})", flush=True)
        ckpt.restore_rng(rank_state["rng"])
    else:
        ckpt.seed_everything(seed + 1000 * info.rank)
    if info.is_main:
        trained = ", ".join(f"{m} {n / 1e6:.2f}M @ lr {lrs[m]:g}" for m, n in counts.items() if n)
        fp32_note = "" if device.type == "cuda" or runtime.precision == "fp32" else " (bf16 autocast is CUDA-only: fp32)"
        print(f"[{stage.name}] training {trained}; {info.world_size} process(es) x micro-batch {micro} x accumulation "
              f"{accum} = batch {stage.batch_size}; {total_steps} steps ({spe} per epoch); device {device}{fp32_note}",
              flush=True)
        what = (f"LoRA r={stage.lora.r} alpha={stage.lora.alpha:g} on {len(adapter_names(lora_cfg))} layers"
                if use_lora else "full weights")
        objective = f"dpo beta={stage.beta:g} rpo_alpha={stage.rpo_alpha:g}" if dpo else stage.objective
        print(f"[{stage.name}] {objective}, {what}: trainable "
              f"parameters {n_train:,} of {n_total:,} ({100 * n_train / max(n_total, 1):.3f}%); optimizer state "
              f"{optim_mb:.2f} MiB (AdamW, fp32) + gradients {optim_mb / 2:.2f} MiB"
              f"{f'; base {base_dir}' if base_dir else ''}", flush=True)

    if dpo:
        from .dpo import PairEncodeFn, collate_pairs, evaluate_pairs, mean_stats, pair_step

        encode = PairEncodeFn(processor, stage.max_length)
        collate_fn = collate_pairs
    else:
        encode = _EncodeFn(processor, stage.max_length, stage.loss_on)
        collate_fn = collate
    weights = _weights(train, info.world_size)
    readers = [r for r, _ in train]

    def stage_state() -> dict:
        return {"stage": stage.name, "step": step, "epoch": epoch, "samples": samples, "tokens": tokens_seen,
                "total_steps": total_steps, "steps_per_epoch": spe, "world_size": info.world_size,
                "best_val_ppl": best_ppl, "best_step": best_step, "last_val": last_val, "seed": seed,
                "stage_config": to_dict(stage), "base_dir": base_dir, "lora": use_lora, "objective": stage.objective}

    def write_adapter(directory, extra=None) -> None:
        from ..adapters import write_adapter_files

        write_adapter_files(model, directory, base_dir, fingerprint, extra)

    def save_result(target: Path, extra: dict) -> None:
        """best/ or final/: a model directory, or (LoRA) an adapter directory."""
        if use_lora:
            from ..adapters import save_adapter

            save_adapter(model, target, base_dir, fingerprint, extra)
        else:
            ckpt.save_model_atomic(model, processor, ckpt.gather_model_state(wrapped, model, fsdp), target,
                                   extra=extra)

    def save() -> Path:
        """A step checkpoint (every process calls this)."""
        state = stage_state()
        rank_payload = {"rng": ckpt.capture_rng(), "data": data_state, "epoch": epoch,
                        "log": [log_nll, log_tok, dict(log_stats)]}  # the partial logging window: resumed rows match
        return ckpt.save_checkpoint(ckpt_dir, step, model=wrapped, unwrapped=model, processor=processor,
                                    optimizer=optimizer, scheduler=scheduler, trainer_state=state,
                                    rank_state=rank_payload, info=info, keep_last=stage.keep_last, fsdp=fsdp,
                                    write_model=write_adapter if use_lora else None)

    def validate() -> None:
        nonlocal best_ppl, best_step, last_val
        if not val:
            return
        t = time.perf_counter()
        eval_model = wrapped if fsdp else model
        if dpo:
            with _autocast(device, runtime.precision):
                res = evaluate_pairs(model, processor, val, ref_logps, beta=stage.beta, max_length=stage.max_length,
                                     batch_size=stage.val_batch_size or micro, max_samples=stage.val_max_samples,
                                     pooled=pooled, rpo_alpha=stage.rpo_alpha)
        else:
            res = evaluate(eval_model, processor, val, max_length=stage.max_length, loss_on=stage.loss_on,
                           batch_size=stage.val_batch_size or micro, max_samples=stage.val_max_samples, info=info,
                           precision=runtime.precision)
        set_train_modes(model, lrs)
        last_val = {"step": step, **res}
        metrics.write({"stage": stage.name, "step": step, "epoch": epoch, **res,
                       "eval_s": round(time.perf_counter() - t, 3)})
        if info.is_main:
            extra = (f", preference accuracy {res['val_pref_accuracy']:.3f} (policy's own "
                     f"{res['val_logp_accuracy']:.3f}), reward margin {res['val_reward_margin']:.4f}" if dpo else "")
            bar.write(f"[{stage.name}] step {step}: val loss {res['val_loss']:.4f}, ppl {res['val_ppl']:.3f}{extra}")
        if math.isfinite(res["val_ppl"]) and (best_ppl is None or res["val_ppl"] < best_ppl):
            best_ppl, best_step = res["val_ppl"], step  # DPO: exp(val DPO loss), i.e. ranked by the DPO loss
            if use_lora:
                if info.is_main:
                    save_result(out / "best", {STAGE_FILE: {**stage_state(), "kind": "best"}})
            else:
                sd = ckpt.gather_model_state(wrapped, model, fsdp)
                if info.is_main:
                    ckpt.save_model_atomic(model, processor, sd, out / "best",
                                           extra={STAGE_FILE: {**stage_state(), "kind": "best"}})
            barrier(info)

    # ---- loop
    from tqdm.auto import tqdm

    set_train_modes(model, lrs)
    peak = PeakMemory(device)
    kill_after = _fault_step()
    bar = tqdm(total=stop_step or total_steps, initial=step, desc=stage.name, unit="step", dynamic_ncols=True,
               disable=not (runtime.progress and info.is_main))
    log_nll, log_tok, log_stats = (list(rank_state.get("log", [0.0, 0])) + [{}])[:3]
    log_stats = dict(log_stats)
    nonfinite = 0
    train_time, run_samples, run_tokens = 0.0, 0, 0
    last_saved = step if resume_from is not None else -1
    last_validated = last_val.get("step", -1)
    warned_trunc = False
    stage_start = time.perf_counter()
    finished = stop_step is not None and step >= stop_step

    def on_counts(c: dict) -> None:
        data_counts.update({k: v for k, v in c.items() if v})

    while not finished and (n_epochs is None or epoch < n_epochs):
        stream = MixedStream(readers, weights, rank=info.rank, world=info.world_size, epoch=epoch, seed=seed,
                             window=stage.shuffle_buffer, shuffle=stage.shuffle, encode=encode,
                             num_workers=runtime.num_workers, state=data_state, on_counts=on_counts,
                             prefetch=2 * micro * accum)
        it = iter(stream)
        epoch_done, steps_this_epoch = False, 0
        while not epoch_done:
            t0 = time.perf_counter()
            micro_batches, last_state = [], data_state
            for _ in range(accum):
                items = [x for _, x in zip(range(micro), it)]
                if len(items) < micro:
                    break
                last_state = items[-1][1]
                micro_batches.append(collate_fn([e for e, _ in items], processor))
            have = len(micro_batches) == accum
            n_local = sum(b["n_pairs" if dpo else "n_targets"] for b in micro_batches) if have else 0
            n_global, missing = all_reduce_sum([float(n_local), 0.0 if have else 1.0], info)
            if missing > 0:  # some process ran out of data: the epoch ends for all
                epoch_done = True
                break
            data_state = last_state
            scale = info.world_size / n_global
            step_nll = 0.0
            for i, batch in enumerate(micro_batches):
                batch = _to_device(batch, device)
                sync = i == accum - 1
                ctx = contextlib.nullcontext()
                if info.distributed and not sync:
                    ctx = wrapped.no_sync() if not fsdp else contextlib.nullcontext()
                    if fsdp:
                        wrapped.set_requires_gradient_sync(False)
                elif fsdp:
                    wrapped.set_requires_gradient_sync(True)
                with ctx:
                    with _autocast(device, runtime.precision):
                        if dpo:  # summed DPO loss over the pairs; the step's mean over all pairs after scaling
                            nll, stats = pair_step(wrapped, ref_logps, batch, stage.beta, pooled, stage.rpo_alpha)
                            for k, v in stats.items():
                                log_stats[k] = log_stats.get(k, 0.0) + v
                        else:
                            nll = _forward_ce(wrapped, batch, pooled)
                    (nll * scale).backward()
                step_nll += float(nll.detach())
                run_tokens += batch["n_tokens"]
            if replicated:
                _sync_replicated(replicated, info)
            clip = stage.optim.grad_clip if stage.optim.grad_clip > 0 else float("inf")
            grad_norm = _clip_grad_norm([p for g in groups for p in g["params"]], clip, fsdp, info)
            if math.isfinite(grad_norm):
                optimizer.step()
                nonfinite = 0
            else:
                nonfinite += 1
                logger.warning("[%s] step %d: non-finite gradient norm, update skipped", stage.name, step + 1)
                if nonfinite >= 10:
                    raise FloatingPointError(f"stage {stage.name}: 10 consecutive non-finite gradients at step "
                                             f"{step + 1}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            steps_this_epoch += 1
            n_rows = micro * accum * info.world_size
            samples += n_rows
            run_samples += n_rows
            tokens_seen += int(n_global)
            log_nll += step_nll
            log_tok += n_local
            train_time += time.perf_counter() - t0
            bar.update(1)

            if data_counts.get("truncated") and not warned_trunc and info.is_main:
                warned_trunc = True
                logger.warning("[%s] sequences longer than max_length=%d are truncated (counted; total at the end)",
                               stage.name, stage.max_length)
            last_step = stop_step is not None and step >= stop_step
            if step % stage.log_every == 0 or last_step:
                nll_sum, tok_sum = all_reduce_sum([log_nll, float(log_tok)], info)
                loss = nll_sum / max(tok_sum, 1.0)
                lr = _lr_by_module(optimizer)
                row = {"stage": stage.name, "step": step, "epoch": epoch, "samples": samples, "loss": loss,
                       "lr": lr, "grad_norm": grad_norm, "samples_per_s": run_samples / max(train_time, 1e-9),
                       "time": round(time.perf_counter() - stage_start, 3)}
                if dpo:  # means over the pairs of the logging window
                    keys = sorted(log_stats)
                    sums = all_reduce_sum([log_stats[k] for k in keys], info) if keys else []
                    row.update(mean_stats(dict(zip(keys, sums)), tok_sum))
                metrics.write(row)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{max(lr.values()):.2e}")
                log_nll, log_tok, log_stats = 0.0, 0, {}
            if stage.eval_every and step % stage.eval_every == 0:
                validate()
                last_validated = step
            if stage.save_every and step % stage.save_every == 0:
                save()
                last_saved = step
            if kill_after is not None and step == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if last_step:
                finished = True
                break
        stream.close()
        if epoch_done and steps_this_epoch == 0 and data_state is None:
            raise RecipeError(f"stage {stage.name}: epoch {epoch} yielded no complete step of {micro} x {accum} "
                              f"samples per process (data: {dict(data_counts)})")
        if epoch_done:
            if last_validated != step:
                validate()
                last_validated = step
            epoch += 1
            data_state = None
            if last_saved != step:
                save()
                last_saved = step
    bar.close()

    # ---- end of stage
    if last_validated != step:
        validate()
    if last_saved != step:
        save()
    best_dir = ckpt.resolve_dir(out / "best")
    use_best = best_dir is not None and best_step is not None and best_step != step
    if use_best and use_lora:
        from ..adapters import load_adapter_weights

        load_adapter_weights(model, best_dir)
    elif use_best and not fsdp:
        ckpt.load_model_weights(model, best_dir)
    final_state = {**stage_state(), "kind": "final", "weights_from": f"best (step {best_step})" if use_best
                   else f"last (step {step})"}
    if use_best and fsdp:
        if info.is_main:
            import shutil

            tmp = out / ".tmp-final-copy"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(best_dir, tmp)
            (tmp / STAGE_FILE).write_text(json.dumps(final_state, indent=2, default=str))
            ckpt.replace_dir(tmp, out / "final")
    elif use_lora:
        if info.is_main:
            save_result(out / "final", {STAGE_FILE: final_state})
    else:
        sd = ckpt.gather_model_state(wrapped, model, fsdp)
        if info.is_main:
            ckpt.save_model_atomic(model, processor, sd, out / "final", extra={STAGE_FILE: final_state})
    barrier(info)

    mem, mem_kind = peak.read()
    result = {
        "stage": stage.name,
        "steps": step,
        "epochs": epoch,
        "samples": samples,
        "tokens": tokens_seen,
        "train_loss": last_loss(metrics.path, stage.name) if info.is_main else None,
        "val_loss": last_val.get("val_loss"),
        "val_ppl": last_val.get("val_ppl"),
        "best_val_ppl": best_ppl,
        "best_step": best_step,
        "samples_per_s": run_samples / train_time if train_time > 0 else None,
        "tokens_per_s": run_tokens * info.world_size / train_time if train_time > 0 else None,
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - stage_start,
        "peak_memory_mb": mem,
        "peak_memory_kind": mem_kind,
        "world_size": info.world_size,
        "data": dict(data_counts),
        "final_dir": str(out / "final"),
        "best_dir": str(best_dir) if best_dir else None,
        "last_checkpoint": str(ckpt.latest_checkpoint(ckpt_dir) or ""),
        "metrics_path": str(metrics.path) if metrics.path else None,
        "trainable_params": n_train,
        "total_params": n_total,
        "optimizer_state_mb": optim_mb,
        "base_dir": base_dir,
        "lora": use_lora,
        "objective": stage.objective,
    }
    metrics.write({"stage": stage.name, "event": "end", "step": step,
                   **{k: result[k] for k in ("samples_per_s", "tokens_per_s", "peak_memory_mb", "train_time_s",
                                             "best_val_ppl", "data")}})
    if info.is_main:
        sps = f"{result['samples_per_s']:.1f} samples/s" if result["samples_per_s"] else "no steps run"
        skipped = {k: v for k, v in data_counts.items() if v}
        print(f"[{stage.name}] done: {step} steps, {samples} samples, {sps}"
              f"{', %.0f tokens/s' % result['tokens_per_s'] if result['tokens_per_s'] else ''}; peak memory "
              f"{mem:.0f} MiB ({mem_kind}); best val ppl {best_ppl if best_ppl is None else round(best_ppl, 4)}"
              f"{'; data: ' + json.dumps(skipped) if skipped else ''}; final model: {out / 'final'}", flush=True)
    if stage.gradient_checkpointing:
        _activation_checkpointing(model.language_model, False)
    return result


def last_loss(path, stage: str) -> Optional[float]:
    if path is None or not Path(path).is_file():
        return None
    rows = [r for r in read_metrics(path) if r.get("stage") == stage and "loss" in r]
    return rows[-1]["loss"] if rows else None


def stage_done(stage_dir) -> bool:
    """True when `stage_dir/final/stage.json` exists: the stage finished."""
    final = ckpt.resolve_dir(Path(stage_dir) / "final")
    return final is not None and (final / STAGE_FILE).is_file()


# ---------------------------------------------------------------------------------------------- whole recipes
def load_start_model(model=None, recipe: Optional[Recipe] = None, seed: int = 0, workdir=None,
                     info: Optional[DistInfo] = None):
    """(model, processor) in fp32 for training: a (model, processor) pair, a Firebolt-VL directory, the preset
    `tiny`, or (None) the recipe's `model:` section (preset or vision + language checkpoints).
    `workdir`: a folder every process can see (the run's output), used to share the tiny preset between processes."""
    from ..hub import load_model_dir, save_model_dir

    if isinstance(model, tuple):
        return model
    spec = recipe.model if recipe is not None else None
    config = dict(spec.config) if spec is not None else {}
    if model is None:
        if spec is None or not (spec.preset or spec.vision):
            raise RecipeError("no starting model: pass --model DIR (or `tiny`), or set model.preset / model.vision + "
                              "model.language in the recipe")
        model = spec.preset or None
        if model is None:
            from ..modeling import FireboltForConditionalGeneration

            torch.manual_seed(seed)
            return FireboltForConditionalGeneration.from_components(spec.vision, spec.language,
                                                                   dtype=torch.float32, **config)
    if model == "tiny":
        import shutil
        import tempfile

        from ..presets import build_tiny

        if info is None or not info.distributed:
            with tempfile.TemporaryDirectory() as tmp:
                return build_tiny(tmp, seed=seed, **config)
        # transformers writes checkpoints on rank 0 only once a process group exists: rank 0 builds, all load
        shared = Path(workdir) / ".tiny-start"
        if info.is_main:
            shutil.rmtree(shared, ignore_errors=True)
            m, p = build_tiny(shared / "parts", seed=seed, **config)
            save_model_dir(m, p, shared / "model")
        barrier(info)
        loaded = load_model_dir(shared / "model", device="cpu", dtype=torch.float32)
        barrier(info)
        if info.is_main:
            shutil.rmtree(shared, ignore_errors=True)
        return loaded
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {model} (give a Firebolt-VL directory or `tiny`)")
    from ..adapters import is_adapter_dir, load_model_with_adapter, merge_lora

    if is_adapter_dir(path):  # a LoRA stage's result: its base with the adapters merged in
        m, processor = load_model_with_adapter(None, path, "cpu", torch.float32)
        return merge_lora(m), processor
    return load_model_dir(path, device="cpu", dtype=torch.float32)


def run_recipe(recipe: Recipe, output_dir, *, model=None, stages: Optional[list[str]] = None, resume: bool = False,
               data_root: Optional[str] = None, image_root: Optional[str] = None) -> dict:
    """Run the recipe's stages (all, or the named ones) in order under `output_dir/<stage>/`; each stage starts from
    the previous stage's final model. With resume, finished stages are skipped and an interrupted one continues
    from its last checkpoint. `model`: see load_start_model (None = the recipe's model, or the final model of the
    stage before the first selected one if it exists in output_dir). Returns {stage name: metrics}."""
    from ..adapters import is_adapter_dir, read_meta

    out = Path(output_dir)
    info = init_distributed(recipe.runtime.device)
    try:
        names = [s.name for s in recipe.stages]
        selected = names if not stages else [recipe.stage(n).name for n in stages]
        selected = [n for n in names if n in selected]  # recipe order
        if data_root:
            recipe = dataclasses.replace(recipe, data_root=data_root)  # recorded in recipe.yaml
        data_root = recipe.data_root
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            _write_recipe(recipe, out, resume)
        barrier(info)
        results = {}
        current = model
        for name in selected:
            stage = recipe.stage(name)
            stage_dir = out / name
            if stage_done(stage_dir):
                if not resume:
                    raise RecipeError(f"stage {name} already finished in {stage_dir}; pass --resume to skip it, or "
                                      f"use another output directory")
                if info.is_main:
                    print(f"[{name}] already done ({stage_dir / 'final'}); skipping", flush=True)
                current = str(ckpt.resolve_dir(stage_dir / "final"))
                continue
            if current is None:
                idx = names.index(name)
                prev = [n for n in names[:idx] if stage_done(out / n)]
                if prev:
                    current = str(ckpt.resolve_dir(out / prev[-1] / "final"))
                elif idx > 0 and info.is_main:
                    print(f"[{name}] note: no earlier stage result in {out}; starting from "
                          f"{'the recipe model' if recipe.model.preset or recipe.model.vision else 'nothing'}")
            stage_seed = recipe.seed + 7919 * names.index(name)
            latest = ckpt.latest_checkpoint(stage_dir / "checkpoints") if resume else None
            if latest is not None:
                # the checkpoint is a full model directory: no need to rebuild the start model (or reach the hub)
                current = str(latest)
                if is_adapter_dir(latest):  # LoRA: the adapters' base; run_stage loads the adapters
                    current = read_meta(latest)["base_model"]
            base_dir = current if isinstance(current, str) and Path(current).is_dir() and not is_adapter_dir(
                current) and (latest is None or current != str(latest)) else None
            if info.is_main and isinstance(current, str):
                print(f"[{name}] starting from {current}", flush=True)
            m, processor = load_start_model(current, recipe, seed=recipe.seed, workdir=out, info=info)
            results[name] = run_stage(m, processor, stage, stage_dir, runtime=recipe.runtime, seed=stage_seed,
                                      resume=resume, metrics_path=out / "metrics.jsonl", data_root=data_root,
                                      image_root=image_root, base_dir=base_dir)
            del m
            current = results[name]["final_dir"]
        return results
    finally:
        shutdown(info)


def _flatten(d, prefix=""):
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(d, list) and d and all(isinstance(x, dict) and "name" in x for x in d):
        out = {}
        for x in d:
            out.update(_flatten(x, f"{prefix}{x['name']}."))
        return out
    return {prefix[:-1]: d}


def _write_recipe(recipe: Recipe, out: Path, resume: bool) -> None:
    import yaml

    from ..processing import atomic_write_text

    path = out / "recipe.yaml"
    if resume and path.is_file():
        old = _flatten(yaml.safe_load(path.read_text()) or {})
        new = _flatten(recipe.to_dict())
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            logger.warning("resuming with a recipe that differs from %s in: %s (exactness is only guaranteed with "
                           "the same settings)", path, ", ".join(changed[:12]))
    atomic_write_text(path, recipe.to_yaml())


__all__ = ["run_stage", "run_recipe", "evaluate", "load_start_model", "read_metrics", "stage_done", "MetricsLog",
           "FAULT_ENV"]
