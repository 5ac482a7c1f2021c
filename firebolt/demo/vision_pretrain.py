"""Pretraining the demo's tiny vision tower with SigLIP's sigmoid image-text loss on the synthetic captions.

No pretrained weights exist offline, so the demo trains its own tiny SigLIP dual encoder (`transformers.SiglipModel`
with tiny text + vision configs) and keeps the vision tower, saved in Hugging Face layout (`SiglipVisionModel`,
config.json + model.safetensors) so that `FireboltForConditionalGeneration.from_components` loads it like any hub
checkpoint.

Glossary
    N   images            G   views per image (global view + rows x cols tiles; 5 in the demo)
    S   image side        s   view side (the tower's native size)       P   (view, text) pairs in a batch
    D   embedding width   L   text tokens (padded per batch)

Pairs. Every view is cut exactly as `firebolt.vision.GridVisionEncoder` cuts it at inference (global view first,
then tiles row-major, resized to s), so the tower is trained on the inputs it will see:
    global view          <-> the image's caption
    tile (row, col)      <-> the caption's phrases located in that quadrant ("a red circle, the word 'cat' in blue"),
                             "nothing" for an empty quadrant (2 x 2 grids only: the generator keeps every object
                             inside one quadrant, so the 2 x 2 tiles are the quadrants)

Loss (SigLIP, Zhai et al. 2023): for L2-normalised image and text embeddings x_i, y_j,
    logits_ij = exp(t') x_i . y_j + b          (t', b learnable: SiglipModel.logit_scale / logit_bias, init log 10, -10)
    loss = -1/P sum_ij log sigmoid(z_ij logits_ij),   z_ij = +1 if text j describes view i else -1
Identical texts in a batch ("nothing", "a red circle") are all positives of each other's views rather than false
negatives; otherwise this is exactly SigLIP's pairwise sigmoid loss.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

EMPTY_TILE = "nothing"
_QUADRANTS = ("top left", "top right", "bottom left", "bottom right")  # row-major 2 x 2 order
_PHRASE = re.compile(r"\s*(.+?) at the (top left|top right|bottom left|bottom right)(?:,|\.$|$)")


@dataclass
class VisionPretrainConfig:
    """Sizes and optimisation of the tiny SigLIP dual encoder."""

    hidden: int = 128  # D: vision and text width (SigLIP's text head projects to the vision width)
    layers: int = 4
    heads: int = 4
    patch: int = 8
    text_hidden: int = 128
    text_layers: int = 2
    max_text_len: int = 96
    epochs: float = 4.0
    batch_size: int = 160  # pairs per step
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_ratio: float = 0.08
    max_steps: Optional[int] = None
    global_pairs: bool = True  # also pair the global view with the whole caption (else tiles only)


# ---------------------------------------------------------------------------------------------- captions -> texts
def quadrant_phrases(caption: str) -> dict[str, list[str]]:
    """Split a synthetic caption into its phrases per quadrant, without the location:
    "a red circle at the top left, a blue star at the top left." -> {"top left": ["a red circle", "a blue star"]}."""
    out: dict[str, list[str]] = {q: [] for q in _QUADRANTS}
    for m in _PHRASE.finditer(caption.strip()):
        out[m.group(2)].append(m.group(1).strip())
    return out


def view_texts(caption: str, n_views: int, grid_2x2: bool, global_view: bool) -> list[Optional[str]]:
    """The text of each of the G views (global first), None where no text applies (tiles of other grids)."""
    texts: list[Optional[str]] = [caption.strip()] if global_view else []
    tiles = n_views - len(texts)
    if grid_2x2:
        per = quadrant_phrases(caption)
        texts += [", ".join(per[q]) or EMPTY_TILE for q in _QUADRANTS]
    else:
        texts += [None] * tiles
    return texts


# ---------------------------------------------------------------------------------------------- views
def cut_views(pixels: torch.Tensor, boxes: list[tuple[int, int, int, int]], view_size: int) -> torch.Tensor:
    """(B, 3, S, S) normalised pixels -> (B, G, 3, s, s), as GridVisionEncoder.make_views cuts and resizes them."""
    views = []
    for y0, x0, y1, x1 in boxes:
        v = pixels[:, :, y0:y1, x0:x1]
        if v.shape[-1] != view_size:
            v = F.interpolate(v, size=(view_size, view_size), mode="bilinear", align_corners=False)
        views.append(v)
    return torch.stack(views, dim=1)


def normalize_uint8(images: torch.Tensor, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> torch.Tensor:
    """(N, 3, S, S) uint8 -> float32 normalised like FireboltProcessor.preprocess_image."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.to(torch.float32) / 255.0 - m) / s


