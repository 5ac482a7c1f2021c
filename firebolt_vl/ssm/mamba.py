"""Mamba (v1) block: selective state space model, pure PyTorch with an optional CUDA fast path.

Reference: A. Gu, T. Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023
(arXiv:2312.00752), Algorithm 2 and Section 3.6 (the block); S4D-Real initialisation of A from
A. Gu et al., "On the Parameterization and Initialization of Diagonal State Space Models", NeurIPS 2022.

Dimension glossary:
    B     batch size
    L     sequence length
    D     d_model
    E     d_inner = expand * d_model
    N     d_state
    R     dt_rank (low rank of the input-dependent step size)
    K     d_conv, width of the causal depthwise convolution
    T     chunk length of the chunked scan

Block:
    (x, z) = in_proj(u)                                   (B, L, 2E) -> 2 x (B, E, L)
    x      = SiLU(causal depthwise conv1d_K(x) + bias)    (B, E, L)
    (dt_low, Bs, Cs) = x_proj(x)                          R + N + N
    dt     = softplus(dt_proj(dt_low))                    (B, E, L)  (bias = inverse softplus of dt_init)
    A      = -exp(A_log)                                  (E, N)     (S4D-Real: A_n = -(n + 1))
    h_t    = exp(dt_t A) h_t-1 + dt_t Bs_t x_t            (B, E, N)  (ZOH for A, Euler for B)
    y_t    = Cs_t . h_t + D x_t,  y = y * SiLU(z),  out = out_proj(y)

Padding: the conv has a bias, so zeroing the input alone is not enough. At padding positions the conv input
is zeroed and dt is set to 0, which makes the SSM step the identity (exp(0 A) = 1, no dt Bs x input); the
conv state of the caller is placed right before the first real token. A padded row then has exactly the
outputs/state of the unpadded row.

State: (conv_state (B, E, K - 1), ssm_state (B, E, N)): the last K - 1 conv inputs and the SSM state.

Fast path: if `mamba_ssm` (selective_scan_fn) and `causal_conv1d` import, the input is on CUDA, no state is
passed in and the fast path is not disabled (`FORCE_PURE_PYTORCH = True` at module level, or
`Mamba(..., use_fast_path=False)`), the fused kernels are used (note: mamba_ssm does not backpropagate
through the returned last SSM state). Otherwise the pure-PyTorch chunked scan runs (on CUDA without the
kernels a one-time warning gives the pip command).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import SSMBase, State, no_autocast, padding_mask

try:  # optional fused CUDA kernels
    from causal_conv1d import causal_conv1d_fn
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    HAS_FAST_PATH = True
except ImportError:
    causal_conv1d_fn = selective_scan_fn = None
    HAS_FAST_PATH = False

FORCE_PURE_PYTORCH = False  # set True to always use the pure-PyTorch path (tests, debugging)
_WARNED_NO_FAST_PATH = False


def _warn_no_fast_path() -> None:
    global _WARNED_NO_FAST_PATH
    if not _WARNED_NO_FAST_PATH:
        _WARNED_NO_FAST_PATH = True
        warnings.warn(
            "Mamba is running on CUDA with the pure-PyTorch selective scan (slow). For the fused kernels: "
            "pip install mamba-ssm causal-conv1d",
            stacklevel=3,
        )


# ---------------------------------------------------------------------- selective scans
def selective_scan_ref(u, delta, A, B, C, D=None, z=None, h0=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference sequential selective scan (one step per position).

    u, delta: (B, E, L); A: (E, N); B, C: (B, N, L); D: (E,) or None; z: (B, E, L) gate or None;
    h0: (B, E, N) initial state or None (zeros). delta is used as is (already softplus-ed).
    Returns y (B, E, L) = (C . h + D u) * SiLU(z), and the last state (B, E, N). fp32 in, fp32 out.
    """
    Bsz, E, L = u.shape
    h = u.new_zeros(Bsz, E, A.shape[1]) if h0 is None else h0
    ys = []
    for t in range(L):
        dt = delta[:, :, t, None]  # (B, E, 1)
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * u[:, :, t, None]  # (B, E, N)
        ys.append(torch.einsum("ben,bn->be", h, C[:, :, t]))  # (B, E)
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(Bsz, E, 0)  # (B, E, L)
    return _scan_output(y, u, D, z), h


