"""Firebolt-VL: an efficient vision-language model (SigLIP grids -> Cross-Modal Modulator -> LFM2).

Top-level names are imported lazily so that light commands (`firebolt score`, `firebolt --help`) start fast.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "FireboltConfig": "firebolt.configuration",
    "FireboltForConditionalGeneration": "firebolt.modeling",
    "FireboltCache": "firebolt.modeling",
    "FireboltOutput": "firebolt.modeling",
    "FireboltProcessor": "firebolt.processing",
    "ImageLoadError": "firebolt.processing",
    "load_image": "firebolt.processing",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'firebolt' has no attribute {name!r}")
