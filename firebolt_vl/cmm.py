"""Cross-Modal Modulator (CMM), paper Sec. 3.2, Eq. 4-13, as in the authors' release.

Glossary
    B batch   T text tokens   G grids (views)   H heads   Dh head size   D = D_t text width   D_v vision width

    X_v <- X_v + E_grid  (optional, not in the paper: a learned embedding per grid, so that the context says which
                          view it came from; the grids are otherwise an unordered set to the CMM)
    q = W_q X_t                                   (B, T, H*Dh)          Eq. 4
    k = W_k X_v, v = W_v X_v                       (B, G, H*Dh), (B, G, D)
    S = softmax_G(top-k(q k^T / sqrt(Dh)))          (B, H, T, G)          Eq. 5 (non-top-k grids set to -inf first)
    c = mean_H(S) v                                (B, T, D)             Eq. 6-7
    X_f = LN(X_t) * (1 + a*gamma_in) + a*beta_in   [gamma_in, beta_in] = W_f c        Eq. 8-9
    Y = SSM(X_f)  (causal)                                                Eq. 10
    Y_f = Y * (1 + a*gamma_out) + a*beta_out       [gamma_out, beta_out] = W_f' c     Eq. 11-12
    X_out = LN(X_t + Y_f + FFN(X_t + Y_f))                                Eq. 13 (FFN = LN, Linear, GELU, Drop, Linear, Drop)

Every step is per token except the causal SSM, so output t depends only on tokens <= t and the image: training runs
the whole sequence in parallel and decoding runs `step` with the carried SSM state (O(1) per token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .ssm import build_ssm


@dataclass
class GridMemory:
    """Per-image keys/values of the correlation, computed once per image and reused for every token."""

    keys: torch.Tensor  # (B, H, G, Dh)
    values: torch.Tensor  # (B, G, D)
    present: torch.Tensor  # (B,) bool: rows without an image get a zero visual context
    # decoding only, filled lazily by CrossModalModulator.step: (film_in(V), film_out(V)), (B, G, 2D) each
    film_tables: tuple | None = None
    film_key: tuple | None = None  # versions of the FiLM weights the tables were computed from


def film(x: torch.Tensor, gamma_beta: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """FiLM with a gate: x * (1 + a*gamma) + a*beta. gamma_beta (..., 2D) is split in half."""
    gamma, beta = gamma_beta.chunk(2, dim=-1)
    return x * (1 + gate * gamma) + gate * beta


class CrossModalModulator(nn.Module):
    def __init__(
        self,
        d_text: int,
        d_vision: int,
        heads: int = 4,
        head_dim: int = 32,
        top_k: int = 4,
        dropout: float = 0.1,
        ffn_mult: float = 4.0,
        gate_init: float = 0.5,
        ssm_type: str = "s4",
        ssm_kwargs: dict | None = None,
        grid_embeddings: int = 0,
    ):
        super().__init__()
        # (G, D_v) learned per-grid embeddings added to X_v (0 = off, the paper's CMM)
        self.grid_embed = nn.Parameter(torch.randn(grid_embeddings, d_vision)) if grid_embeddings else None
        self.heads, self.head_dim, self.top_k = heads, head_dim, top_k
        inner = heads * head_dim
        self.q_proj = nn.Linear(d_text, inner, bias=False)
        self.k_proj = nn.Linear(d_vision, inner, bias=False)
        self.v_proj = nn.Linear(d_vision, d_text, bias=False)
        self.attn_drop = nn.Dropout(dropout)
        self.film_in = nn.Linear(d_text, 2 * d_text)
        self.film_out = nn.Linear(d_text, 2 * d_text)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))
        self.norm_in = nn.LayerNorm(d_text)
        self.ssm = build_ssm(ssm_type, d_text, **(ssm_kwargs or {}))
        hidden = int(ffn_mult * d_text)
        self.ffn = nn.Sequential(
            nn.LayerNorm(d_text),
            nn.Linear(d_text, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, d_text),
            nn.Dropout(dropout),
        )
        self.norm_out = nn.LayerNorm(d_text)
        # the SSM initialises itself (HiPPO, dt ranges): keep generic weight init away from it
        for m in self.ssm.modules():
            m._firebolt_keep_init = True

    # ---- correlation (Eq. 4-7) ----
    def grid_memory(self, x_v: torch.Tensor, present: torch.Tensor | None = None) -> GridMemory:
        """x_v (B, G, D_v) -> keys (B, H, G, Dh) and values (B, G, D)."""
        B, G, _ = x_v.shape
        if self.grid_embed is not None:
            if G != self.grid_embed.shape[0]:
                raise ValueError(f"the CMM has grid embeddings for {self.grid_embed.shape[0]} grids, got {G}")
            x_v = x_v + self.grid_embed.to(x_v.dtype)
        keys = self.k_proj(x_v).view(B, G, self.heads, self.head_dim).transpose(1, 2)  # (B, H, G, Dh)
        if present is None:
            present = torch.ones(B, dtype=torch.bool, device=x_v.device)
        return GridMemory(keys, self.v_proj(x_v), present)

    def correlation(self, x_t: torch.Tensor, memory: GridMemory) -> torch.Tensor:
        """x_t (B, T, D) -> per-head grid weights (B, H, T, G), exactly top_k non-zero per token and head."""
        B, T, _ = x_t.shape
        q = self.q_proj(x_t).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        scores = q @ memory.keys.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, H, T, G)
        G = scores.shape[-1]
        if 0 < self.top_k < G:
            kth = scores.topk(self.top_k, dim=-1).indices  # (B, H, T, k)
            keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, kth, True)
            scores = scores.masked_fill(~keep, float("-inf"))
        return scores.float().softmax(dim=-1).to(x_t.dtype)

    def context(self, x_t: torch.Tensor, memory: GridMemory | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token visual context c (B, T, D) and the head-averaged weights (B, T, G) (None without an image)."""
        if memory is None:
            return torch.zeros_like(x_t), None
        weights = self.attn_drop(self.correlation(x_t, memory)).mean(dim=1)  # (B, T, G)
        c = weights @ memory.values  # (B, T, D)
        c = c * memory.present.view(-1, 1, 1).to(c.dtype)
        return c, weights

    # ---- modulation around the SSM (Eq. 8-13) ----
    def forward(
        self,
        x_t: torch.Tensor,
        memory: GridMemory | None,
        mask: torch.Tensor | None = None,
        state=None,
        return_weights: bool = False,
    ):
        """x_t (B, T, D), mask (B, T) 1 = token, 0 = padding -> (X_out (B, T, D), SSM state[, weights (B, T, G)])."""
        c, weights = self.context(x_t, memory)
        if mask is not None:
            c = c * mask.unsqueeze(-1).to(c.dtype)
        x_f = film(self.norm_in(x_t), self.film_in(c), self.gate)  # Eq. 8
        y, state = self.ssm(x_f, mask=mask, state=state)  # Eq. 10
        y_f = film(y, self.film_out(c), self.gate)  # Eq. 11
        h = x_t + y_f
        out = self.norm_out(h + self.ffn(h))  # Eq. 13
        return (out, state, weights) if return_weights else (out, state)

    def film_tables(self, memory: GridMemory) -> tuple[torch.Tensor, torch.Tensor]:
        """(film_in(V'), film_out(V')), (B, G, 2D) each, V' the grid values zeroed for rows without an image; cached on
        `memory` (recomputed if the FiLM weights change).

        A token's correlation weights sum to one over the grids (softmax, then a mean over heads; no dropout at
        inference), so film(c) = W (sum_g w_g v_g) + b = sum_g w_g (W v_g + b): during decoding a token's FiLM
        parameters are a G-term weighted sum of these rows instead of two (D x 2D) matrix-vector products (which
        would read 2 x 2 D^2 weights per token). Rows without an image: V' = 0, every row of the table is b = film(0).
        """
        if memory.film_tables is not None and torch.compiler.is_compiling():
            return memory.film_tables  # inside a compiled decoding step: tables made eagerly, weights frozen
        key = tuple((p.data_ptr(), p._version) for p in (*self.film_in.parameters(), *self.film_out.parameters()))
        if memory.film_tables is None or memory.film_key != key:
            v = memory.values * memory.present.view(-1, 1, 1).to(memory.values.dtype)  # (B, G, D)
            memory.film_tables = (self.film_in(v), self.film_out(v))
            memory.film_key = key
        return memory.film_tables

    def step(self, x_t: torch.Tensor, memory: GridMemory | None, state):
        """One new token per row: x_t (B, D) -> (X_out (B, D), new state). Same maths as `forward`.

        At inference (eval mode, no grad) the FiLM projections come from the per-image `film_tables`."""
        if memory is not None and not self.training and not torch.is_grad_enabled():
            w = self.correlation(x_t.unsqueeze(1), memory).mean(dim=1)  # (B, 1, G), sums to 1 over G
            t_in, t_out = self.film_tables(memory)
            gb_in, gb_out = (w @ t_in).squeeze(1), (w @ t_out).squeeze(1)  # (B, 2D) each
        else:
            c, _ = self.context(x_t.unsqueeze(1), memory)
            c = c.squeeze(1)  # (B, D)
            gb_in, gb_out = self.film_in(c), self.film_out(c)
        x_f = film(self.norm_in(x_t), gb_in, self.gate)
        y, state = self.ssm.step(x_f, state)
        h = x_t + film(y, gb_out, self.gate)
        return self.norm_out(h + self.ffn(h)), state
