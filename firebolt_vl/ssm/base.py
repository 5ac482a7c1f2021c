"""Common interface of the state-space-model (SSM) layers used inside the Cross-Modal Modulator.

Dimension glossary (used in the shape comments of every file of this package):
    B  batch size (rows)
    L  sequence length
    D  model width (d_model); for the S4 family D == H, the number of independent SSM channels
    P  number of padding positions of a row (left-aligned form, see below)

Masking. Every layer accepts a (B, L) mask, 1 = real token, 0 = padding. A masked position is *skipped*:
it neither reads nor changes the recurrent state, so a row behaves exactly as if its padding positions had
been removed from the sequence. `SSMBase.forward` implements this once for all layers: it moves the real
tokens of every row to the end of the row (a stable per-row permutation; left-padded rows, the common case,
need no permutation at all), calls the layer's `_forward` on the resulting *left-aligned* batch together
with the number of padding positions P of each row, and permutes the outputs back. A layer's `_forward`
therefore only has to support left padding: it must ignore the content of the first P positions of a row
and start its recurrence (from `state`) at position P. Outputs at padding positions are unspecified
(finite, but meaningless): callers should ignore them.

State. A state is a tuple of tensors whose first dimension is the batch, so callers can select or reorder
rows with `tuple(t[idx] for t in state)`. States are kept in fp32 (or the dtype the caller chose in
`init_state`); complex quantities are stored as real tensors with a trailing dimension of 2.

Optimizer tags. Parameters of the SSM dynamics (step sizes, state matrices, ...) carry
`p._optim = {"weight_decay": 0.0[, "lr": lr]}`, the convention of the state-spaces repository
(https://github.com/state-spaces/s4, `register`): an optimizer builder should put them in their own
parameter group with those hyper-parameters. They are kept in fp32 even when the module is cast to a
lower precision with `.to(dtype)` / `.half()` / `.bfloat16()`.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
from torch import nn

State = Tuple[torch.Tensor, ...]


def no_autocast(device_type: str):
    """Context manager disabling autocast on `device_type` (SSM internals are computed in fp32)."""
    if device_type not in ("cuda", "cpu", "xpu", "mps", "hpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def left_align(mask: torch.Tensor) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Stable per-row permutation putting the padding positions of every row first.

    mask: (B, L) bool, True = real token. Returns (perm, n_pad): perm (B, L) long with
    `x_aligned = x.gather(1, perm)`, or None when every row is already left-padded (no permutation
    needed), and n_pad (B,) long, the number of padding positions of each row.
    """
    n_pad = (~mask).sum(dim=1)  # (B,)
    already_left_padded = bool((mask[:, 1:].int() >= mask[:, :-1].int()).all()) if mask.shape[1] > 1 else True
    if already_left_padded:
        return None, n_pad
    perm = torch.sort(mask.int(), dim=1, stable=True).indices  # (B, L): pads (0) first, order kept
    return perm, n_pad


def shift_right(seq: torch.Tensor, n_pad: torch.Tensor) -> torch.Tensor:
    """Per-row right shift along the last dim with zero fill: out[b, ..., t] = seq[b, ..., t - n_pad[b]].

    seq: (B, ..., T); n_pad: (B,) long in [0, T].
    """
    T = seq.shape[-1]
    t = torch.arange(T, device=seq.device)  # (T,)
    src = t[None, :] - n_pad[:, None]  # (B, T)
    keep = src >= 0  # (B, T)
    src = src.clamp(min=0)
    view = (seq.shape[0],) + (1,) * (seq.dim() - 2) + (T,)
    out = seq.gather(-1, src.view(view).expand_as(seq))
    return torch.where(keep.view(view), out, torch.zeros((), dtype=out.dtype, device=out.device))


