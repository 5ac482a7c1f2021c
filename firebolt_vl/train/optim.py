"""Which parameters train, in which AdamW group, and the learning-rate schedule.

Modules (ModuleLR keys): vision = model.vision (the SigLIP tower), cmm = model.cmm or model.projector (the fusion
module), language = model.language_model (LFM2, embeddings and tied head included). A learning rate of 0 freezes the
module: requires_grad False, and its parameters are not given to the optimizer.

Groups inside a trained module:
    <module>            matrices (ndim >= 2): the stage's weight decay
    <module>.no_decay   biases, norm weights, every other 1-D parameter: no weight decay
    <module>.tag<i>     parameters the SSM code tagged with `p._optim` (S4/S4D/Mamba dynamics: A, dt, B, P, D):
                        the tag's weight_decay (0) and, when the tag sets one, its own lr
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .recipe import MODULES, OptimConfig, RecipeError

_PREFIXES = {"vision": ("vision.",), "cmm": ("cmm.", "projector."), "language": ("language_model.",)}


def module_of(name: str) -> str:
    """Parameter name -> "vision" | "cmm" | "language"."""
    for module, prefixes in _PREFIXES.items():
        if name.startswith(prefixes):
            return module
    raise ValueError(f"parameter {name!r} belongs to no known module (vision / cmm / language)")


def apply_trainable(model: nn.Module, lrs: dict[str, float]) -> dict[str, int]:
    """Set requires_grad per module from the learning rates (0 = frozen); returns trainable parameter counts.

    The vision tower's forward runs under no_grad while `config.freeze_vision` is set, so it is cleared when the
    vision lr is > 0 (and set again when it is 0)."""
    counts = {m: 0 for m in MODULES}
    for name, p in model.named_parameters():
        module = module_of(name)
        train = lrs[module] > 0
        p.requires_grad_(train)
        if train:
            counts[module] += p.numel()
    if hasattr(model, "config") and hasattr(model.config, "freeze_vision"):
        model.config.freeze_vision = not lrs["vision"] > 0
    return counts


def set_train_modes(model: nn.Module, lrs: dict[str, float]) -> None:
    """model.train(), but frozen modules in eval mode (no dropout noise in features they cannot adapt to)."""
    model.train()
    children = {"vision": [getattr(model, "vision", None)],
                "cmm": [getattr(model, "cmm", None), getattr(model, "projector", None)],
                "language": [getattr(model, "language_model", None)]}
    for module, mods in children.items():
        if not lrs[module] > 0:
            for m in mods:
                if m is not None:
                    m.eval()


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def param_groups(model: nn.Module, lrs: dict[str, float], weight_decay: float) -> list[dict]:
    """AdamW parameter groups (see the module docstring). Each group has name, params, lr, weight_decay."""
    norm_params = set()
    for m in model.modules():
        if _is_norm(m):
            norm_params.update(id(p) for p in m.parameters(recurse=False))
    groups: dict[tuple, dict] = {}
    tags: dict[tuple, int] = {}
    for name, p in model.named_parameters():
        module = module_of(name)
        lr = lrs[module]
        if not lr > 0 or not p.requires_grad:
            continue
        tag = getattr(p, "_optim", None)
        if tag:
            key_items = tuple(sorted(tag.items()))
            idx = tags.setdefault((module, key_items), len([k for k in tags if k[0] == module]))
            key = (module, f"tag{idx}")
            spec = {"lr": float(tag.get("lr", lr)), "weight_decay": float(tag.get("weight_decay", weight_decay))}
        elif p.ndim < 2 or name.endswith(".bias") or id(p) in norm_params:
            key, spec = (module, "no_decay"), {"lr": lr, "weight_decay": 0.0}
        else:
            key, spec = (module, ""), {"lr": lr, "weight_decay": weight_decay}
        group = groups.setdefault(key, {"name": ".".join(x for x in key if x), "params": [], "param_names": [],
                                        **spec})
        group["params"].append(p)
        group["param_names"].append(name)
    if not groups:
        raise RecipeError("no trainable parameters: every module has learning rate 0")
    return list(groups.values())


def build_optimizer(groups: list[dict], cfg: OptimConfig, fused: bool = False) -> torch.optim.AdamW:
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, betas=tuple(cfg.betas), eps=cfg.eps, **kwargs)


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    return int(cfg.warmup_steps) if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * total_steps))


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of every group's peak lr before optimizer step `step` (0-based): linear warmup from 1/(w+1) to 1
    over w steps, then cosine / linear decay to min_lr_ratio at total_steps, or constant."""
    w = warmup_steps(cfg, total_steps)
    if step < w:
        return (step + 1) / (w + 1)
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - w) / max(1, total_steps - w))
    if cfg.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def build_scheduler(optimizer, total_steps: int, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))


__all__ = ["module_of", "apply_trainable", "set_train_modes", "param_groups", "build_optimizer", "build_scheduler",
           "lr_factor", "warmup_steps"]
