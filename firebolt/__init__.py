"""Firebolt-VL: an efficient vision-language model (SigLIP grids -> Cross-Modal Modulator -> LFM2)."""

from .configuration import FireboltConfig
from .modeling import FireboltCache, FireboltForConditionalGeneration, FireboltOutput
from .processing import FireboltProcessor, ImageLoadError, load_image

__version__ = "0.1.0"
__all__ = [
    "FireboltConfig",
    "FireboltForConditionalGeneration",
    "FireboltCache",
    "FireboltOutput",
    "FireboltProcessor",
    "ImageLoadError",
    "load_image",
]
