"""`firebolt-vl explain`: which image views each prompt word drew on, from the CMM's token-to-grid correlation.

Glossary
    T tokens of the templated prompt   T_p tokens of the user's prompt text   W words of the prompt   G views (grids)
    S processor image side (view boxes are in S x S coordinates)   H x W_img the original image

The CMM keeps, per token and head, the top-k grids and softmaxes over them (paper Eq. 5); the model returns those
weights averaged over heads as `cmm_weights` (B, T, G) when asked (`output_cmm_weights=True`); each row sums to 1.
`explain_weights` runs one forward pass and returns them for the prompt's tokens, per word (mean over the word's
tokens) and overall (mean over the prompt's tokens). `render_explanation` draws them: a view's weight is added over the
view's box (the global view covers the whole image, tiles their own squares; see `heat_map`), the boxes scaled from
the processor's S x S square back to the image's own size, one panel for "overall" and one per word.

Only fusion type "cmm" has these weights; other fusion types get a ValueError that says so.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..processing import IMAGE_TOKEN, load_image
from ..vision import view_boxes


@dataclass
class GridExplanation:
    """Token-to-grid weights of one prompt about one image."""

    prompt: str
    tokens: list[str]  # the prompt's tokens as text pieces, (T_p,)
    token_weights: np.ndarray  # (T_p, G) head-averaged top-k weights, rows sum to 1
    words: list[str]  # whitespace-separated words of the prompt, (W,)
    word_weights: np.ndarray  # (W, G) mean over each word's tokens
    overall: np.ndarray  # (G,) mean over the prompt's tokens
    boxes: list[tuple[int, int, int, int]]  # (y0, x0, y1, x1) of each view in the S x S processor square
    image_size: int  # S
    sequence_tokens: list[str] = field(default_factory=list)  # every token of the templated prompt, (T,)
    sequence_weights: np.ndarray | None = None  # (T, G)
    prompt_positions: list[int] = field(default_factory=list)  # where the prompt's tokens sit in the sequence

    def view_names(self) -> list[str]:
        names, tile = [], 0
        for y0, x0, y1, x1 in self.boxes:
            if (y1 - y0) == self.image_size and (x1 - x0) == self.image_size and not names:
                names.append("global")
            else:
                names.append(f"tile{tile}")
                tile += 1
        return names

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "views": self.view_names(),
            "boxes": [list(b) for b in self.boxes],
            "image_size": self.image_size,
            "tokens": self.tokens,
            "token_weights": self.token_weights.round(6).tolist(),
            "words": self.words,
            "word_weights": self.word_weights.round(6).tolist(),
            "overall": self.overall.round(6).tolist(),
        }


def require_cmm(model) -> None:
    if getattr(model, "cmm", None) is None or model.config.fusion_type != "cmm":
        raise ValueError(
            f"explain needs a model with the Cross-Modal Modulator (fusion_type 'cmm'); this model uses fusion_type "
            f"{model.config.fusion_type!r}, which has no token-to-grid weights"
        )


@torch.no_grad()
def explain_weights(model, processor, image, prompt: str) -> GridExplanation:
    """One forward pass over (image, prompt) -> the CMM's per-token grid weights for the prompt's tokens and words.
    `image`: path, bytes or PIL image."""
    require_cmm(model)
    if not prompt or not prompt.strip():
        raise ValueError("empty prompt")
    if IMAGE_TOKEN in prompt:
        raise ValueError(f"the prompt must not contain {IMAGE_TOKEN}: the image is placed before it")
    pil = load_image(image, processor.max_image_pixels)
    text = processor.build_prompt(prompt, with_image=True)
    enc = processor(text, images=pil)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # dropout off: the weights the model decodes with
    try:
        out = model(enc["input_ids"].to(device), enc["attention_mask"].to(device),
                    enc["pixel_values"].to(device, model.dtype), output_cmm_weights=True, logits_to_keep=1)
    finally:
        model.train(was_training)
    weights = out.cmm_weights[0].float().cpu().numpy()  # (T, G)

    # where the prompt's characters sit in the templated text, then which tokens cover them
    start = text.index(prompt, text.index(IMAGE_TOKEN) + len(IMAGE_TOKEN))
    end = start + len(prompt)
    expanded = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * processor.image_seq_length)
    shift = len(expanded) - len(text)  # image tokens come before the prompt
    tok = processor.tokenizer(expanded, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = tok["input_ids"], tok["offset_mapping"]
    if ids != enc["input_ids"][0].tolist():
        raise RuntimeError("internal: tokenizing with offsets gave different ids than the processor")
    start, end = start + shift, end + shift
    positions = [i for i, (s, e) in enumerate(offsets) if s < end and e > start and e > s]
    if not positions:
        raise ValueError("the prompt produced no tokens")
    pieces = [expanded[max(s, start) : min(e, end)] for s, e in offsets]
    token_weights = weights[positions]  # (T_p, G)

    words, word_weights = [], []
    for m in re.finditer(r"\S+", prompt):
        ws, we = m.start() + start, m.end() + start
        rows = [j for j, i in enumerate(positions) if offsets[i][0] < we and offsets[i][1] > ws]
        if rows:
            words.append(m.group())
            word_weights.append(token_weights[rows].mean(0))
    G = weights.shape[1]
    return GridExplanation(
        prompt=prompt,
        tokens=[pieces[i] for i in positions],
        token_weights=token_weights,
        words=words,
        word_weights=np.stack(word_weights) if word_weights else np.zeros((0, G), np.float32),
        overall=token_weights.mean(0),
        boxes=view_boxes(model.config),
        image_size=processor.image_size,
        sequence_tokens=[expanded[s:e] for s, e in offsets],
        sequence_weights=weights,
        prompt_positions=positions,
    )


def heat_map(weights: np.ndarray, boxes, image_size: int, height: int, width: int) -> np.ndarray:
    """(G,) view weights -> (height, width) heat, boxes scaled from the S x S processor square to height x width (the
    processor resizes without keeping the aspect ratio). A view covering the whole square (the global view) adds its
    weight everywhere; each tile adds its weight over its own square, and where tiles overlap (the few pixels of
    `tile_overlap`) the pixel takes the mean of the tiles covering it, so seams do not light up."""
    heat = np.zeros((height, width), dtype=np.float32)
    tiles = np.zeros((height, width), dtype=np.float32)
    count = np.zeros((height, width), dtype=np.float32)
    sy, sx = height / image_size, width / image_size
    for w, (y0, x0, y1, x1) in zip(np.asarray(weights, dtype=np.float32), boxes):
        if (y0, x0, y1, x1) == (0, 0, image_size, image_size):
            heat += w
            continue
        r0, c0 = int(round(y0 * sy)), int(round(x0 * sx))
        r1, c1 = max(int(round(y1 * sy)), r0 + 1), max(int(round(x1 * sx)), c0 + 1)
        tiles[r0:r1, c0:c1] += w
        count[r0:r1, c0:c1] += 1
    return heat + np.where(count > 0, tiles / np.maximum(count, 1), 0.0)


def render_explanation(image, explanation: GridExplanation, output, max_words: int = 15, dpi: int = 100) -> Path:
    """Draw the overall panel and one panel per word (the first `max_words`) into a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    pil = load_image(image, None) if not hasattr(image, "size") else image.convert("RGB")
    arr = np.asarray(pil)
    H, W = arr.shape[:2]
    panels = [("overall", explanation.overall)]
    panels += list(zip((f'"{w}"' for w in explanation.words[:max_words]), explanation.word_weights[:max_words]))
    heats = [heat_map(w, explanation.boxes, explanation.image_size, H, W) for _, w in panels]
    vmax = max(float(h.max()) for h in heats) or 1.0
    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    scale = 3.2 / max(H, W)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * W * scale + 1.2, rows * (H * scale + 0.5) + 0.5),
                             squeeze=False, layout="constrained")
    names = explanation.view_names()
    sy, sx = H / explanation.image_size, W / explanation.image_size
    for ax, (title, w), heat in zip(axes.flat, panels, heats):
        ax.imshow(arr)
        im = ax.imshow(heat, cmap="inferno", alpha=0.55, vmin=0.0, vmax=vmax, interpolation="nearest")
        for g, (y0, x0, y1, x1) in enumerate(explanation.boxes):
            if names[g] == "global":
                continue
            ax.add_patch(Rectangle((x0 * sx, y0 * sy), (x1 - x0) * sx, (y1 - y0) * sy, fill=False, lw=0.8,
                                   edgecolor="white", alpha=0.8))
            ax.text((x0 + x1) / 2 * sx, (y0 + y1) / 2 * sy, f"{w[g]:.2f}", color="white", ha="center", va="center",
                    fontsize=8, bbox=dict(facecolor="black", alpha=0.4, pad=1, lw=0))
        glob = f"  global {w[names.index('global')]:.2f}" if "global" in names else ""
        ax.set_title(f"{title}{glob}", fontsize=9)
        ax.axis("off")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8, label="view weight")
    more = len(explanation.words) - max_words
    note = f"  (+{more} words not shown)" if more > 0 else ""
    fig.suptitle(f"CMM token-to-grid weights: {explanation.prompt[:80]}{note}", fontsize=10)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format=output.suffix.lstrip(".").lower() or "png", dpi=dpi)
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
    return output
