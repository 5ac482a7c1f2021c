"""Direct Preference Optimization (Rafailov et al. 2023) on preference pairs.

    loss = -log sigmoid(beta * ((log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))))

log pi(y|x) is the sum of the answer tokens' log-probabilities (the final assistant turn and its end token; the
prompt, the image tokens and earlier turns are not counted). The reference is the stage's starting weights: with LoRA
the same model with its adapters disabled (no second copy), otherwise a frozen copy loaded from the start directory.
Rewards: beta * (log pi - log ref) of each answer; the margin is chosen - rejected; accuracy = share of pairs whose
margin is > 0 (0 at the start, where every margin is 0). `logp_accuracy` is the policy's own preference: the share of
pairs with log pi(y_c|x) > log pi(y_r|x), whose starting value is the starting model's.

`rpo_alpha` > 0 adds alpha x the chosen answer's mean token negative log-likelihood to each pair's loss (RPO, Pang et
al. 2024; TRL's `rpo_alpha`): plain DPO can lower the chosen answer's likelihood along with the rejected one's
("likelihood displacement"), and on a model that cannot yet tell the answers apart that costs answer accuracy.

Records: preference records (MMPR: image, question, chosen, rejected; `record["rejected"]`) or conversations whose
final assistant turn is the chosen answer, with a `rejected` alternative for that turn (`record["rejected"]` or, for
the conversation reader, `record["meta"]["rejected"]`; a string or a {"from": "gpt", "value": ...} turn).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .collate import IGNORE_INDEX, Encoded, SkipExample, collate, encode_conversation


class PreferenceDataError(ValueError):
    """A DPO stage got a record without a rejected answer."""


@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded
    index: int = -1

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated


def rejected_of(rec: dict) -> Optional[str]:
    """The rejected answer of a record, or None."""
    r = rec.get("rejected")
    if r is None:
        r = (rec.get("meta") or {}).get("rejected")
    if isinstance(r, dict):
        r = r.get("value", r.get("content"))
    return r if isinstance(r, str) and r.strip() else None


def _last_turn_only(ex: Encoded) -> Encoded:
    """Keep the labels of the last supervised run (the final assistant answer + its end token)."""
    sup = np.nonzero(ex.labels != IGNORE_INDEX)[0]
    if sup.size:
        breaks = np.nonzero(np.diff(sup) > 1)[0]
        start = sup[breaks[-1] + 1] if breaks.size else sup[0]
        ex.labels[:start] = IGNORE_INDEX
    return ex


class PairEncodeFn:
    """Picklable record -> EncodedPair (runs in data-loader workers)."""

    def __init__(self, processor, max_length: int):
        self.processor, self.max_length = processor, max_length

    def __call__(self, rec: dict) -> EncodedPair:
        rejected = rejected_of(rec)
        conv = rec["conversations"]
        if rejected is None:
            raise PreferenceDataError(
                f"{rec.get('source', 'data')} record {rec.get('id', rec.get('index'))}: no rejected answer; an "
                f"`objective: dpo` stage needs preference pairs (MMPR: image, question, chosen, rejected; or "
                f"conversations with a `rejected` alternative to the final turn)")
        last = max(i for i, t in enumerate(conv) if t.get("from", t.get("role")) in ("gpt", "assistant"))
        if last != len(conv) - 1:
            raise SkipExample("no_answer", "the conversation does not end with an assistant turn")
        alt = [*conv[:last], {**conv[last], "value": rejected}]
        pair = []
        for turns in (conv, alt):
            ex = encode_conversation(self.processor, turns, rec.get("image"), self.max_length, "assistant")
            pair.append(_last_turn_only(ex))
        if pair[0].n_targets == 0 or pair[1].n_targets == 0:
            raise SkipExample("too_long", "an answer of the pair is cut off by max_length")
        return EncodedPair(pair[0], pair[1], int(rec.get("index", -1)))


def collate_pairs(pairs: list[EncodedPair], processor) -> dict:
    """B pairs -> one batch of 2B rows (chosen rows 0..B-1, rejected rows B..2B-1); `n_pairs` = B."""
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], processor)
    batch["n_pairs"] = len(pairs)
    return batch


def sequence_logps(model, batch: dict, pooled: bool = False) -> torch.Tensor:
    """(rows,) sum of the log-probabilities of each row's supervised tokens (fp32)."""
    kwargs = {"pool_mask": batch["pool_mask"]} if pooled else {}
    labels = batch["labels"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch.get("pixel_values"), labels=labels, supervised_logits_only=True, **kwargs)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    rows = torch.nonzero(mask)[:, 0]  # row of each supervised token, in the order of the logits (row-major)
    logp = torch.log_softmax(out.logits.float(), -1).gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)  # (N,)
    return torch.zeros(labels.shape[0], dtype=torch.float32, device=logp.device).index_add(0, rows, logp)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses (B,), chosen rewards (B,), rejected rewards (B,) from summed answer log-probs (B,)."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()


