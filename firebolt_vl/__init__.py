"""Firebolt-VL: an efficient vision-language model (SigLIP grids -> Cross-Modal Modulator -> LFM2).

Top-level names are imported lazily so that light commands (`firebolt-vl score`, `firebolt-vl --help`) start fast.
"""

import importlib

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
