"""Firebolt-VL: an efficient vision-language model (SigLIP grids -> Cross-Modal Modulator -> LFM2).

Top-level names are imported lazily so that light commands (`firebolt-vl score`, `firebolt-vl --help`) start fast.
"""

import importlib
import logging

# torchao (weight quantization) logs at import every CUDA kernel library it cannot load, and torch then warns about
# its pytree registrations; transformers imports torchao whenever it is installed, so without this every command would
# print those lines on a CPU machine (and a one-line error would not be one line). Errors still show.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

__version__ = "0.1.0"

_EXPORTS = {
    "FireboltConfig": "firebolt_vl.configuration",
    "FireboltForConditionalGeneration": "firebolt_vl.modeling",
    "FireboltCache": "firebolt_vl.modeling",
    "FireboltOutput": "firebolt_vl.modeling",
    "FireboltProcessor": "firebolt_vl.processing",
    "ImageLoadError": "firebolt_vl.processing",
    "load_image": "firebolt_vl.processing",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'firebolt' has no attribute {name!r}")
