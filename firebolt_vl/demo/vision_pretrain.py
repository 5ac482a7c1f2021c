"""Pretraining the demo's tiny vision tower with SigLIP's sigmoid image-text loss on the synthetic captions.

No pretrained weights exist offline, so the demo trains its own tiny SigLIP dual encoder (`transformers.SiglipModel`
with tiny text + vision configs) and keeps the vision tower, saved in Hugging Face layout (`SiglipVisionModel`,
config.json + model.safetensors) so that `FireboltForConditionalGeneration.from_components` loads it like any hub
checkpoint.

Glossary
    N   images            G   views per image (global view + rows x cols tiles; 5 in the demo)
    S   image side        s   view side (the tower's native size)       P   (view, text) pairs in a batch
    D   embedding width   L   text tokens (padded per batch)

Pairs. Every view is cut exactly as `firebolt_vl.vision.GridVisionEncoder` cuts it at inference (global view first,
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
    # SigLIP's logit temperature t and bias b at init. SigLIP uses t = 10, b = -10 for batches of ~32k where nearly
    # every pair is negative; with ~100 texts per step and 1-3 positives per view, b = -10 leaves every positive at
    # ~zero probability and Adam moves b by only ~lr per step, so the demo starts b near -log(texts per step).
    logit_scale_init: float = 10.0
    logit_bias_init: float = -10.0


# ---------------------------------------------------------------------------------------------- captions -> texts
def caption_phrases(caption: str) -> list[tuple[str, str]]:
    """The phrases of a synthetic caption with their quadrant, in caption order:
    "a red circle at the top left, a blue star at the bottom right." -> [("a red circle", "top left"), ...]."""
    return [(m.group(1).strip(), m.group(2)) for m in _PHRASE.finditer(caption.strip())]


def quadrant_phrases(caption: str) -> dict[str, list[str]]:
    """Split a synthetic caption into its phrases per quadrant, without the location:
    "a red circle at the top left, a blue star at the top left." -> {"top left": ["a red circle", "a blue star"]}."""
    out: dict[str, list[str]] = {q: [] for q in _QUADRANTS}
    for phrase, quadrant in caption_phrases(caption):
        out[quadrant].append(phrase)
    return out


def view_texts(caption: str, n_views: int, grid_2x2: bool, global_view: bool) -> list[Optional[list[str]]]:
    """The texts that describe each of the G views (global first), None where none applies (tiles of other grids):
    the global view <-> every phrase of the caption ("a red circle", without the location); a 2 x 2 tile <-> the
    phrases of its quadrant, or ["nothing"] for an empty quadrant."""
    texts: list[Optional[list[str]]] = []
    if global_view:
        texts.append(list(dict.fromkeys(p for p, _ in caption_phrases(caption))) or [EMPTY_TILE])
    tiles = n_views - len(texts)
    if grid_2x2:
        per = quadrant_phrases(caption)
        texts += [per[q] or [EMPTY_TILE] for q in _QUADRANTS]
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


def cut_view_per_row(images: torch.Tensor, view_idx: torch.Tensor, boxes: list[tuple[int, int, int, int]],
                     view_size: int) -> torch.Tensor:
    """(P, 3, S, S) uint8 images and (P,) view indices -> (P, 3, s, s) normalised pixels: row p is view view_idx[p]
    of `cut_views(normalize_uint8(images), ...)`, the same values, without normalising, cutting and resizing the
    views a step does not use (a pretraining step pairs one view per image)."""
    out = torch.empty(images.shape[0], images.shape[1], view_size, view_size)
    for g in view_idx.unique().tolist():
        rows = (view_idx == g).nonzero().squeeze(1)
        y0, x0, y1, x1 = boxes[g]
        out[rows] = cut_views(normalize_uint8(images[rows, :, y0:y1, x0:x1]), [(0, 0, y1 - y0, x1 - x0)],
                              view_size)[:, 0]
    return out


def normalize_uint8(images: torch.Tensor, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> torch.Tensor:
    """(N, 3, S, S) uint8 -> float32 normalised like FireboltProcessor.preprocess_image."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.to(torch.float32) / 255.0 - m) / s


