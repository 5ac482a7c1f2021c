"""S4: the structured state space sequence model with a DPLR state matrix, pure PyTorch.

References:
    A. Gu, K. Goel, C. Ré, "Efficiently Modeling Long Sequences with Structured State Spaces", ICLR 2022
        (arXiv:2111.00396): NPLR/DPLR parameterisation, bilinear discretisation, the kernel computed from
        its truncated generating function at the roots of unity with a Cauchy kernel and the Woodbury
        identity (Algorithm 1), and the recurrent (Woodbury) step of its Appendix C.2.
    A. Gu, T. Dao, S. Ermon, A. Rudra, C. Ré, "HiPPO: Recurrent Memory with Optimal Polynomial
        Projections", NeurIPS 2020 (arXiv:2008.07669): the HiPPO-LegS matrices.
    A. Gu, I. Johnson, A. Timalsina, A. Rudra, C. Ré, "How to Train Your HiPPO", ICLR 2023
        (arXiv:2206.12037): the relation between C and C~ = C (I - dA^L) under truncation.

Dimension glossary:
    B   batch size
    L   sequence length
    H   number of channels (= d_model); one single-input single-output SSM per channel
    N   d_state, the size of the HiPPO matrix; the layer keeps N2 = N // 2 complex modes (one of each
        conjugate pair of eigenvalues of the normal part) and outputs 2 * Re(...)
    N2  number of complex modes
    M   N2, used for the second index of an (N2, N2) matrix

Model (per channel h, dropping h), in the eigenbasis of the normal part of HiPPO-LegS:
    A = diag(Lambda) - P P^*      (DPLR, rank 1),  Re(Lambda) = -exp(inv_A_real) < 0
    bilinear:  dA = (I - dt/2 A)^-1 (I + dt/2 A),   dB = (I - dt/2 A)^-1 dt B      (dense, (N2, N2))
    recurrence: x_k = dA x_k-1 + dB u_k,   y_k = 2 Re(C x_k) + D u_k               (x in C^N2)
    kernel:     y = K * u + D u with K_k = 2 Re(C dA^k dB), k < L.
Since A + A^* = 2 Re(Lambda) - 2 P P^* is negative definite, all eigenvalues of A lie in the open left
half plane and the bilinear dA has spectral radius < 1 for any dt > 0 and any value of the parameters.

Truncation. The generating function sum_{k<L} C dA^k dB z^k equals C~ (I - dA z)^-1 dB at the L-th roots of
unity z, with C~ = C (I - dA^L). We learn C and form C~_L for the length L of every call with a dense matrix
power (repeated squaring), so the kernel of any length and the recurrence describe one and the same system.

Resolvent. With z on the unit circle, t = (1 + z) / 2 and u = (1 - z) / dt, one has
    (I - dA z)^-1 dB = (D' + t P P^*)^-1 B,   D' = diag(u - t Lambda)
(the bilinear factor 2 / (1 + z) is folded in, so z = -1 needs no special case), evaluated by Woodbury:
    (D' + t P P^*)^-1 v = v / D' - t (P / D') (P^* (v / D')) / (1 + t P^* (P / D')).
The inner products sum_n a_n b_n / D'_n are the Cauchy kernels of the paper.

Window (optional, `window=W`): the kernel cut at W taps, K_k = 0 for k >= W, as the authors' release computes it
(its S4Block(l_max=512) convolves with a 512-tap kernel, so output t sees inputs t-W+1..t only). The recurrence keeps
O(1) work per token with the windowed state w_t = sum_{s=t-W+1..t} dA^(t-s) dB u_s, which obeys
    w_t = dA w_t-1 + dB u_t - dA^W dB u_t-W,    y_t = 2 Re(C w_t) + D u_t,
(w_t = x_t - dA^W x_t-W with x the untruncated state), fed from a buffer of the last W inputs. The parallel form
convolves with the W-tap kernel (the generating function at length W: C~_W = C (I - dA^W)), the buffer prepended.
dA^W dB is formed once in float64 by W applications of the factored dA (see `_window_dB`).

Block (as the state-spaces S4Block): y = GELU(K * u + D u) -> dropout -> Linear(H, 2H) -> GLU.

Note: like the state-spaces implementation, the layer keeps one mode of each conjugate pair and reads out
2 Re(C x); here the low-rank correction acts within the kept half, i.e. the state matrix is exactly the
complex DPLR matrix above, and the parallel and recurrent forms below are exact for that system.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import nn

from .base import SSMBase, State, fft_causal_conv, no_autocast, padding_mask, shift_right


def hippo_legs_nplr(N: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HiPPO-LegS in diagonal-plus-low-rank form, keeping one mode of each conjugate pair.

    HiPPO-LegS (Gu et al. 2020):  A_nk = -sqrt(2n+1) sqrt(2k+1) (n > k), -(n+1) (n = k), 0 (n < k),
    B_n = sqrt(2n+1). With P_n = sqrt(n + 1/2), A + P P^T = -1/2 I + S with S skew-symmetric (normal),
    so A = V (Lambda - (V^* P)(V^* P)^*) V^* with S = V diag(i w) V^*. Computed in float64.

    Returns Lambda (N2,), P (N2,), B (N2,), complex128, in the eigenbasis (N2 = N // 2).
    """
    q = torch.arange(N, dtype=torch.float64)  # (N,)
    r = torch.sqrt(2 * q + 1)  # (N,)
    A = -torch.tril(r[:, None] * r[None, :], diagonal=-1) - torch.diag(q + 1)  # (N, N)
    B = r.clone()  # (N,)
    P = torch.sqrt(q + 0.5)  # (N,) rank-1 correction
    AP = A + P[:, None] * P[None, :]  # (N, N) = -1/2 I + S
    w_re = torch.diagonal(AP).mean()  # -1/2
    S = AP - w_re * torch.eye(N, dtype=torch.float64)  # (N, N) skew-symmetric
    w_im, V = torch.linalg.eigh(-1j * S.to(torch.complex128))  # -iS Hermitian: S V = V diag(i w_im)
    idx = torch.argsort(w_im)[: N // 2]  # one eigenvalue of each conjugate pair (Im < 0, as state-spaces)
    V = V[:, idx]  # (N, N2)
    Lam = w_re + 1j * w_im[idx]  # (N2,)
    Vh = V.conj().transpose(0, 1)  # (N2, N)
    return Lam, Vh @ P.to(torch.complex128), Vh @ B.to(torch.complex128)


def _bmv(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(H, N2, M) matrices times (B, H, M) vectors -> (B, H, N2)."""
    return torch.einsum("hnm,bhm->bhn", M, v)


class S4Block(SSMBase):
    """S4 layer (DPLR HiPPO-LegS, bilinear, Cauchy/Woodbury generating-function kernel) + S4Block tail.

    Args:
        d_model: number of channels H.
        d_state: HiPPO size N (N // 2 complex modes). Must be even.
        dt_min, dt_max: range of the log-uniform initialisation of the per-channel step size dt.
        dropout: dropout after the GELU.
        lr: optional learning rate of the SSM parameters log_dt, Lambda (inv_A_real, A_imag), P, B and D:
            they get `_optim = {"weight_decay": 0.0[, "lr": lr]}`; lr = 0.0 freezes them (buffers).
        l_max: accepted for compatibility with the state-spaces signature; unused, since the kernel is
            computed for the exact length of every call (C is learnt, C~_L derived per call).
        window: None (default) = the exact, untruncated recurrence; an int W = the kernel cut at W taps (output t
            sees the last W inputs only), the authors' release at W = 512; see the module docstring.

    State: a 1-tuple `(x,)`, x (B, H, N2, 2) fp32 = the complex state as a real view. With a window: `(w, u_last)`,
    w (B, H, N2, 2) the windowed state, u_last (B, H, W) the last W inputs, oldest first (zeros before the start).
    """

    def __init__(self, d_model: int, d_state: int = 64, dt_min: float = 0.001, dt_max: float = 0.1,
                 dropout: float = 0.0, lr: Optional[float] = None, l_max: Optional[int] = None,
                 window: Optional[int] = None):
        super().__init__()
        if d_state < 2 or d_state % 2:
            raise ValueError(f"d_state must be an even number >= 2, got {d_state}")
        if window is not None and (isinstance(window, bool) or int(window) != window or window < 1):
            raise ValueError(f"window must be None or a positive int, got {window!r}")
        H, N2 = d_model, d_state // 2
        self.d_model, self.d_state, self.n_modes, self.l_max = d_model, d_state, N2, l_max
        self.window = None if window is None else int(window)

        Lam, P, B = hippo_legs_nplr(d_state)  # (N2,) each, complex128
        log_dt = torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)  # (H,)
        self._register_ssm_param("log_dt", log_dt, lr)
        # Re(Lambda) = -exp(inv_A_real) stays < 0 (stability), Im(Lambda) free
        self._register_ssm_param("inv_A_real", torch.log(-Lam.real).float().repeat(H, 1), lr)  # (H, N2)
        self._register_ssm_param("A_imag", Lam.imag.float().repeat(H, 1), lr)  # (H, N2)
        self._register_ssm_param("P", torch.view_as_real(P.to(torch.cfloat)).repeat(H, 1, 1), lr)  # (H, N2, 2)
        self._register_ssm_param("B", torch.view_as_real(B.to(torch.cfloat)).repeat(H, 1, 1), lr)  # (H, N2, 2)
        C = torch.randn(H, N2, dtype=torch.cfloat)  # complex normal, E|C|^2 = 1
        self.C = nn.Parameter(torch.view_as_real(C).contiguous())  # (H, N2, 2)
        self._register_ssm_param("D", torch.randn(H), lr)  # (H,) skip connection

        self.activation = nn.GELU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.output_linear = nn.Linear(H, 2 * H)
        self.glu = nn.GLU(dim=-1)
        self._step_cache = None  # (key, step params) reused by `step` while the parameters do not change
        self._window_cache = None  # (key, dA^W dB) likewise, windowed mode only

    # ------------------------------------------------------------------ SSM parameters (fp32)
    def _ssm(self):
        """-> dt (H,), Lambda (H, N2), P (H, N2), B (H, N2), C (H, N2) (complex64), D (H,)."""
        dt = torch.exp(self.log_dt.float())  # (H,)
        Lam = torch.complex(-torch.exp(self.inv_A_real.float()), self.A_imag.float())  # (H, N2)
        P = torch.view_as_complex(self.P.float().contiguous())  # (H, N2)
        B = torch.view_as_complex(self.B.float().contiguous())  # (H, N2)
        C = torch.view_as_complex(self.C.float().contiguous())  # (H, N2)
        return dt, Lam, P, B, C, self.D.float()

    @staticmethod
    def _bilinear(dt, Lam, P, B):
        """Bilinear transform of A = diag(Lambda) - P P^* (Woodbury inverse of I - dt/2 A).

        dt (H,), Lam/P/B (H, N2) -> dA (H, N2, N2), dB (H, N2), dense complex.
        """
        N2 = Lam.shape[-1]
        eye = torch.eye(N2, dtype=Lam.dtype, device=Lam.device)  # (N2, N2)
        h = (dt / 2)[:, None]  # (H, 1)
        Dg = 1.0 - h * Lam  # (H, N2): I - dt/2 A = diag(Dg) + dt/2 P P^*
        Pd = P / Dg  # (H, N2)
        Pcd = P.conj() / Dg  # (H, N2)
        denom = 1.0 + h * (P.conj() * Pd).sum(-1, keepdim=True)  # (H, 1)
        M0_inv = torch.diag_embed(1.0 / Dg) - (h / denom)[..., None] * Pd[:, :, None] * Pcd[:, None, :]  # (H, N2, N2)
        A = torch.diag_embed(Lam) - P[:, :, None] * P.conj()[:, None, :]  # (H, N2, N2)
        M1 = eye + h[..., None] * A  # (H, N2, N2): I + dt/2 A
        dA = M0_inv @ M1  # (H, N2, N2)
        dB = dt[:, None] * torch.einsum("hnm,hm->hn", M0_inv, B)  # (H, N2)
        return dA, dB

    @staticmethod
    def _matrix_powers(dA: torch.Tensor, n: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """dA (H, N2, N2) -> (dA^n, [dA^(2^i) for i < n.bit_length()]) by repeated squaring."""
        eye = torch.eye(dA.shape[-1], dtype=dA.dtype, device=dA.device).expand_as(dA)
        result, base, pows = eye, dA, []
        for i in range(max(n.bit_length(), 1)):
            pows.append(base)
            if (n >> i) & 1:
                result = result @ base
            if i + 1 < n.bit_length():
                base = base @ base
        return result, pows

    @staticmethod
    def _apply_power_rows(pows: List[torch.Tensor], m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, N2) -> dA^(m_b) x_b per row, m (B,) long in [0, 2^len(pows)). Powers of dA commute."""
        for i, Pw in enumerate(pows):
            bit = ((m >> i) & 1).bool()[:, None, None]  # (B, 1, 1)
            x = torch.where(bit, _bmv(Pw, x), x)
        return x

    def discrete_matrices(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(dA (H, N2, N2), dB (H, N2)) complex64: the recurrent form's matrices."""
        dt, Lam, P, B, _, _ = self._ssm()
        return self._bilinear(dt, Lam, P, B)

    # ------------------------------------------------------------------ generating function
    def _frequency_terms(self, L: int):
        """Everything the parallel form needs for length L.

        Returns a dict with dA (H, N2, N2), dA^L (H, N2, N2), the powers dA^(2^i), C~ (H, N2), the
        Woodbury pieces R = 1/D' (H, N2, L), t (L,), k01, k10, den (H, L), the roots of unity z (L,), and
        the kernel K (H, L) fp32.
        """
        dt, Lam, P, B, C, D = self._ssm()
        dA = self._step_params()[0]  # (H, N2, N2); the step form's matrix, cached at inference
        dA_L, pows = self._matrix_powers(dA, L)  # (H, N2, N2)
        eye = torch.eye(dA.shape[-1], dtype=dA.dtype, device=dA.device)
        Ct = torch.einsum("hm,hmn->hn", C, eye - dA_L)  # (H, N2): C~ = C (I - dA^L)

        j = torch.arange(L, device=dt.device, dtype=torch.float64)  # (L,)
        z = torch.polar(torch.ones_like(j), -2 * math.pi * j / L).to(torch.cfloat)  # (L,) roots of unity
        t = (1 + z) / 2  # (L,)
        uz = (1 - z)[None, :] / dt[:, None]  # (H, L)
        R = 1.0 / (uz[:, None, :] - t[None, None, :] * Lam[..., None])  # (H, N2, L): 1 / D'
        Pc = P.conj()
        # the four Cauchy kernels sum_n a_n b_n / D'_n in one contraction
        ab = torch.stack([Ct * B, Ct * P, Pc * B, Pc * P])  # (4, H, N2)
        k00, k01, k10, k11 = torch.einsum("khn,hnl->khl", ab, R).unbind(0)  # (H, L) each
        den = 1.0 + t * k11  # (H, L)
        K_hat = k00 - t * k01 * k10 / den  # (H, L): sum_{k<L} C dA^k dB z^k
        K = 2 * torch.fft.ifft(K_hat, dim=-1).real  # (H, L)
        return dict(dt=dt, Lam=Lam, P=P, B=B, D=D, dA=dA, dA_L=dA_L, pows=pows, eye=eye, Ct=Ct, z=z, t=t,
                    R=R, k01=k01, k10=k10, den=den, K=K)

    def kernel(self, L: int) -> torch.Tensor:
        """Convolution kernel K (H, L) fp32, K_k = 2 Re(C dA^k dB), from the generating function (K_k = 0 for
        k >= window in windowed mode)."""
        with no_autocast(self.C.device.type):
            if self.window is None or L <= self.window:
                return self._frequency_terms(L)["K"]
            return nn.functional.pad(self._frequency_terms(self.window)["K"], (0, L - self.window))

    # ------------------------------------------------------------------ parallel form
    # At inference, running the recurrence (dA in factored form, O(H N) per position) is cheaper than building the
    # length-L kernel (dense matrix powers, Cauchy sums) for short inputs, and on a CPU for any length at batch 1:
    # H=1024, N=64, one thread: L=46 24 ms vs 160 ms, L=1024 0.7 s vs 1.8 s; from batch 4 at L=300 the kernel wins.
    scan_max_tokens = 256  # B * L up to which `forward` scans when no gradient is needed (any device)

    def _use_scan(self, x: torch.Tensor) -> bool:
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return False
        Bsz, L, _ = x.shape
        return Bsz * L <= self.scan_max_tokens or (x.device.type == "cpu" and Bsz == 1 and self.scan_max_tokens > 0)

    def _scan(self, x: torch.Tensor, n_pad: Optional[torch.Tensor], state: Optional[State]):
        """Recurrent form over a left-aligned sequence: x_k = dA x_k-1 + dB u_k from `state` (zeros if None), row b
        starting at position n_pad[b]; the maths of `step`, with the output layer applied once."""
        if self.window is not None:
            return self._scan_windowed(x, n_pad, state)
        Bsz, L, H = x.shape
        state_dtype = self._state_dtype(state)
        with no_autocast(x.device.type):
            factors, dB, C, D = self._step_factors()
            u = x.float()  # (B, L, H)
            if state is None:
                s = torch.zeros(Bsz, H, self.n_modes, dtype=dB.dtype, device=x.device)  # (B, H, N2)
            else:
                s = torch.view_as_complex(state[0].float().contiguous())
            live = None if n_pad is None else padding_mask(n_pad, L)  # (B, L) True at real tokens
            ys = []
            for t in range(L):
                new = self._apply_dA(factors, s) + dB * u[:, t, :, None]  # (B, H, N2)
                s = new if live is None else torch.where(live[:, t, None, None], new, s)
                ys.append(torch.einsum("hn,bhn->bh", C, s).real)  # (B, H)
            y = 2 * torch.stack(ys, 1) + D * u  # (B, L, H)
            new_state = (torch.view_as_real(s).to(state_dtype),)
        return self._output(y.to(x.dtype)), new_state

    def _forward(self, x: torch.Tensor, n_pad: Optional[torch.Tensor], state: Optional[State]):
        Bsz, L, H = x.shape
        if self._use_scan(x):
            return self._scan(x, n_pad, state)
        if self.window is not None:
            return self._forward_windowed(x, n_pad, state)
        state_dtype = self._state_dtype(state)
        with no_autocast(x.device.type):
            u = x.float().transpose(1, 2)  # (B, H, L)
            if n_pad is not None:
                u = u * padding_mask(n_pad, L)[:, None, :].to(u.dtype)  # padding inputs -> 0
            f = self._frequency_terms(L)
            R, t, z, den, P = f["R"], f["t"], f["z"], f["den"], f["P"]
            y = fft_causal_conv(u, f["K"]) + f["D"][:, None] * u  # (B, H, L)

            s = self._state_from_inputs(f, u)  # (B, H, N2)

            if state is not None:
                x0 = torch.view_as_complex(state[0].float().contiguous())  # (B, H, N2)
                dt, Lam = f["dt"], f["Lam"]
                # y_t += 2 Re(C dA^(t+1) x0): generating function C~ (I - dA z)^-1 dA x0
                #       = C~ Res(v) with v = (I + dt/2 A) x0 / dt
                Ax0 = Lam * x0 - P * (P.conj() * x0).sum(-1, keepdim=True)  # (B, H, N2): A x0
                v = (x0 + (dt / 2)[:, None] * Ax0) / dt[:, None]  # (B, H, N2)
                ab = torch.stack([f["Ct"] * v, P.conj() * v])  # (2, B, H, N2)
                s00, s10 = torch.einsum("kbhn,hnl->kbhl", ab, R).unbind(0)  # (B, H, L) each
                ys_hat = s00 - t * f["k01"] * s10 / den  # (B, H, L)
                ys = 2 * torch.fft.ifft(ys_hat, dim=-1).real  # (B, H, L)
                if n_pad is None:
                    s = s + _bmv(f["dA_L"], x0)  # dA^L x0
                else:
                    ys = shift_right(ys, n_pad)  # the recurrence of row b starts at position n_pad[b]
                    s = s + self._apply_power_rows(f["pows"], L - n_pad, x0)  # dA^(L - n_pad) x0
                y = y + ys
            y = y.transpose(1, 2).to(x.dtype)  # (B, L, H)
            new_state = (torch.view_as_real(s).to(state_dtype),)  # (B, H, N2, 2)
        return self._output(y), new_state

    @staticmethod
    def _state_from_inputs(f: dict, u: torch.Tensor) -> torch.Tensor:
        """State after the last position from zero: u (B, H, L), f = `_frequency_terms(L)` -> (B, H, N2) complex.

        sum_k dA^(L-1-k) dB u_k = entry L-1 of the circular convolution of u with the state kernel dA^k dB, whose
        DFT is (I - dA^L) Res(B)."""
        L = u.shape[-1]
        R, t, z, den, P = f["R"], f["t"], f["z"], f["den"], f["P"]
        res_B = R * f["B"][..., None] - (t * f["k10"] / den)[:, None, :] * (R * P[..., None])  # (H, N2, L)
        u_hat = torch.fft.fft(u.to(torch.cfloat), dim=-1)  # (B, H, L)
        w = torch.einsum("hnl,bhl->bhn", res_B * (z / L), u_hat)  # (B, H, N2); z_j = exp(2 pi i j (L-1)/L)
        return _bmv(f["eye"] - f["dA_L"], w)  # (B, H, N2)

    # ------------------------------------------------------------------ windowed mode (kernel cut at W taps)
    def _window_inputs(self, u: torch.Tensor, n_pad: Optional[torch.Tensor], state: Optional[State]) -> torch.Tensor:
        """u (B, H, L) (padding zeroed) -> (B, H, W + L): per row [zeros(n_pad), the state's last W inputs, the row's
        real inputs], so that entry W + t - W = t is the input W real tokens before position t."""
        Bsz, H, L = u.shape
        W = self.window
        last = u.new_zeros(Bsz, H, W) if state is None else state[1].to(u.dtype)  # (B, H, W)
        head = torch.cat([last, u.new_zeros(Bsz, H, L)], -1)  # (B, H, W + L)
        if n_pad is not None:
            head = shift_right(head, n_pad)  # the padding (zeros) of row b goes before its history
        return head + torch.cat([u.new_zeros(Bsz, H, W), u], -1)

    def _window_dB(self) -> torch.Tensor:
        """dA^W dB (H, N2) complex64, by W applications of the factored dA in float64 (cached like `_step_params`)."""
        if torch.compiler.is_compiling() and self._window_cache is not None:
            return self._window_cache[1]
        factors, dB, _, _ = self._step_factors()
        key = (self._step_cache[0] if self._step_cache is not None else None, self.window)
        if key[0] is not None and self._window_cache is not None and self._window_cache[0] == key:
            return self._window_cache[1]
        f64 = tuple(a.to(torch.complex128) for a in factors)
        v = dB.to(torch.complex128).unsqueeze(0)  # (1, H, N2)
        for _ in range(self.window):
            v = self._apply_dA(f64, v)
        out = v[0].to(dB.dtype)
        self._window_cache = (key, out) if key[0] is not None else None
        return out

    def _forward_windowed(self, x: torch.Tensor, n_pad: Optional[torch.Tensor], state: Optional[State]):
        """Parallel form of the windowed layer: convolution with the W-tap kernel over [history, inputs]."""
        Bsz, L, H = x.shape
        W = self.window
        state_dtype = self._state_dtype(state)
        with no_autocast(x.device.type):
            u = x.float().transpose(1, 2)  # (B, H, L)
            if n_pad is not None:
                u = u * padding_mask(n_pad, L)[:, None, :].to(u.dtype)  # padding inputs -> 0
            # no history and no padding: the sequence itself; zeros before it change nothing
            v = u if state is None and n_pad is None else self._window_inputs(u, n_pad, state)  # (B, H, L')
            n = min(W, v.shape[-1])
            f = self._frequency_terms(n)  # K = the first n taps (all of them when n = W)
            K = nn.functional.pad(f["K"], (0, v.shape[-1] - n))  # (H, L')
            y = fft_causal_conv(v, K)[..., -L:] + f["D"][:, None] * u  # (B, H, L)
            s = self._state_from_inputs(f, v[..., -n:])  # windowed state: from the last W inputs only
            last = v[..., -W:] if v.shape[-1] >= W else nn.functional.pad(v, (W - v.shape[-1], 0))  # (B, H, W)
            y = y.transpose(1, 2).to(x.dtype)  # (B, L, H)
            new_state = (torch.view_as_real(s).to(state_dtype), last.to(state_dtype))
        return self._output(y), new_state

    def _scan_windowed(self, x: torch.Tensor, n_pad: Optional[torch.Tensor], state: Optional[State]):
        """Recurrent form of the windowed layer over a left-aligned sequence (the maths of `step`)."""
        Bsz, L, H = x.shape
        W = self.window
        state_dtype = self._state_dtype(state)
        with no_autocast(x.device.type):
            factors, dB, C, D = self._step_factors()
            dBW = self._window_dB()  # (H, N2)
            u = x.float().transpose(1, 2)  # (B, H, L)
            live = None if n_pad is None else padding_mask(n_pad, L)  # (B, L) True at real tokens
            if live is not None:
                u = u * live[:, None, :].to(u.dtype)
            v = self._window_inputs(u, n_pad, state)  # (B, H, W + L): v[..., t] = the input leaving at t
            if state is None:
                s = torch.zeros(Bsz, H, self.n_modes, dtype=dB.dtype, device=x.device)  # (B, H, N2)
            else:
                s = torch.view_as_complex(state[0].float().contiguous())
            ys = []
            for t in range(L):
                new = self._apply_dA(factors, s) + dB * u[:, :, t, None] - dBW * v[:, :, t, None]  # (B, H, N2)
                s = new if live is None else torch.where(live[:, t, None, None], new, s)
                ys.append(torch.einsum("hn,bhn->bh", C, s).real)  # (B, H)
            y = 2 * torch.stack(ys, 1) + D * u.transpose(1, 2)  # (B, L, H)
            new_state = (torch.view_as_real(s).to(state_dtype), v[..., -W:].to(state_dtype))
        return self._output(y.to(x.dtype)), new_state

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        """GELU -> dropout -> Linear(H, 2H) -> GLU, on (..., H)."""
        return self.glu(self.output_linear(self.dropout(self.activation(y))))

    # ------------------------------------------------------------------ recurrent form
    def _step_params(self):
        """-> dA (H, N2, N2), dB (H, N2), C (H, N2), D (H,) for `step`.

        O(H N^2) and independent of the sequence length; cached (and reused across `step` calls) while
        gradients are disabled and no dynamics parameter has been modified, else recomputed per call.
        """
        return self._step_cached()[0]

    def _step_factors(self):
        """-> (a1, hP, Pc, inv_Dg, cPd, Pcd) (H, N2) complex each, dB (H, N2), C (H, N2), D (H,): dA in factored
        form, so that a step costs O(H N) instead of the dense O(H N^2) product (see `_apply_dA`). Cached like
        `_step_params`."""
        return self._step_cached()[1]

    def _step_cached(self):
        if torch.compiler.is_compiling() and self._step_cache is not None:
            return self._step_cache[1]  # inside a compiled decoding step: matrices cached eagerly, weights frozen
        tensors = (self.log_dt, self.inv_A_real, self.A_imag, self.P, self.B, self.C, self.D)
        cacheable = not (torch.is_grad_enabled() and any(p.requires_grad for p in tensors))
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in tensors)
        key = key + (torch.is_inference_mode_enabled(),)
        if cacheable and self._step_cache is not None and self._step_cache[0] == key:
            return self._step_cache[1]
        dt, Lam, P, B, C, D = self._ssm()
        dA, dB = self._bilinear(dt, Lam, P, B)
        # the factors of dA = M0^-1 M1 (see `_bilinear`): M1 = diag(1 + h Lam) - h P P^*,
        # M0^-1 = diag(1 / Dg) - (h / denom) Pd Pcd^T, with h = dt / 2, Dg = 1 - h Lam, Pd = P / Dg, Pcd = P^* / Dg
        h = (dt / 2)[:, None]  # (H, 1)
        Dg = 1.0 - h * Lam  # (H, N2)
        Pd, Pcd = P / Dg, P.conj() / Dg
        denom = 1.0 + h * (P.conj() * Pd).sum(-1, keepdim=True)  # (H, 1)
        factors = (1.0 + h * Lam, h * P, P.conj(), 1.0 / Dg, (h / denom) * Pd, Pcd)
        out = ((dA, dB, C, D), (factors, dB, C, D))
        self._step_cache = (key, out) if cacheable else None
        return out

    @staticmethod
    def _apply_dA(factors, s: torch.Tensor) -> torch.Tensor:
        """dA s for s (B, H, N2) from the DPLR factors: two diagonal scalings and two rank-1 corrections, O(H N)."""
        a1, hP, Pc, inv_Dg, cPd, Pcd = factors
        v = a1 * s - hP * (Pc * s).sum(-1, keepdim=True)  # M1 s
        return v * inv_Dg - cPd * (Pcd * v).sum(-1, keepdim=True)  # M0^-1 v

    def step(self, x: torch.Tensor, state: State):
        """x (B, H), state (x,) -> (y (B, H), new_state). O(H N) per token (dA applied in factored form); windowed:
        plus one rank-1 update and the shift of the (B, H, W) input buffer, independent of the position."""
        state_dtype = self._state_dtype(state)
        with no_autocast(x.device.type):
            factors, dB, C, D = self._step_factors()
            u = x.float()  # (B, H)
            s = torch.view_as_complex(state[0].float().contiguous())  # (B, H, N2)
            s = self._apply_dA(factors, s) + dB * u[..., None]  # (B, H, N2)
            if self.window is not None:  # the input of W tokens ago leaves the window
                last = state[1]  # (B, H, W), oldest first
                s = s - self._window_dB() * last[..., 0].float()[..., None]
                last = torch.cat([last[..., 1:], u.unsqueeze(-1).to(last.dtype)], -1)
            y = 2 * torch.einsum("hn,bhn->bh", C, s).real + D * u  # (B, H)
            y = y.to(x.dtype)
            new_state = (torch.view_as_real(s).to(state_dtype),)
            if self.window is not None:
                new_state = new_state + (last.to(state_dtype),)
        return self._output(y), new_state

    def init_state(self, batch_size: int, device=None, dtype: torch.dtype = torch.float32) -> State:
        x = torch.zeros(batch_size, self.d_model, self.n_modes, 2, device=device, dtype=dtype)
        if self.window is None:
            return (x,)
        return (x, torch.zeros(batch_size, self.d_model, self.window, device=device, dtype=dtype))