# ---------------------------------------------------------------------------------------------- model
def build_siglip(cfg: VisionPretrainConfig, vocab_size: int, view_size: int, pad_token_id: int, seed: int):
    """A tiny `SiglipModel` (random init, seeded) with SigLIP's logit scale / bias initialisation."""
    from transformers import SiglipConfig, SiglipModel

    text = dict(vocab_size=vocab_size, hidden_size=cfg.text_hidden, intermediate_size=2 * cfg.text_hidden,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.heads,
                max_position_embeddings=cfg.max_text_len, projection_size=cfg.hidden, pad_token_id=pad_token_id,
                bos_token_id=None, eos_token_id=None)
    vision = dict(hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden, num_hidden_layers=cfg.layers,
                  num_attention_heads=cfg.heads, image_size=view_size, patch_size=cfg.patch)
    torch.manual_seed(seed)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    return model


def sigmoid_loss(img: torch.Tensor, txt: torch.Tensor, positives: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP pairwise sigmoid loss. img (P, D), txt (U, D) unnormalised; positives (P, U) bool."""
    img = F.normalize(img, dim=-1)
    txt = F.normalize(txt, dim=-1)
    logits = img @ txt.t() * logit_scale.exp() + logit_bias  # (P, U)
    z = positives.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(z * logits).sum() / img.shape[0]


# ---------------------------------------------------------------------------------------------- training
def pretrain_vision(
    images: torch.Tensor,
    captions: list[str],
    tokenizer,
    geometry,
    out_dir,
    cfg: VisionPretrainConfig = VisionPretrainConfig(),
    seed: int = 0,
    val: Optional[tuple[torch.Tensor, list[str]]] = None,
    progress: bool = True,
    on_step: Optional[Callable[[dict], None]] = None,
) -> dict:
    """Train a tiny SigLIP on (view, text) pairs of `images` (N, 3, S, S) uint8 and their `captions`, save the vision
    tower to `out_dir` (HF layout) and return stats: losses per step, samples/s, val retrieval, seconds.

    geometry: anything with image_size, tile_size, tile_overlap, grid_rows, grid_cols, add_global_view, view_size
    (a FireboltConfig or a namespace) - the views are cut as the grid encoder will cut them.
    """
    from tqdm.auto import tqdm

    from ..vision import view_boxes

    boxes = view_boxes(geometry)
    view_size = int(geometry.view_size)
    grid_2x2 = geometry.grid_rows == 2 and geometry.grid_cols == 2
    n_img, G = images.shape[0], len(boxes)

    # every (image, view) pair with a text; texts are deduplicated and tokenised once
    text_ids: dict[str, int] = {}
    pairs = []  # (image index, view index, text id)
    for i, cap in enumerate(captions):
        for g, t in enumerate(view_texts(cap, G, grid_2x2, bool(geometry.add_global_view))):
            if t is not None and (cfg.global_pairs or g > 0 or not geometry.add_global_view):
                pairs.append((i, g, text_ids.setdefault(t, len(text_ids))))
    texts = list(text_ids)
    pad = tokenizer.pad_token_id
    tokens = [tokenizer(t, add_special_tokens=False)["input_ids"][: cfg.max_text_len] for t in texts]
    pairs_t = torch.tensor(pairs, dtype=torch.long)  # (n_pairs, 3)

    model = build_siglip(cfg, len(tokenizer), view_size, pad, seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "logit" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    steps_per_epoch = max(1, len(pairs) // cfg.batch_size)
    total = cfg.max_steps or max(1, int(round(cfg.epochs * steps_per_epoch)))
    warm = max(1, int(cfg.warmup_ratio * total))

    def lr_at(step: int) -> float:
        if step < warm:
            return cfg.lr * (step + 1) / warm
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    def text_batch(ids: list[int]) -> torch.Tensor:
        """Right-padded (U, L) token ids; SigLIP pools the last position, so every row is padded to the same L."""
        L = max(len(tokens[k]) for k in ids)
        out = torch.full((len(ids), L), pad, dtype=torch.long)
        for r, k in enumerate(ids):
            out[r, : len(tokens[k])] = torch.tensor(tokens[k])
        return out

    def encode_texts(ids: list[int]) -> torch.Tensor:
        """(U, D): short and long texts in separate calls so tile phrases do not pay for caption padding."""
        lengths = torch.tensor([len(tokens[k]) for k in ids])
        order = lengths.argsort()
        out = [None] * len(ids)
        chunks = [order[lengths[order] <= 24], order[lengths[order] > 24]]
        for chunk in chunks:
            if len(chunk) == 0:
                continue
            emb = model.get_text_features(input_ids=text_batch([ids[int(j)] for j in chunk]))
            emb = getattr(emb, "pooler_output", emb)
            for r, j in enumerate(chunk.tolist()):
                out[j] = emb[r]
        return torch.stack(out)

    def encode_views(img_idx: torch.Tensor, view_idx: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        views = cut_views(normalize_uint8(source[img_idx]), boxes, view_size)  # (P, G, 3, s, s)
        chosen = views[torch.arange(len(img_idx)), view_idx]  # (P, 3, s, s)
        emb = model.get_image_features(pixel_values=chosen)
        return getattr(emb, "pooler_output", emb)

    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    seen = 0
    bar = tqdm(total=total, desc="vision pretrain (SigLIP)", unit="step", disable=not progress, leave=False)
    step = 0
    while step < total:
        perm = torch.randperm(len(pairs), generator=gen)
        for k in range(steps_per_epoch):
            if step >= total:
                break
            batch = pairs_t[perm[k * cfg.batch_size : (k + 1) * cfg.batch_size]]  # (P, 3)
            uniq, inverse = torch.unique(batch[:, 2], return_inverse=True)  # texts of the batch, once each
            positives = inverse.unsqueeze(1) == torch.arange(len(uniq)).unsqueeze(0)  # (P, U)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            img = encode_views(batch[:, 0], batch[:, 1], images)
            txt = encode_texts(uniq.tolist())
            loss = sigmoid_loss(img, txt, positives, model.logit_scale, model.logit_bias)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            seen += len(batch)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if on_step is not None:
                on_step({"step": step, "loss": losses[-1], "lr": lr_at(step - 1)})
    bar.close()
    seconds = time.perf_counter() - t0

    model.eval()
    stats = {"steps": total, "pairs": len(pairs), "texts": len(texts), "losses": losses, "seconds": seconds,
             "samples_per_s": seen / max(seconds, 1e-9), "config": asdict(cfg)}
    if val is not None:
        stats["val"] = retrieval_accuracy(model, val[0], val[1], tokenizer, geometry, cfg)
    out_dir = Path(out_dir)
    model.vision_model.save_pretrained(out_dir)  # a SiglipVisionModel: config.json + model.safetensors
    (out_dir / "siglip_pretrain.json").write_text(json.dumps({k: v for k, v in stats.items() if k != "losses"},
                                                             indent=2))
    return stats


@torch.no_grad()
def retrieval_accuracy(model, images: torch.Tensor, captions: list[str], tokenizer, geometry,
                       cfg: VisionPretrainConfig) -> dict:
    """Held-out check of the dual encoder: for each tile, is its own quadrant text the best match among all distinct
    tile texts of the set (top-1, %)? And the same for global views among the captions."""
    from ..vision import view_boxes

    boxes = view_boxes(geometry)
    grid_2x2 = geometry.grid_rows == 2 and geometry.grid_cols == 2
    G = len(boxes)
    per_view = [view_texts(c, G, grid_2x2, bool(geometry.add_global_view)) for c in captions]
    feats = []
    for i in range(0, images.shape[0], 64):
        views = cut_views(normalize_uint8(images[i : i + 64]), boxes, int(geometry.view_size))
        b = views.shape[0]
        emb = model.get_image_features(pixel_values=views.flatten(0, 1))
        emb = getattr(emb, "pooler_output", emb)
        feats.append(F.normalize(emb, dim=-1).view(b, G, -1))
    feats = torch.cat(feats)  # (N, G, D)
    out = {}
    for name, gs in (("global", [0] if geometry.add_global_view else []),
                     ("tiles", list(range(1 if geometry.add_global_view else 0, G)) if grid_2x2 else [])):
        if not gs:
            continue
        texts = sorted({per_view[i][g] for i in range(len(captions)) for g in gs})
        index = {t: k for k, t in enumerate(texts)}
        pad = tokenizer.pad_token_id
        embs = []
        for j in range(0, len(texts), 128):
            chunk = [tokenizer(t, add_special_tokens=False)["input_ids"][: cfg.max_text_len] for t in texts[j : j + 128]]
            L = max(len(c) for c in chunk)
            ids = torch.full((len(chunk), L), pad, dtype=torch.long)
            for r, c in enumerate(chunk):
                ids[r, : len(c)] = torch.tensor(c)
            e = model.get_text_features(input_ids=ids)
            embs.append(F.normalize(getattr(e, "pooler_output", e), dim=-1))
        tx = torch.cat(embs)  # (U, D)
        hits = []
        for g in gs:
            best = (feats[:, g] @ tx.t()).argmax(-1)  # (N,)
            gold = torch.tensor([index[per_view[i][g]] for i in range(len(captions))])
            hits.append((best == gold).float())
        out[name] = {"top1": 100.0 * float(torch.cat(hits).mean()), "candidates": len(texts)}
    return out


__all__ = ["VisionPretrainConfig", "quadrant_phrases", "view_texts", "cut_views", "normalize_uint8", "build_siglip",
           "sigmoid_loss", "pretrain_vision", "retrieval_accuracy", "EMPTY_TILE"]