def _linear_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve h_t = a_t h_t-1 + b_t (h_-1 = 0) along the first (time) dim, in parallel. a, b: (T, ...).

    Work-efficient odd/even recursion (the Blelloch-style parallel scan, written out of place so that
    autograd can differentiate it): pairs (2i, 2i+1) are combined into one step with decay a_2i+1 a_2i and
    input a_2i+1 b_2i + b_2i+1, the half-length problem gives h at the odd positions, and the even positions
    follow with one more step. O(T) work, depth log2(T); only products of decays occur (stable for any dt).
    """
    T = a.shape[0]
    if T == 1:
        return b
    T2 = T - T % 2  # even part
    a0, a1 = a[0:T2:2], a[1:T2:2]  # (T//2, ...) decays at even / odd positions
    b0, b1 = b[0:T2:2], b[1:T2:2]
    h_odd = _linear_scan(a1 * a0, torch.addcmul(b1, a1, b0))  # (T//2, ...): h_1, h_3, ...
    h = torch.empty_like(b)  # (T, ...)
    h[1:T2:2] = h_odd
    h[0] = b[0]
    h[2:T2:2] = torch.addcmul(b0[1:], a0[1:], h_odd[:-1])  # h_2i = a_2i h_2i-1 + b_2i
    if T % 2:
        h[T - 1] = torch.addcmul(b[T - 1], a[T - 1], h_odd[-1])
    return h


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, h0=None, chunk_size: int = 16):
    """Parallel selective scan, same signature and result as `selective_scan_ref`.

    The sequence is cut into chunks of T = chunk_size positions; the chunks are processed in order, carrying
    the state. Inside a chunk all per-step decays a_t = exp(dt_t A) and inputs b_t = dt_t Bs_t x_t are formed
    at once (time-major (T, B, E, N)), the incoming state is folded into the first input
    (b_0 += a_0 h_in), and the recurrence is solved for all T positions with `_linear_scan`. The outputs
    y_t = Cs_t . h_t of the chunk are contracted right away, so only one chunk of states is alive at a time
    (without autograd). Cost: O(L) elementwise work in L / T sequential chunk steps instead of L steps.
    """
    Bsz, E, L = u.shape
    h = u.new_zeros(Bsz, E, A.shape[1]) if h0 is None else h0  # (B, E, N)
    dt_t = delta.permute(2, 0, 1)  # (L, B, E) time-major
    dtu_t = (delta * u).permute(2, 0, 1)  # (L, B, E)
    B_t, C_t = B.permute(2, 0, 1), C.permute(2, 0, 1)  # (L, B, N)
    ys = []
    for c0 in range(0, L, chunk_size):
        c1 = min(c0 + chunk_size, L)
        a = torch.exp(dt_t[c0:c1, :, :, None] * A)  # (T, B, E, N) per-step decay
        b = dtu_t[c0:c1, :, :, None] * B_t[c0:c1, :, None, :]  # (T, B, E, N) per-step input
        b = torch.cat([torch.addcmul(b[:1], a[:1], h[None]), b[1:]], dim=0)  # fold in the incoming state
        hs = _linear_scan(a, b)  # (T, B, E, N)
        ys.append(torch.einsum("tben,tbn->bet", hs, C_t[c0:c1]))  # (B, E, T)
        h = hs[-1]
    y = torch.cat(ys, dim=-1) if ys else u.new_zeros(Bsz, E, 0)  # (B, E, L)
    return _scan_output(y, u, D, z), h


def _scan_output(y, u, D, z):
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y


# ---------------------------------------------------------------------- block
class Mamba(SSMBase):
    """Mamba-1 block (Gu & Dao 2023) with parallel (`forward`) and recurrent (`step`) forms.

    Args:
        d_model: model width D.  d_state: N.  d_conv: K.  expand: E = expand * D.
        dt_rank: R, "auto" = ceil(D / 16).  dt_min, dt_max: range of the log-uniform dt initialisation.
        dt_init, dt_scale, dt_init_floor: dt_proj initialisation as in mamba_ssm ("random" | "constant").
        conv_bias, bias: biases of the depthwise conv and of in/out projections.
        lr: optional learning rate of A_log and D: they get `_optim = {"weight_decay": 0.0[, "lr": lr]}`;
            lr = 0.0 freezes them (buffers).
        use_fast_path: use mamba_ssm / causal_conv1d kernels on CUDA when installed.
        scan: "chunked" (default) or "ref" (sequential loop) for the pure-PyTorch path.
        chunk_size: T of the chunked scan.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank="auto",
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random", dt_scale: float = 1.0,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 lr: Optional[float] = None, use_fast_path: bool = True, scan: str = "chunked",
                 chunk_size: int = 16):
        super().__init__()
        if scan not in ("chunked", "ref"):
            raise ValueError(f"scan must be 'chunked' or 'ref', got {scan!r}")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = E = int(expand * d_model)
        self.dt_rank = R = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path, self.scan, self.chunk_size = use_fast_path, scan, chunk_size

        self.in_proj = nn.Linear(d_model, 2 * E, bias=bias)
        self.conv1d = nn.Conv1d(E, E, kernel_size=d_conv, groups=E, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(E, R + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.out_proj = nn.Linear(E, d_model, bias=bias)

        # dt_proj: weight so that the dt_low -> dt map preserves variance; bias = softplus^-1(dt_init)
        dt_init_std = R ** -0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                nn.init.constant_(self.dt_proj.weight, dt_init_std)
            elif dt_init == "random":
                nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
            else:
                raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
            dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)  # (E,)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.dt_proj.bias._no_reinit = True

        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(E, 1)  # (E, N): S4D-Real
        self._register_ssm_param("A_log", torch.log(A), lr)  # A = -exp(A_log)
        self._register_ssm_param("D", torch.ones(E), lr)  # (E,) skip connection

    # ------------------------------------------------------------------ helpers
    def _fast_path_ok(self, x: torch.Tensor, state) -> bool:
        if not x.is_cuda or FORCE_PURE_PYTORCH or not self.use_fast_path:
            return False
        if not HAS_FAST_PATH:
            _warn_no_fast_path()
            return False
        return state is None

    def _dt_B_C(self, xs: torch.Tensor):
        """xs (B, L, E) fp32 -> dt (B, L, E) (softplus-ed), Bs (B, L, N), Cs (B, L, N)."""
        x_dbl = F.linear(xs, self.x_proj.weight.float())  # (B, L, R + 2N)
        dt_low, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(F.linear(dt_low, self.dt_proj.weight.float(), self.dt_proj.bias.float()))  # (B, L, E)
        return dt, Bs, Cs

    def _conv_weight(self):
        w = self.conv1d.weight.float()  # (E, 1, K)
        b = self.conv1d.bias.float() if self.conv1d.bias is not None else None  # (E,)
        return w, b

    # ------------------------------------------------------------------ parallel form
    def _forward(self, x: torch.Tensor, n_pad: Optional[torch.Tensor], state: Optional[State]):
        Bsz, L, _ = x.shape
        K, E = self.d_conv, self.d_inner
        state_dtype = self._state_dtype(state)
        xz = self.in_proj(x)  # (B, L, 2E), caller's dtype / autocast
        with no_autocast(x.device.type):
            xc, z = xz.float().transpose(1, 2).chunk(2, dim=1)  # (B, E, L) each
            valid = None
            if n_pad is not None:
                valid = padding_mask(n_pad, L)  # (B, L) True at real tokens
                xc = xc * valid[:, None, :].to(xc.dtype)  # zero conv input at padding
            conv_state, h0 = (None, None) if state is None else (state[0].float(), state[1].float())
            w, b = self._conv_weight()
            A = -torch.exp(self.A_log.float())  # (E, N)
            D = self.D.float()
            fast = self._fast_path_ok(x, state)

            if fast:
                xs = causal_conv1d_fn(xc.contiguous(), w.squeeze(1), b, activation="silu")  # (B, E, L)
                seq = torch.cat([xc.new_zeros(Bsz, E, K - 1), xc], dim=-1)  # (B, E, K - 1 + L)
            else:
                if conv_state is None:
                    conv_state = xc.new_zeros(Bsz, E, K - 1)
                seq = torch.cat([conv_state, xc], dim=-1)  # (B, E, K - 1 + L)
                if n_pad is not None:
                    seq = self._move_conv_state(seq, n_pad)  # [0 x P, conv_state, real tokens]
                xs = F.silu(F.conv1d(seq, w, b, groups=E))  # (B, E, L) valid conv = causal conv
            new_conv_state = seq[..., seq.shape[-1] - (K - 1):]  # (B, E, K - 1)

            dt, Bs, Cs = self._dt_B_C(xs.transpose(1, 2))  # (B, L, E), (B, L, N), (B, L, N)
            dt = dt.transpose(1, 2)  # (B, E, L)
            if valid is not None:
                dt = dt * valid[:, None, :].to(dt.dtype)  # dt = 0: identity step at padding
            Bs, Cs = Bs.transpose(1, 2).contiguous(), Cs.transpose(1, 2).contiguous()  # (B, N, L)

            if fast:
                y, h = selective_scan_fn(xs.contiguous(), dt.contiguous(), A, Bs, Cs, D, z=z.contiguous(),
                                         delta_bias=None, delta_softplus=False, return_last_state=True)
            elif self.scan == "ref":
                y, h = selective_scan_ref(xs, dt, A, Bs, Cs, D, z, h0)
            else:
                y, h = selective_scan_chunked(xs, dt, A, Bs, Cs, D, z, h0, chunk_size=self.chunk_size)
            y = y.transpose(1, 2).to(x.dtype)  # (B, L, E)
            new_state = (new_conv_state.to(state_dtype), h.to(state_dtype))
        return self.out_proj(y), new_state

    def _move_conv_state(self, seq: torch.Tensor, n_pad: torch.Tensor) -> torch.Tensor:
        """[conv_state (K-1), 0 x P, real] -> [0 x P, conv_state, real] per row; seq (B, E, K - 1 + L)."""
        Km1, S = self.d_conv - 1, seq.shape[-1]
        i = torch.arange(S, device=seq.device)[None, :]  # (1, S)
        p = n_pad[:, None]  # (B, 1)
        src = torch.where(i < p + Km1, i - p, i).clamp(min=0)  # (B, S)
        out = seq.gather(-1, src[:, None, :].expand_as(seq))
        return out * (i >= p)[:, None, :].to(seq.dtype)

    # ------------------------------------------------------------------ recurrent form
    def step(self, x: torch.Tensor, state: State):
        """x (B, D), state (conv_state, ssm_state) -> (y (B, D), new_state). O(E (N + K)) per token."""
        state_dtype = self._state_dtype(state)
        xz = self.in_proj(x)  # (B, 2E)
        with no_autocast(x.device.type):
            xc, z = xz.float().chunk(2, dim=-1)  # (B, E) each
            conv_state, h = state[0].float(), state[1].float()  # (B, E, K-1), (B, E, N)
            w, b = self._conv_weight()
            window = torch.cat([conv_state, xc[..., None]], dim=-1)  # (B, E, K)
            xs = (window * w[:, 0, :]).sum(-1)  # (B, E)
            if b is not None:
                xs = xs + b
            xs = F.silu(xs)
            dt, Bs, Cs = self._dt_B_C(xs)  # (B, E), (B, N), (B, N)
            A = -torch.exp(self.A_log.float())  # (E, N)
            h = torch.exp(dt[..., None] * A) * h + (dt * xs)[..., None] * Bs[:, None, :]  # (B, E, N)
            y = torch.einsum("ben,bn->be", h, Cs) + self.D.float() * xs  # (B, E)
            y = (y * F.silu(z)).to(x.dtype)
            new_state = (window[..., 1:].to(state_dtype), h.to(state_dtype))
        return self.out_proj(y), new_state

    def init_state(self, batch_size: int, device=None, dtype: torch.dtype = torch.float32) -> State:
        return (torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
                torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=dtype))
