"""Fusion baselines of the paper's Table 4, behind one interface: grids (B, G, D_v) -> visual tokens (B, N, D_t)
placed in the sequence at the `<image>` tokens (the processor writes N of them).

    prepend          MLP projector per grid (LLaVA / LFM2-VL style), N = G
    cross_attention  Q-Former style: N learned queries attend to the grids, then an FFN, N = num_queries
"""

from __future__ import annotations

import torch
from torch import nn


class PrependProjector(nn.Module):
    """LN -> Linear(D_v, D_t) -> GELU -> Linear(D_t, D_t), one visual token per grid: (B, G, D_v) -> (B, G, D_t)."""

    def __init__(self, d_vision: int, d_text: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(d_vision), nn.Linear(d_vision, d_text), nn.GELU(), nn.Linear(d_text, d_text)
        )

    def forward(self, x_v: torch.Tensor) -> torch.Tensor:
        return self.net(x_v)


class CrossAttentionResampler(nn.Module):
    """Learned queries (N, D_t) cross-attend to the grids, then a residual FFN: (B, G, D_v) -> (B, N, D_t)."""

    def __init__(self, d_vision: int, d_text: int, num_queries: int = 8, heads: int = 4, dropout: float = 0.0):
        super().__init__()
        if d_text % heads:
            heads = 1
        self.queries = nn.Parameter(torch.randn(num_queries, d_text) * d_text**-0.5)
        self.norm_kv = nn.LayerNorm(d_vision)
        self.norm_q = nn.LayerNorm(d_text)
        self.attn = nn.MultiheadAttention(d_text, heads, dropout=dropout, kdim=d_vision, vdim=d_vision, batch_first=True)
        self.ffn = nn.Sequential(nn.LayerNorm(d_text), nn.Linear(d_text, 4 * d_text), nn.GELU(), nn.Linear(4 * d_text, d_text))

    def forward(self, x_v: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(x_v)  # (B, G, D_v)
        q = self.norm_q(self.queries).unsqueeze(0).expand(x_v.shape[0], -1, -1)  # (B, N, D_t)
        h = q + self.attn(q, kv, kv, need_weights=False)[0]  # (B, N, D_t)
        return h + self.ffn(h)