def answer_tokens(batch: dict) -> torch.Tensor:
    """(rows,) number of supervised (answer) tokens of each row."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)


STAT_KEYS = ("chosen_reward", "rejected_reward", "reward_margin", "pref_accuracy", "chosen_logp", "rejected_logp",
             "logp_accuracy")


def pair_step(model, ref_logps_fn, batch: dict, beta: float, pooled: bool = False, rpo_alpha: float = 0.0):
    """Summed loss over the batch's pairs (with grad): DPO + rpo_alpha x the chosen answers' mean token NLL; and the
    summed statistics {STAT_KEYS: float}."""
    b = batch["n_pairs"]
    ref = ref_logps_fn(batch)  # (2B,) no grad
    pol = sequence_logps(model, batch, pooled)  # (2B,)
    losses, rc, rr = dpo_loss(pol[:b], pol[b:], ref[:b], ref[b:], beta)  # (B,) each
    if rpo_alpha:
        losses = losses - rpo_alpha * pol[:b] / answer_tokens(batch)[:b].clamp_min(1)
    pc, pr = pol[:b].detach(), pol[b:].detach()
    stats = {"chosen_reward": float(rc.sum()), "rejected_reward": float(rr.sum()),
             "reward_margin": float((rc - rr).sum()), "pref_accuracy": float((rc > rr).float().sum()),
             "chosen_logp": float(pc.sum()), "rejected_logp": float(pr.sum()),
             "logp_accuracy": float((pc > pr).float().sum())}
    return losses.sum(), stats


def mean_stats(sums: dict, n: float) -> dict:
    return {k: (sums.get(k, 0.0) / n if n else float("nan")) for k in STAT_KEYS}


@torch.no_grad()
def evaluate_pairs(model, processor, readers, ref_logps_fn, *, beta: float, max_length: int, batch_size: int,
                   max_samples: Optional[int] = None, pooled: bool = False, rpo_alpha: float = 0.0) -> dict:
    """The stage's loss, rewards, margin and preference accuracies over validation pairs (single process, file
    order)."""
    encode = PairEncodeFn(processor, max_length)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, n, sums = 0.0, 0, {}

    def run(buf):
        nonlocal total, n
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in collate_pairs(buf, processor).items()}
        loss, stats = pair_step(model, ref_logps_fn, batch, beta, pooled, rpo_alpha)
        total += float(loss)
        n += len(buf)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v

    buf = []
    for reader in readers:
        for rec in reader:
            if max_samples is not None and n + len(buf) >= max_samples:
                break
            try:
                buf.append(encode(rec))
            except SkipExample:
                continue
            if len(buf) == batch_size:
                run(buf)
                buf = []
    if buf:
        run(buf)
    if was_training:
        model.train()
    loss = total / n if n else float("nan")
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)) if n else float("nan"), "val_pairs": n,
            **{f"val_{k}": v for k, v in mean_stats(sums, n).items()}}


__all__ = ["EncodedPair", "PairEncodeFn", "PreferenceDataError", "collate_pairs", "sequence_logps", "dpo_loss",
           "answer_tokens", "pair_step", "evaluate_pairs", "rejected_of", "STAT_KEYS"]
