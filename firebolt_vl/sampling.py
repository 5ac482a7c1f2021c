"""Token choice shared by `FireboltForConditionalGeneration.generate` and the server's per-row samplers
(serve/batching.py), so that a served row draws exactly what `generate` draws.

    logits (B, V) fp32 -> repetition penalty over each row's own tokens -> argmax, or the warpers (temperature,
    top_k, top_p, min_p, in that order, as transformers applies them) -> softmax -> one multinomial draw.
"""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def sampling_warpers(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                     min_p: float | None = None) -> LogitsProcessorList:
    """transformers' warpers for sampled decoding (an empty list leaves the distribution as it is)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p:
        warpers.append(MinPLogitsWarper(min_p))
    return warpers


def check_repetition_penalty(penalty: float) -> float:
    if penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
    return float(penalty)


def penalise_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty as transformers applies it: the logit of a token the row has seen (seen (B, V) bool)
    is divided by `penalty` when positive, multiplied when negative."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)
