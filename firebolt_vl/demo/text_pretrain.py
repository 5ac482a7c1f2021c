"""Pretraining the demo's tiny LFM2 on the synthetic text (the stand-in for a pretrained language model).

No pretrained LFM2 exists offline, so the demo's decoder first learns the language of the synthetic world with plain
next-token prediction: the training captions and the training questions (without their answers), each read as
`<|startoftext|> text <|endoftext|>`. The model is saved back in Hugging Face layout (config.json,
model.safetensors, tokenizer) so that `FireboltForConditionalGeneration.from_components` loads it like a hub
checkpoint. The blind and prepend controls start from the same checkpoint.

Glossary: B batch rows, T tokens (right padded), V vocabulary.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F


@dataclass
class TextPretrainConfig:
    epochs: float = 2.0
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    max_length: int = 128


def pretraining_texts(captions: list[str], questions: list[str]) -> list[str]:
    """Captions and question texts (the `<image>` slot and the answers left out), deduplicated in order."""
    texts = [c.strip() for c in captions] + [q.replace("<image>", "").strip() for q in questions]
    return list(dict.fromkeys(t for t in texts if t))


def pretrain_language(language_dir, texts: list[str], cfg: Optional[TextPretrainConfig] = None, seed: int = 0,
                      progress: bool = True, position: int = 0,
                      peak_memory: Optional[Callable[[], float]] = None) -> dict:
    """Train the causal LM saved in `language_dir` on `texts` and save it back in place. Returns stats: losses per
    step, samples/s, tokens/s, seconds."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .vision_pretrain import warmup_cosine

    cfg = cfg or TextPretrainConfig()
    language_dir = Path(language_dir)
    tokenizer = AutoTokenizer.from_pretrained(language_dir)
    model = AutoModelForCausalLM.from_pretrained(language_dir)
    bos = tokenizer.convert_tokens_to_ids("<|startoftext|>")
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs = [[bos] + ids[: cfg.max_length - 2] + [end]
            for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    steps_per_epoch = max(1, math.ceil(len(seqs) / cfg.batch_size))
    total = max(1, int(round(cfg.epochs * steps_per_epoch)))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), fused=True)

    model.train()
    losses: list[float] = []
    samples = tokens = step = 0
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="text pretrain (LFM2)", unit="step", disable=not progress, leave=False,
               position=position)
    while step < total:
        order = torch.randperm(len(seqs), generator=gen).tolist()
        # batches of similar lengths (sorted windows), in shuffled order
        span = cfg.batch_size * 16
        batches = []
        for s in range(0, len(order), span):
            chunk = sorted(order[s : s + span], key=lambda i: len(seqs[i]))
            batches += [chunk[k : k + cfg.batch_size] for k in range(0, len(chunk), cfg.batch_size)]
        for b in torch.randperm(len(batches), generator=gen).tolist():
            if step >= total:
                break
            rows = [seqs[i] for i in batches[b]]
            T = max(len(r) for r in rows)
            ids = torch.full((len(rows), T), pad, dtype=torch.long)  # (B, T)
            mask = torch.zeros((len(rows), T), dtype=torch.long)
            for r, seq in enumerate(rows):
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
            for group in opt.param_groups:
                group["lr"] = cfg.lr * warmup_cosine(step, total, cfg.warmup_ratio)
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
            labels = ids.masked_fill(mask == 0, -100)[:, 1:]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                   ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            samples += len(rows)
            tokens += int(mask.sum())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    seconds = time.perf_counter() - t0
    model.save_pretrained(language_dir)
    tokenizer.save_pretrained(language_dir)
    stats = {"steps": total, "samples": samples, "tokens": tokens, "seconds": seconds, "texts": len(seqs),
             "samples_per_s": samples / max(seconds, 1e-9), "tokens_per_s": tokens / max(seconds, 1e-9),
             "losses": losses, "config": asdict(cfg)}
    if peak_memory is not None:
        stats["peak_memory_mb"] = peak_memory()
    return stats


__all__ = ["TextPretrainConfig", "pretraining_texts", "pretrain_language"]
