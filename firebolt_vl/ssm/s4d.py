"""S4D: the diagonal structured state space model, pure PyTorch.

Reference: A. Gu, A. Gupta, K. Goel, C. Ré, "On the Parameterization and Initialization of Diagonal State
Space Models", NeurIPS 2022 (arXiv:2206.11893) -- the minimal S4D with the S4D-Lin initialisation and the
zero-order-hold (ZOH) discretisation / Vandermonde kernel of its Listing 1.

Dimension glossary:
    B   batch size
    L   sequence length
    H   number of channels (= d_model); one independent single-input single-output SSM per channel
    N   d_state, the size of the equivalent real state; the layer keeps N2 = N // 2 complex modes
        (one of each conjugate pair) and outputs 2 * Re(...)
    N2  number of complex modes

Per channel h (dropping h):
    continuous:  x'(t) = A x(t) + B u(t),   y(t) = 2 Re(C x(t)) + D u(t),   A = diag(A_n), B = 1
    ZOH:         dA = exp(dt A),   dB = (exp(dt A) - 1) / A * B
    recurrence:  x_k = dA x_{k-1} + dB u_k,   y_k = 2 Re(C x_k) + D u_k
    kernel:      y = K * u + D u with K_k = 2 Re(sum_n C_n dB_n dA_n^k)  (a Vandermonde product)
S4D-Lin initialisation: A_n = -1/2 + i pi n.  The state of the recurrence is x (B, H, N2) complex.

Block (as the state-spaces S4D/S4 blocks): y = GELU(K * u + D u) -> dropout -> Linear(H, 2H) -> GLU.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .base import SSMBase, State, fft_causal_conv, no_autocast, padding_mask, shift_right


class S4D(SSMBase):
    """Diagonal S4 layer (S4D-Lin init, ZOH, Vandermonde kernel) with parallel and recurrent forms.

    Args:
        d_model: number of channels H.
        d_state: real state size N (N // 2 complex modes are kept). Must be even.
        dt_min, dt_max: range of the log-uniform initialisation of the per-channel step size dt.
        dropout: dropout after the GELU.
        lr: optional learning rate of the SSM parameters log_dt, log_A_real, A_imag and D: they get
            `_optim = {"weight_decay": 0.0[, "lr": lr]}`; lr = 0.0 freezes them (buffers).

    State: a 1-tuple `(x,)`, x (B, H, N2, 2) fp32 = the complex mode states as a real view.
    """

    def __init__(self, d_model: int, d_state: int = 64, dt_min: float = 0.001, dt_max: float = 0.1,
                 dropout: float = 0.0, lr: Optional[float] = None):
        super().__init__()
        if d_state < 2 or d_state % 2:
            raise ValueError(f"d_state must be an even number >= 2, got {d_state}")
        H, N2 = d_model, d_state // 2
        self.d_model, self.d_state, self.n_modes = d_model, d_state, N2

        log_dt = torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)  # (H,)
        log_A_real = torch.log(0.5 * torch.ones(H, N2))  # (H, N2): Re A = -exp(log_A_real) = -1/2
        A_imag = math.pi * torch.arange(N2, dtype=torch.float32).repeat(H, 1)  # (H, N2): Im A = pi n
        self._register_ssm_param("log_dt", log_dt, lr)
        self._register_ssm_param("log_A_real", log_A_real, lr)
        self._register_ssm_param("A_imag", A_imag, lr)
        C = torch.randn(H, N2, dtype=torch.cfloat)  # complex normal, E|C|^2 = 1
        self.C = nn.Parameter(torch.view_as_real(C).contiguous())  # (H, N2, 2)
        self._register_ssm_param("D", torch.randn(H), lr)  # (H,) skip connection

        self.activation = nn.GELU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.output_linear = nn.Linear(H, 2 * H)
        self.glu = nn.GLU(dim=-1)

    # ------------------------------------------------------------------ SSM parameters (fp32)
    def _ssm(self):
        """-> dt (H,), A (H, N2) cfloat, C (H, N2) cfloat, D (H,): the continuous-time parameters."""
        dt = torch.exp(self.log_dt.float())  # (H,)
        A = torch.complex(-torch.exp(self.log_A_real.float()), self.A_imag.float())  # (H, N2)
        C = torch.view_as_complex(self.C.float())  # (H, N2)
        return dt, A, C, self.D.float()

    def _discretize(self):
        """ZOH -> dtA (H, N2), dA (H, N2), dB (H, N2) (cfloat), C (H, N2) cfloat, D (H,)."""
        dt, A, C, D = self._ssm()
        dtA = dt[:, None] * A  # (H, N2)
        dA = torch.exp(dtA)
        dB = (dA - 1.0) / A  # B = 1 is absorbed in C (S4D minimal)
        return dtA, dA, dB, C, D

    def _step_params(self):
        """-> dA (H, N2), dB (H, N2), C (H, N2), D (H,) for `step`. O(H N), independent of the length."""
        return self._discretize()[1:]

    def kernel(self, L: int) -> torch.Tensor:
        """Convolution kernel K (H, L) fp32: K_k = 2 Re(C dA^k dB) (Vandermonde product)."""
        with no_autocast(self.C.device.type):
            dtA, _, dB, C, _ = self._discretize()
            V = torch.exp(dtA[..., None] * torch.arange(L, device=dtA.device))  # (H, N2, L): dA^k
            return 2 * torch.einsum("hn,hnl->hl", C * dB, V).real

    # ------------------------------------------------------------------ parallel form
    def _forward(self, x: torch.Tensor, n_pad: Optional[torch.Tensor], state: Optional[State]):
        Bsz, L, H = x.shape
        state_dtype = self._state_dtype(state)
        with no_autocast(x.device.type):
            u = x.float().transpose(1, 2)  # (B, H, L)
            if n_pad is not None:
                u = u * padding_mask(n_pad, L)[:, None, :].to(u.dtype)  # padding inputs -> 0
            dtA, dA, dB, C, D = self._discretize()  # (H, N2) x3, (H, N2), (H,)
            V = torch.exp(dtA[..., None] * torch.arange(L, device=x.device))  # (H, N2, L): dA^k, k < L
            K = 2 * torch.einsum("hn,hnl->hl", C * dB, V).real  # (H, L)
            y = fft_causal_conv(u, K) + D[:, None] * u  # (B, H, L)

            # state after the last position, from the inputs: sum_k dA^(L-1-k) dB u_k
            s = dB * torch.einsum("bhl,hnl->bhn", u.to(V.dtype), V.flip(-1))  # (B, H, N2)
            if state is not None:
                x0 = torch.view_as_complex(state[0].float().contiguous())  # (B, H, N2)
                # contribution of the initial state: y_t += 2 Re(C dA^(t+1) x0)
                ys = 2 * torch.einsum("bhn,hnl->bhl", C * x0, V * dA[..., None]).real  # (B, H, L)
                steps = torch.full((Bsz,), L, device=x.device, dtype=torch.long)  # real steps per row
                if n_pad is not None:
                    ys = shift_right(ys, n_pad)  # the recurrence of row b starts at position n_pad[b]
                    steps = steps - n_pad
                y = y + ys
                s = s + torch.exp(dtA[None] * steps[:, None, None]) * x0  # dA^steps x0
            y = y.transpose(1, 2).to(x.dtype)  # (B, L, H)
            new_state = (torch.view_as_real(s).to(state_dtype),)  # (B, H, N2, 2)
        return self._output(y), new_state

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        """GELU -> dropout -> Linear(H, 2H) -> GLU, on (..., H)."""
        return self.glu(self.output_linear(self.dropout(self.activation(y))))

    # ------------------------------------------------------------------ recurrent form
    def step(self, x: torch.Tensor, state: State):
        """x (B, H), state (x,) -> (y (B, H), new_state). O(H N) per token."""
        state_dtype = self._state_dtype(state)
        with no_autocast(x.device.type):
            dA, dB, C, D = self._step_params()
            u = x.float()  # (B, H)
            s = torch.view_as_complex(state[0].float().contiguous())  # (B, H, N2)
            s = dA * s + dB * u[..., None]  # (B, H, N2)
            y = 2 * torch.einsum("hn,bhn->bh", C, s).real + D * u  # (B, H)
            y = y.to(x.dtype)
            new_state = (torch.view_as_real(s).to(state_dtype),)
        return self._output(y), new_state

    def init_state(self, batch_size: int, device=None, dtype: torch.dtype = torch.float32) -> State:
        return (torch.zeros(batch_size, self.d_model, self.n_modes, 2, device=device, dtype=dtype),)
