"""Crash-safe training checkpoints.

Layout of one checkpoint, `<stage dir>/checkpoints/step-00000120/`:
    config.json, model.safetensors, tokenizer + processor files   a complete model directory (`load_model_dir` works)
                          (LoRA stages: a PEFT adapter directory instead, see firebolt_vl.adapters)
    optimizer.pt          {"optimizer": AdamW state, "scheduler": LambdaLR state}   (full, gathered under FSDP)
    trainer_state.json    step, epoch, samples, total_steps, best validation, world size, stage settings
    rank_<r>.pt           per process: RNG states (python, numpy, torch, CUDA) and the data position

Atomicity: everything is written into `.tmp-step-00000120/` (fsynced), then renamed into place; a checkpoint exists
only once complete. A crash or SIGKILL during a save leaves at most a `.tmp-*` directory, which is ignored and
removed at the next start, and the previous checkpoint untouched. Directories that are replaced in place (`best`,
`final`) go aside to `.<name>.old` for the instant of the swap, and a reader falls back to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .dist import DistInfo, barrier

PREFIX = "step-"
STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.pt"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    for root, _, files in os.walk(directory):
        for f in files:
            _fsync_path(Path(root) / f)
    _fsync_path(directory)


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished directory `tmp` to `target`, replacing an existing one (aside as `.<name>.old` meanwhile)."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_path(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def resolve_dir(target: Path) -> Optional[Path]:
    """`target`, or its `.old` copy if a crash struck in the middle of `replace_dir`; None if neither exists."""
    target = Path(target)
    if target.is_dir():
        return target
    old = target.with_name(f".{target.name}.old")
    return old if old.is_dir() else None


@contextlib.contextmanager
def quiet_hf():
    """Silence transformers' progress bars while saving."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def write_model_files(model, processor, state_dict: dict, directory: Path, extra: Optional[dict] = None) -> None:
    """config + safetensors weights (+ tokenizer/processor files, + extra JSON files) into `directory`."""
    with quiet_hf():
        model.save_pretrained(directory, state_dict=state_dict)
    if processor is not None:
        processor.save_pretrained(directory)
    for name, obj in (extra or {}).items():
        (directory / name).write_text(json.dumps(obj, indent=2, default=str))


def save_model_atomic(model, processor, state_dict: dict, target: Path, extra: Optional[dict] = None) -> Path:
    """Write a model directory at `target` via a temp sibling + rename (used for `best` and `final`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_model_files(model, processor, state_dict, tmp, extra)
        fsync_tree(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_model_weights(model: torch.nn.Module, directory) -> None:
    """Load the safetensors weights of a model directory into `model` in place (exact copy). Keys missing from the
    files must be tied to a loaded tensor (e.g. LFM2's lm_head, tied to the embeddings)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{directory}: weights for unknown parameters {unexpected[:5]}")
    own = model.state_dict()
    loaded_ptrs = {own[k].data_ptr() for k in state if k in own}
    untied = [k for k in missing if own[k].data_ptr() not in loaded_ptrs]
    if untied:
        raise ValueError(f"{directory}: no weights for {untied[:5]}")


# ---------------------------------------------------------------------------------------------- RNG
def capture_rng() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- step checkpoints
def list_checkpoints(ckpt_dir, world_size: Optional[int] = None) -> list[tuple[int, Path]]:
    """Complete checkpoints [(step, path)] in step order; with world_size, only those with every rank's file."""
    ckpt_dir = Path(ckpt_dir)
    found = []
    if not ckpt_dir.is_dir():
        return found
    for p in ckpt_dir.iterdir():
        if not (p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()):
            continue
        if not (p / STATE_FILE).is_file() or not (p / OPTIM_FILE).is_file():
            continue
        if world_size is not None and not all((p / f"rank_{r}.pt").is_file() for r in range(world_size)):
            continue
        found.append((int(p.name[len(PREFIX):]), p))
    return sorted(found)


def latest_checkpoint(ckpt_dir, world_size: Optional[int] = None) -> Optional[Path]:
    found = list_checkpoints(ckpt_dir, world_size)
    return found[-1][1] if found else None


def remove_partial(ckpt_dir) -> list[Path]:
    """Delete leftovers of interrupted saves (`.tmp-*`) in a checkpoint folder; returns what was removed."""
    ckpt_dir = Path(ckpt_dir)
    removed = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def gather_model_state(model, unwrapped, fsdp: bool) -> Optional[dict]:
    """Full model state dict on rank 0 (None elsewhere under FSDP; every rank otherwise)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach() for k, v in unwrapped.state_dict().items()}


def gather_optimizer_state(model, optimizer, fsdp: bool) -> dict:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def save_checkpoint(ckpt_dir, step: int, *, model, unwrapped, processor, optimizer, scheduler,
                    trainer_state: dict, rank_state: dict, info: DistInfo, keep_last: int, fsdp: bool = False,
                    fail_hook=None, write_model=None) -> Path:
    """Write checkpoint `step` atomically (every rank calls this). Returns its path. `fail_hook(stage)` is a test
    seam called between the parts of the save. `write_model(directory)` replaces the model files (LoRA stages write
    their PEFT adapter directory instead of the whole model)."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / checkpoint_name(step)
    tmp = ckpt_dir / f".tmp-{final.name}"
    if info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier(info)
    model_state = gather_model_state(model, unwrapped, fsdp) if write_model is None else None
    optim_state = gather_optimizer_state(model, optimizer, fsdp)
    try:
        if info.is_main:
            if write_model is None:
                write_model_files(unwrapped, processor, model_state, tmp)
            else:
                write_model(tmp)
            if fail_hook:
                fail_hook("model")
            torch.save({"optimizer": optim_state, "scheduler": scheduler.state_dict()}, tmp / OPTIM_FILE)
            if fail_hook:
                fail_hook("optimizer")
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2, default=str))
        torch.save(rank_state, tmp / f"rank_{info.rank}.pt")
        barrier(info)
        if info.is_main:
            fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_path(ckpt_dir)
            for _, old in list_checkpoints(ckpt_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier(info)
    return final


def read_checkpoint(path, rank: int) -> tuple[dict, dict, dict]:
    """(trainer_state, rank_state, optimizer file dict) of a checkpoint directory."""
    path = Path(path)
    trainer_state = json.loads((path / STATE_FILE).read_text())
    rank_file = path / f"rank_{rank}.pt"
    if not rank_file.is_file():
        raise ValueError(f"{path} has no state for process {rank}: it was written by "
                         f"{trainer_state.get('world_size')} processes; resume with the same number")
    # our own files: RNG states hold numpy arrays, so the full unpickler is needed
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
    optim = torch.load(path / OPTIM_FILE, map_location="cpu", weights_only=False)
    return trainer_state, rank_state, optim


__all__ = ["checkpoint_name", "list_checkpoints", "latest_checkpoint", "remove_partial", "save_checkpoint",
           "read_checkpoint", "load_model_weights", "save_model_atomic", "replace_dir", "resolve_dir",
           "capture_rng", "restore_rng", "seed_everything"]
