"""Per-row decoding state for continuous batching: merging and splitting batch caches, and sampling row by row.

Glossary
    B rows of the running batch   B' rows joining it   T, T' their cached lengths (left-padded)   H KV heads
    Dh head size   D decoder width   L conv window   G grids   H_c, Dh_c CMM heads and head size   V vocabulary

A running batch is one `FireboltCache` whose rows are left padded to a common length T (attention mask 0 on the
padding, position ids per row), the layout `generate` already uses for left-padded prompts. Rows join with
`merge_caches` and leave with `select_rows`; both are exact:

    decoder, attention layer (DynamicLayer)   keys, values (B, H, T, Dh): the shorter side is padded on the left with
                                              zeros that the attention mask (0 there) hides; rows are concatenated.
    decoder, conv layer (LinearAttentionLayer) conv_states (B, D, L): fixed size, no time axis: concatenated.
    attention_mask (B, T), positions (B,)     padded on the left with 0 / concatenated.
    CMM GridMemory keys (B, H_c, G, Dh_c), values (B, G, D), present (B,): concatenated; a side without any image gets
                                              zero keys/values with present False, what the prefill gives a text row
                                              that shares its batch with an image row.
    CMM SSM state, a tuple of (B, ...) tensors concatenated (it has no time axis).

Other cache layer types (sliding-window, static, quantized) are refused with a TypeError: left padding would shift a
sliding window, so no exact merge exists for them here; serve such decoders with `--scheduler static`.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionLayer

from ..cmm import GridMemory
from ..modeling import FireboltCache
from ..sampling import check_repetition_penalty, penalise_repeats, sampling_warpers


def _pad_time(x: torch.Tensor, T: int, dim: int) -> torch.Tensor:
    """Left-pad x with zeros along `dim` to length T."""
    n = T - x.shape[dim]
    if n == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [n, 0]  # F.pad lists the last dimension first
    return F.pad(x, pad)


def _check_layer(layer) -> None:
    if isinstance(layer, DynamicSlidingWindowLayer) or not isinstance(layer, (DynamicLayer, LinearAttentionLayer)):
        raise TypeError(
            f"continuous batching merges only DynamicLayer (KV) and LinearAttentionLayer (conv state) caches, got "
            f"{type(layer).__name__}: serve this decoder with --scheduler static"
        )


def _empty_memory(like: GridMemory, rows: int) -> GridMemory:
    """Zero grid memory for `rows` rows without an image (present False), shaped like `like`."""
    keys = like.keys.new_zeros(rows, *like.keys.shape[1:])  # (rows, H_c, G, Dh_c)
    values = like.values.new_zeros(rows, *like.values.shape[1:])  # (rows, G, D)
    return GridMemory(keys, values, torch.zeros(rows, dtype=torch.bool, device=like.present.device))


def _merge_memory(a: GridMemory | None, b: GridMemory | None, rows_a: int, rows_b: int) -> GridMemory | None:
    if a is None and b is None:
        return None
    a = a if a is not None else _empty_memory(b, rows_a)
    b = b if b is not None else _empty_memory(a, rows_b)
    tables = None  # the FiLM tables are recomputed by the next step unless both sides have them from the same weights
    if a.film_tables is not None and b.film_tables is not None and a.film_key == b.film_key:
        tables = tuple(torch.cat([x, y]) for x, y in zip(a.film_tables, b.film_tables))
    return GridMemory(torch.cat([a.keys, b.keys]), torch.cat([a.values, b.values]), torch.cat([a.present, b.present]),
                      tables, a.film_key if tables is not None else None)


def merge_caches(a: FireboltCache, b: FireboltCache) -> FireboltCache:
    """Rows of `b` (B', T') appended to the running batch `a` (B, T): returns `a`, now (B + B', max(T, T'))."""
    B, Bn = a.attention_mask.shape[0], b.attention_mask.shape[0]
    T = max(a.attention_mask.shape[1], b.attention_mask.shape[1])
    for la, lb in zip(a.lm.layers, b.lm.layers, strict=True):
        _check_layer(la)
        _check_layer(lb)
        if isinstance(la, LinearAttentionLayer):  # conv_states[i] (B, D, L), no time axis
            for i in range(la.number_of_states):
                if la.is_conv_states_initialized[i]:
                    la.conv_states[i] = torch.cat([la.conv_states[i], lb.conv_states[i]])
                if la.is_recurrent_states_initialized[i]:
                    la.recurrent_states[i] = torch.cat([la.recurrent_states[i], lb.recurrent_states[i]])
        elif la.is_initialized:  # keys / values (B, H, T, Dh): left-pad the time axis to T
            la.keys = torch.cat([_pad_time(la.keys, T, 2), _pad_time(lb.keys, T, 2)])
            la.values = torch.cat([_pad_time(la.values, T, 2), _pad_time(lb.values, T, 2)])
    a.attention_mask = torch.cat([_pad_time(a.attention_mask, T, 1), _pad_time(b.attention_mask, T, 1)])  # (B+B', T)
    a.positions = torch.cat([a.positions, b.positions])  # (B+B',)
    a.memory = _merge_memory(a.memory, b.memory, B, Bn)
    if a.ssm_state is not None or b.ssm_state is not None:
        a.ssm_state = tuple(torch.cat([x, y]) for x, y in zip(a.ssm_state, b.ssm_state, strict=True))
    return a


def select_rows(cache: FireboltCache, keep: list[int]) -> FireboltCache:
    """Only the rows `keep` (in that order) stay; leading columns that are padding in every remaining row are cut, so
    the batch does not keep the length of rows that have left."""
    idx = torch.tensor(keep, dtype=torch.long, device=cache.attention_mask.device)
    mask = cache.attention_mask.index_select(0, idx)  # (B_keep, T)
    start = int(mask.any(0).long().argmax()) if mask.numel() else 0  # first column some row uses
    for layer in cache.lm.layers:
        _check_layer(layer)
        if isinstance(layer, LinearAttentionLayer):
            for i in range(layer.number_of_states):
                if layer.is_conv_states_initialized[i]:
                    layer.conv_states[i] = layer.conv_states[i].index_select(0, idx)
                if layer.is_recurrent_states_initialized[i]:
                    layer.recurrent_states[i] = layer.recurrent_states[i].index_select(0, idx)
        elif layer.is_initialized:  # (B, H, T, Dh) -> (B_keep, H, T - start, Dh)
            layer.keys = layer.keys.index_select(0, idx)[:, :, start:]
            layer.values = layer.values.index_select(0, idx)[:, :, start:]
    cache.attention_mask = mask[:, start:]
    cache.positions = cache.positions.index_select(0, idx)
    if cache.memory is not None:
        cache.memory = cache.memory.index_select(idx)
    if cache.ssm_state is not None:
        cache.ssm_state = tuple(t.index_select(0, idx) for t in cache.ssm_state)
    return cache


class RowSampler:
    """One row's token choice, the same operations `model.generate` applies to a batch of one: logits in fp32,
    repetition penalty over the row's own tokens (prompt, then answer), then argmax, or the warpers (temperature,
    top_p, min_p) and one `torch.multinomial` draw from the row's own generator. A row seeded with s therefore draws
    what `generate(..., generator=torch.Generator().manual_seed(s))` draws for that prompt alone."""

    def __init__(self, params, prompt_ids: list[int], device: torch.device):
        self.greedy = params.greedy
        self.penalty = check_repetition_penalty(params.repetition_penalty)
        self.prompt_ids = prompt_ids
        self.seen: torch.Tensor | None = None  # (1, V) bool, made on the first call
        self.warpers = None
        self.generator = None
        if not self.greedy:
            self.warpers = sampling_warpers(params.temperature, None, params.top_p, params.min_p or None)
            seed = params.seed if params.seed is not None else random.getrandbits(63)
            self.generator = torch.Generator(device=device).manual_seed(seed)

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: such rows are chosen together in one batched argmax."""
        return self.greedy and self.penalty == 1.0

    def __call__(self, logits: torch.Tensor) -> int:
        """logits (1, V) of this row -> the chosen token id."""
        logits = logits.float()
        if self.penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
                self.seen[0, torch.tensor(self.prompt_ids, device=logits.device)] = True
            logits = penalise_repeats(logits, self.seen, self.penalty)
        if self.greedy:
            token = int(logits.argmax(-1))
        else:
            probs = self.warpers(None, logits).softmax(-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        if self.seen is not None:
            self.seen[0, token] = True
        return token


def choose_tokens(samplers: list[RowSampler], logits: torch.Tensor) -> list[int]:
    """logits (B, V) of the running batch -> one token per row: plain greedy rows in one argmax, the others row by
    row (own penalty history, own generator)."""
    tokens: list[int | None] = [None] * len(samplers)
    plain = [i for i, s in enumerate(samplers) if s.plain_greedy]
    if plain:
        idx = torch.tensor(plain, device=logits.device)
        for i, t in zip(plain, logits.index_select(0, idx).float().argmax(-1).tolist()):
            tokens[i] = t
    for i, s in enumerate(samplers):
        if tokens[i] is None:
            tokens[i] = s(logits[i : i + 1])
    return tokens
