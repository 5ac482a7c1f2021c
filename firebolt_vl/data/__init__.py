"""Data code: synthetic fine-grained benchmark generator and training-data readers.

* :func:`generate_synthetic` (``firebolt_vl.data.synthetic``) writes a
  deterministic LLaVA-layout benchmark of small-object questions.
* :func:`open_dataset` and the reader classes (``firebolt_vl.data.formats``) read
  LLaVA/ShareGPT JSON(L), caption JSONL, webdataset caption tar shards and
  MMPR preference JSONL into uniform conversation records.
"""

from .formats import (
    CAPTION_PROMPTS,
    IMAGE_TOKEN,
    BaseReader,
    CaptionReader,
    ConversationReader,
    PreferenceReader,
    WebDatasetCaptionReader,
    load_image,
    normalize_conversations,
    open_dataset,
)
from .synthetic import FAMILIES, GENERATOR_VERSION, POPE_SPLITS, SCORERS, generate_synthetic

__all__ = [
    "CAPTION_PROMPTS",
    "IMAGE_TOKEN",
    "BaseReader",
    "CaptionReader",
    "ConversationReader",
    "PreferenceReader",
    "WebDatasetCaptionReader",
    "load_image",
    "normalize_conversations",
    "open_dataset",
    "FAMILIES",
    "GENERATOR_VERSION",
    "POPE_SPLITS",
    "SCORERS",
    "generate_synthetic",
]