# ---------------------------------------------------------------------------------------------- model
def build_siglip(cfg: VisionPretrainConfig, vocab_size: int, view_size: int, pad_token_id: int, seed: int):
    """A tiny `SiglipModel` (random init, seeded) with the configured logit scale / bias initialisation."""
    from transformers import SiglipConfig, SiglipModel

    text = dict(vocab_size=vocab_size, hidden_size=cfg.text_hidden, intermediate_size=2 * cfg.text_hidden,
                num_hidden_layers=cfg.text_layers, num_attention_heads=max(1, cfg.text_hidden // 32),
                max_position_embeddings=cfg.max_text_len, projection_size=cfg.hidden, pad_token_id=pad_token_id,
                bos_token_id=None, eos_token_id=None)
    vision = dict(hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden, num_hidden_layers=cfg.layers,
                  num_attention_heads=cfg.heads, image_size=view_size, patch_size=cfg.patch)
    torch.manual_seed(seed)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(cfg.logit_scale_init))
        model.logit_bias.fill_(cfg.logit_bias_init)
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
def warmup_cosine(step: int, total: int, warmup_ratio: float) -> float:
    """The demo pretraining schedule's factor at `step` of `total`: linear warmup over max(1, int(ratio * total))
    steps reaching 1 at the last warmup step, then a cosine to 0.

    Kept apart from the trainer's `lr_factor` (whose warmup reaches 1 one step later): the demo's figures were
    measured with this one, and with `lr_factor` instead the whole demo ended 12.6 points lower (the outcome is that
    sensitive to small changes upstream; docs/demo/DIAGNOSIS.md, session 7)."""
    warm = max(1, int(warmup_ratio * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def phrase_tokens(tokenizer, text: str, max_len: int) -> list[int]:
    """A phrase's ids followed by the end token: SigLIP's text tower pools the last position, which is then the
    same token for every phrase (read after the whole phrase), like SigLIP's own end-of-text token."""
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return tokenizer(text, add_special_tokens=False)["input_ids"][: max_len - 1] + [end]


def encode_phrases(model, token_lists: list[list[int]], pad: int) -> torch.Tensor:
    """(U, D) text features: rows left-padded (the end token last), padding masked out."""
    L = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), L), pad, dtype=torch.long)  # (U, L)
    mask = torch.zeros((len(token_lists), L), dtype=torch.long)
    for r, t in enumerate(token_lists):
        ids[r, L - len(t) :] = torch.tensor(t, dtype=torch.long)
        mask[r, L - len(t) :] = 1
    return _features(model.get_text_features(input_ids=ids, attention_mask=mask))


def _features(out) -> torch.Tensor:
    return getattr(out, "pooler_output", out)