def fft_causal_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal (linear, not circular) convolution y_t = sum_{s<=t} k_{t-s} u_s via FFT, zero-padded to 2L.

    u: (B, H, L) real; k: (H, L) real. Returns (B, H, L).
    """
    L = u.shape[-1]
    n = 2 * L
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)  # (B, H, 2L)
    return y[..., :L]


def padding_mask(n_pad: torch.Tensor, L: int) -> torch.Tensor:
    """(B,) number of padding positions -> (B, L) bool, True at real (non-padding) positions."""
    return torch.arange(L, device=n_pad.device)[None, :] >= n_pad[:, None]


class SSMBase(nn.Module):
    """Abstract causal sequence layer with a parallel form (`forward`) and a recurrent form (`step`).

    Subclasses implement `_forward(x, n_pad, state)` (left-aligned batch, see the module docstring),
    `step` and `init_state`, and register their dynamics parameters with `_register_ssm_param`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._fp32_names: list = []  # names of the tagged dynamics tensors (kept in fp32)

    # ------------------------------------------------------------------ public interface
    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, state: Optional[State] = None):
        """x: (B, L, D). mask: optional (B, L) bool/int, 1 = real token, 0 = padding. state: optional state
        from a previous call (continue the sequence), else zeros. Returns (y (B, L, D), new_state) where
        new_state is the state after the last position. Inputs at masked positions do not change the state
        at all (a padded row gives exactly the state/outputs of the unpadded row)."""
        if x.dim() != 3:
            raise ValueError(f"expected x of shape (B, L, D), got {tuple(x.shape)}")
        B, L, _ = x.shape
        if L == 0:  # nothing to do: the state is unchanged
            return x.new_zeros(B, 0, self.d_model), (state if state is not None else
                                                     self.init_state(B, x.device))
        if mask is None:
            return self._forward(x, None, state)
        if mask.shape != (B, L):
            raise ValueError(f"mask must have shape {(B, L)}, got {tuple(mask.shape)}")
        mask = mask.to(device=x.device) != 0  # (B, L) bool
        if bool(mask.all()):
            return self._forward(x, None, state)
        perm, n_pad = left_align(mask)
        if perm is None:
            return self._forward(x, n_pad, state)
        idx = perm.unsqueeze(-1).expand_as(x)  # (B, L, D)
        y, new_state = self._forward(x.gather(1, idx), n_pad, state)
        y = torch.empty_like(y).scatter_(1, idx, y)  # undo the permutation
        return y, new_state

    def _forward(self, x: torch.Tensor, n_pad: Optional[torch.Tensor], state: Optional[State]):
        """x: (B, L, D) left-aligned (row b has n_pad[b] padding positions first, to be ignored);
        n_pad: (B,) long or None (no padding). Returns (y (B, L, D), new_state)."""
        raise NotImplementedError

    def step(self, x: torch.Tensor, state: State):
        """x: (B, D) one new token; returns (y (B, D), new_state). Equals forward() position by position."""
        raise NotImplementedError

    def init_state(self, batch_size: int, device=None, dtype: torch.dtype = torch.float32) -> State:
        """Zero state for `batch_size` rows."""
        raise NotImplementedError

    # ------------------------------------------------------------------ parameter helpers
    def _register_ssm_param(self, name: str, tensor: torch.Tensor, lr: Optional[float] = None) -> None:
        """Register an SSM dynamics tensor (fp32) following the state-spaces `register` convention.

        lr == 0.0 -> a (non-trainable) buffer; otherwise a parameter tagged with
        `_optim = {"weight_decay": 0.0}` plus `"lr": lr` when lr is given.
        """
        tensor = tensor.detach().to(torch.float32)
        if lr == 0.0:
            self.register_buffer(name, tensor)
        else:
            p = nn.Parameter(tensor)
            optim = {"weight_decay": 0.0}
            if lr is not None:
                optim["lr"] = lr
            p._optim = optim
            self.register_parameter(name, p)
        self._fp32_names.append(name)

    def _apply(self, fn, recurse: bool = True):
        # Keep the tagged dynamics tensors in fp32 when the module is cast (e.g. `.to(torch.bfloat16)`).
        super()._apply(fn, recurse)
        for name in getattr(self, "_fp32_names", ()):
            t = getattr(self, name, None)
            if t is None or not t.is_floating_point() or t.dtype == torch.float32:
                continue
            if isinstance(t, nn.Parameter):
                t.data = t.data.to(torch.float32)
            else:
                self._buffers[name] = t.to(torch.float32)
        return self

    @staticmethod
    def _state_dtype(state: Optional[State]) -> torch.dtype:
        return state[0].dtype if state is not None else torch.float32
