"""State-space-model layers of the Cross-Modal Modulator (pure PyTorch, parallel + recurrent forms).

    build_ssm("s4", d_model, **kw)    -> S4Block  (DPLR HiPPO-LegS S4, Gu et al. ICLR 2022)
    build_ssm("s4d", d_model, **kw)   -> S4D      (diagonal S4D-Lin, Gu et al. NeurIPS 2022)
    build_ssm("mamba", d_model, **kw) -> Mamba    (selective SSM block, Gu & Dao 2023)

Every layer implements `SSMBase`: forward(x (B, L, D), mask=None, state=None) -> (y, new_state),
step(x (B, D), state) -> (y, new_state), init_state(batch_size, device, dtype).
"""

from __future__ import annotations

from .base import SSMBase
from .mamba import Mamba
from .s4 import S4Block
from .s4d import S4D

SSM_KINDS = {"s4": S4Block, "s4d": S4D, "mamba": Mamba}


def build_ssm(kind: str, d_model: int, **kwargs) -> SSMBase:
    """Build the SSM layer `kind` (one of "s4", "s4d", "mamba") of width d_model; kwargs go to its constructor."""
    cls = SSM_KINDS.get(kind.lower() if isinstance(kind, str) else kind)
    if cls is None:
        raise ValueError(f"unknown SSM kind {kind!r}; valid kinds are {sorted(SSM_KINDS)}")
    return cls(d_model, **kwargs)


__all__ = ["SSMBase", "S4Block", "S4D", "Mamba", "SSM_KINDS", "build_ssm"]