def pretrain_vision(
    images: torch.Tensor,
    captions: list[str],
    tokenizer,
    geometry,
    out_dir,
    cfg: Optional[VisionPretrainConfig] = None,
    seed: int = 0,
    val: Optional[tuple[torch.Tensor, list[str]]] = None,
    progress: bool = True,
    on_step: Optional[Callable[[dict], None]] = None,
    position: int = 0,
) -> dict:
    """Train a tiny SigLIP on the views of `images` (N, 3, S, S) uint8 and the phrases of their `captions`, save the
    vision tower to `out_dir` (HF layout) and return stats: losses per step, views/s, held-out phrase precision.

    geometry: anything with image_size, tile_size, tile_overlap, grid_rows, grid_cols, add_global_view, view_size
    (a FireboltConfig or a namespace): the views are cut as the grid encoder will cut them.
    Each step samples `batch_size` views; the texts of the step are the distinct phrases of those views, and a
    (view, phrase) pair is positive when the phrase describes the view (a view has one or more phrases).
    """
    from tqdm.auto import tqdm

    from ..vision import view_boxes

    cfg = cfg or VisionPretrainConfig()
    boxes = view_boxes(geometry)
    view_size = int(geometry.view_size)
    grid_2x2 = geometry.grid_rows == 2 and geometry.grid_cols == 2
    use_global = bool(geometry.add_global_view)

    phrase_ids: dict[str, int] = {}
    views, view_phrases = [], []  # (image, view) and the phrase ids describing it
    for i, cap in enumerate(captions):
        for g, texts in enumerate(view_texts(cap, len(boxes), grid_2x2, use_global)):
            if texts is None or (g == 0 and use_global and not cfg.global_pairs):
                continue
            views.append((i, g))
            view_phrases.append(sorted({phrase_ids.setdefault(t, len(phrase_ids)) for t in texts}))
    if not views:
        raise ValueError("vision pretraining: no (view, text) pairs; the captions hold no located phrases")
    pad = tokenizer.pad_token_id
    tokens = [phrase_tokens(tokenizer, t, cfg.max_text_len) for t in phrase_ids]
    views_t = torch.tensor(views, dtype=torch.long)  # (n_views, 2)

    model = build_siglip(cfg, len(tokenizer), view_size, pad, seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "logit" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    steps_per_epoch = max(1, len(views) // cfg.batch_size)
    total = cfg.max_steps or max(1, int(round(cfg.epochs * steps_per_epoch)))

    def lr_at(step: int) -> float:
        return cfg.lr * warmup_cosine(step, total, cfg.warmup_ratio)

    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    seen = 0
    bar = tqdm(total=total, desc="vision pretrain (SigLIP)", unit="step", disable=not progress, leave=False,
               position=position)
    step = 0
    while step < total:
        perm = torch.randperm(len(views), generator=gen)
        for k in range(steps_per_epoch):
            if step >= total:
                break
            rows = perm[k * cfg.batch_size : (k + 1) * cfg.batch_size]  # (P,)
            batch = views_t[rows]  # (P, 2)
            uniq = sorted({u for r in rows.tolist() for u in view_phrases[r]})  # the step's texts (U,)
            col = {u: j for j, u in enumerate(uniq)}
            positives = torch.zeros(len(rows), len(uniq), dtype=torch.bool)  # (P, U)
            for a, r in enumerate(rows.tolist()):
                positives[a, [col[u] for u in view_phrases[r]]] = True
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            pixels = cut_view_per_row(images[batch[:, 0]], batch[:, 1], boxes, view_size)  # (P, 3, s, s)
            img = _features(model.get_image_features(pixel_values=pixels))
            txt = encode_phrases(model, [tokens[u] for u in uniq], pad)
            loss = sigmoid_loss(img, txt, positives, model.logit_scale, model.logit_bias)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            seen += len(rows)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if on_step is not None:
                on_step({"step": step, "loss": losses[-1], "lr": lr_at(step - 1)})
    bar.close()
    seconds = time.perf_counter() - t0

    model.eval()
    stats = {"steps": total, "views": len(views), "phrases": len(phrase_ids), "losses": losses, "seconds": seconds,
             "samples_per_s": seen / max(seconds, 1e-9), "config": asdict(cfg)}
    if val is not None:
        stats["val"] = phrase_precision(model, val[0], val[1], tokenizer, geometry, cfg)
    out_dir = Path(out_dir)
    model.vision_model.save_pretrained(out_dir)  # a SiglipVisionModel: config.json + model.safetensors
    (out_dir / "siglip_pretrain.json").write_text(json.dumps({k: v for k, v in stats.items() if k != "losses"},
                                                             indent=2))
    return stats


@torch.no_grad()
def phrase_precision(model, images: torch.Tensor, captions: list[str], tokenizer, geometry,
                     cfg: VisionPretrainConfig) -> dict:
    """Held-out check of the dual encoder: rank every distinct phrase of the held-out set (per view kind) for each
    view; precision@k with k = the view's number of phrases (100 = every phrase of the view ranked first)."""
    from ..vision import view_boxes

    boxes = view_boxes(geometry)
    grid_2x2 = geometry.grid_rows == 2 and geometry.grid_cols == 2
    use_global = bool(geometry.add_global_view)
    per_view = [view_texts(c, len(boxes), grid_2x2, use_global) for c in captions]
    feats = []
    for i in range(0, images.shape[0], 64):
        views = cut_views(normalize_uint8(images[i : i + 64]), boxes, int(geometry.view_size))
        b = views.shape[0]
        emb = _features(model.get_image_features(pixel_values=views.flatten(0, 1)))
        feats.append(F.normalize(emb, dim=-1).view(b, len(boxes), -1))
    feats = torch.cat(feats)  # (N, G, D)
    kinds = {"global": [0] if use_global else [],
             "tiles": list(range(int(use_global), len(boxes))) if grid_2x2 else []}
    out = {}
    for name, gs in kinds.items():
        if not gs:
            continue
        phrases = sorted({t for i in range(len(captions)) for g in gs for t in per_view[i][g]})
        index = {t: k for k, t in enumerate(phrases)}
        pad = tokenizer.pad_token_id
        embs = []
        for j in range(0, len(phrases), 256):
            toks = [phrase_tokens(tokenizer, t, cfg.max_text_len) for t in phrases[j : j + 256]]
            embs.append(F.normalize(encode_phrases(model, toks, pad), dim=-1))
        tx = torch.cat(embs)  # (U, D)
        precision = []
        for g in gs:
            scores = feats[:, g] @ tx.t()  # (N, U)
            for i in range(len(captions)):
                gold = {index[t] for t in per_view[i][g]}
                top = scores[i].topk(len(gold)).indices.tolist()
                precision.append(len(gold.intersection(top)) / len(gold))
        out[name] = {"precision": 100.0 * float(np.mean(precision)), "phrases": len(phrases)}
    return out


__all__ = ["VisionPretrainConfig", "caption_phrases", "quadrant_phrases", "view_texts", "cut_views", "cut_view_per_row",
           "normalize_uint8", "build_siglip", "sigmoid_loss", "pretrain_vision", "phrase_precision", "EMPTY_TILE"]
