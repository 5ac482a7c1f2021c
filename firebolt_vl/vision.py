"""Grid vision encoder: one image -> G pooled view embeddings X_v (paper Sec. 3.1, "grid-level visual representations").

Glossary
    B   images in the batch            G   views per image (global view + rows x cols tiles; default 5)
    S   processor image side (256)     s   side of one view when it reaches the encoder
    D_v vision hidden size (768 for SigLIP2-base)

The processor hands over the resized image (B, 3, S, S). Views are cut on the device: the global view first (the whole
image), then tiles in row-major order with `stride = tile_size - tile_overlap`, as the authors' release does (256 px,
128 px tiles, 2 px overlap: tiles start at 0 and 126). Each view is encoded by a frozen SigLIP/SigLIP2 tower and pooled
to one vector (the attention-pooling head, i.e. SigLIP's `get_image_features`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedConfig

from .configuration import FireboltConfig


def tile_origins(config: FireboltConfig) -> list[tuple[int, int]]:
    """Top-left (y, x) pixel of every tile, row-major."""
    stride = config.tile_size - config.tile_overlap
    return [(r * stride, c * stride) for r in range(config.grid_rows) for c in range(config.grid_cols)]


def view_boxes(config: FireboltConfig) -> list[tuple[int, int, int, int]]:
    """(y0, x0, y1, x1) of each of the G views in the processor's S x S image, global view first."""
    boxes = [(0, 0, config.image_size, config.image_size)] if config.add_global_view else []
    t = config.tile_size
    boxes += [(y, x, y + t, x + t) for y, x in tile_origins(config)]
    return boxes


def encoder_native_size(vision_config: PreTrainedConfig) -> int:
    """Side in pixels the vision tower was trained at (SigLIP: image_size; SigLIP2 NaFlex: sqrt(num_patches) * patch)."""
    if getattr(vision_config, "image_size", None):
        return int(vision_config.image_size)
    return int(round(vision_config.num_patches**0.5)) * int(vision_config.patch_size)


class GridVisionEncoder(nn.Module):
    """(B, 3, S, S) pixels -> (B, G, D_v) pooled view embeddings, the tower frozen unless configured otherwise."""

    def __init__(self, config: FireboltConfig, encoder: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.encoder = encoder if encoder is not None else AutoModel.from_config(config.vision_config)
        self.is_naflex = config.vision_config.model_type == "siglip2_vision_model"
        self.patch_size = int(config.vision_config.patch_size)
        self.boxes = view_boxes(config)
        last = max(max(b[2], b[3]) for b in self.boxes)
        if last > config.image_size:
            raise ValueError(
                f"FireboltConfig: {config.grid_rows}x{config.grid_cols} tiles of {config.tile_size} px with overlap "
                f"{config.tile_overlap} need a {last} px image, but image_size is {config.image_size}"
            )
        # Every view is resized to `view_size` (one batched encoder call); None keeps native pixel sizes.
        self.view_size = config.view_size
        if config.freeze_vision:
            self.encoder.requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        return self.config.vision_config.hidden_size

    def make_views(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, S, S) -> G tensors (B, 3, s, s), global view first."""
        views = []
        for y0, x0, y1, x1 in self.boxes:
            view = pixel_values[:, :, y0:y1, x0:x1]
            if self.view_size is not None and view.shape[-1] != self.view_size:
                view = F.interpolate(view, size=(self.view_size, self.view_size), mode="bilinear", align_corners=False)
            views.append(view)
        return views

    def _encode_same_size(self, views: torch.Tensor) -> torch.Tensor:
        """(N, 3, s, s) -> (N, D_v) with the fixed-resolution SigLIP tower."""
        native = encoder_native_size(self.config.vision_config)
        out = self.encoder(pixel_values=views, interpolate_pos_encoding=views.shape[-1] != native)
        return self._pool(out)

    def _encode_naflex(self, views: list[torch.Tensor]) -> torch.Tensor:
        """SigLIP2 NaFlex: views of any sizes patchified and padded into one call. Returns (N, D_v)."""
        p = self.patch_size
        patches, shapes = [], []
        for v in views:  # v: (n, 3, h, w)
            n, c, h, w = v.shape
            gh, gw = h // p, w // p
            x = v[:, :, : gh * p, : gw * p].reshape(n, c, gh, p, gw, p)
            x = x.permute(0, 2, 4, 3, 5, 1).reshape(n, gh * gw, p * p * c)  # (n, gh*gw, p*p*3), as Siglip2ImageProcessor
            patches.append(x)
            shapes += [(gh, gw)] * n
        longest = max(x.shape[1] for x in patches)
        mask = torch.cat(
            [
                F.pad(torch.ones(x.shape[:2], dtype=torch.long, device=x.device), (0, longest - x.shape[1]))
                for x in patches
            ]
        )  # (N, P)
        patches = torch.cat([F.pad(x, (0, 0, 0, longest - x.shape[1])) for x in patches])  # (N, P, p*p*3)
        spatial = torch.tensor(shapes, dtype=torch.long, device=patches.device)  # (N, 2)
        out = self.encoder(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=spatial)
        return self._pool(out, mask)

    @staticmethod
    def _pool(out, mask: torch.Tensor | None = None) -> torch.Tensor:
        if getattr(out, "pooler_output", None) is not None:
            return out.pooler_output
        hidden = out.last_hidden_state  # (N, P, D_v): no attention-pooling head, mean over patches
        if mask is None:
            return hidden.mean(1)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, S, S) -> X_v (B, G, D_v)."""
        if pixel_values.dim() != 4 or pixel_values.shape[-1] != self.config.image_size:
            raise ValueError(
                f"pixel_values must be (B, 3, {self.config.image_size}, {self.config.image_size}), "
                f"got {tuple(pixel_values.shape)}"
            )
        dtype = next(self.encoder.parameters()).dtype
        views = self.make_views(pixel_values.to(dtype))
        B, G = pixel_values.shape[0], len(views)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_vision):
            if self.is_naflex:
                pooled = self._encode_naflex(views)  # (B*G, D_v) in view-major order
            else:
                # group views of equal size so each size is one batched call (one call in the default geometry)
                pooled_by_view: list[torch.Tensor | None] = [None] * G
                sizes = sorted({v.shape[-1] for v in views})
                for s in sizes:
                    idx = [g for g, v in enumerate(views) if v.shape[-1] == s]
                    enc = self._encode_same_size(torch.cat([views[g] for g in idx]))  # (len(idx)*B, D_v)
                    for j, g in enumerate(idx):
                        pooled_by_view[g] = enc[j * B : (j + 1) * B]
                pooled = torch.cat(pooled_by_view)  # (G*B, D_v)
        return pooled.view(G, B, -1).transpose(0, 1)  # (B, G, D_v)
