"""Configuration of Firebolt-VL: a nested `PreTrainedConfig` that saves with the weights.

    FireboltConfig
      vision_config   SigLIP / SigLIP2 vision tower (any `siglip_vision_model` / `siglip2_vision_model` config)
      text_config     LFM2 decoder (any causal-LM config; `lfm2` by default)
      cmm_*           the Cross-Modal Modulator (paper Sec. 3.2, Eq. 4-13)
      grid_*          how one image becomes G views (global view + rows x cols tiles)
      fusion_type     "cmm" (the paper) | "prepend" (MLP projector, LLaVA/LFM2-VL style) | "cross_attention" (Q-Former style)
      output_mode     "replace" (released code: fused tokens replace the text embeddings) | "pooled" (paper text)
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

FUSION_TYPES = ("cmm", "prepend", "cross_attention")
OUTPUT_MODES = ("replace", "pooled")
SSM_TYPES = ("s4", "s4d", "mamba")


class FireboltConfig(PreTrainedConfig):
    r"""
    Args:
        vision_config (`dict` or `PreTrainedConfig`): SigLIP (`siglip_vision_model`) or SigLIP2 (`siglip2_vision_model`).
        text_config (`dict` or `PreTrainedConfig`): the decoder, `lfm2` by default.
        image_token_id (`int`): id of the `<image>` token in the tokenizer.
        fusion_type (`str`, defaults to `"cmm"`): one of `cmm`, `prepend`, `cross_attention`.
        output_mode (`str`, defaults to `"replace"`): CMM output placement, `replace` or `pooled`.
        cmm_heads (`int`, defaults to 4), cmm_head_dim (`int`, defaults to 32): correlation heads H and head size Dh.
        cmm_top_k (`int`, defaults to 4): grids kept per token before the softmax (0 = all).
        cmm_dropout (`float`, defaults to 0.1): dropout on the correlation weights and in the FFN.
        cmm_ffn_mult (`float`, defaults to 4.0): FFN hidden size as a multiple of D_t.
        cmm_gate_init (`float`, defaults to 0.5): initial value of the scalar FiLM gate alpha.
        cmm_grid_embeddings (`bool`, defaults to `False`): add a learned embedding per grid to X_v inside the CMM, so
            the visual context tells which view (global, which tile) it came from. Not in the paper (off = the paper).
        ssm_type (`str`, defaults to `"s4"`): `s4`, `s4d` or `mamba`.
        ssm_config (`dict`): extra keyword arguments of the SSM (e.g. `{"d_state": 64}`). The S4 also takes `window`
            (int W): its kernel cut at W taps, so token t sees the last W inputs only, as in the authors' release
            (W = 512; convert-release sets it); absent / None = the exact, untruncated recurrence. Decoding stays
            O(1) per token either way (windowed: a second rank-1 update and a buffer of the last W inputs).
        num_queries (`int`, defaults to 8): learned queries of the `cross_attention` baseline.
        image_size (`int`, defaults to 256): the processor resizes every image to image_size x image_size.
        grid_rows, grid_cols (`int`, defaults to 2): tiling of the resized image.
        tile_size (`int`, defaults to 128), tile_overlap (`int`, defaults to 2): tile side and overlap in pixels
            (stride = tile_size - tile_overlap; the authors' geometry is 256 / 128 / 2).
        add_global_view (`bool`, defaults to `True`): put the whole image first as view 0.
        view_size (`int`, *optional*): if set, every view is resized to view_size before encoding so all views go
            through the encoder in one batched call; `None` keeps native sizes (global 256 px, tiles 128 px).
        freeze_vision (`bool`, defaults to `True`): the vision tower runs under no_grad and is excluded from training.
        text_only_bypass (`bool`, defaults to `False`): rows without an image skip the fusion module and feed their raw
            token embeddings to the decoder, as the authors' release does for text-only prompts (the default of a
            converted release checkpoint); `False` runs them through the CMM with a zero visual context.
    """

    model_type = "firebolt_vl"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="lfm2"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 0
    fusion_type: str = "cmm"
    output_mode: str = "replace"
    cmm_heads: int = 4
    cmm_head_dim: int = 32
    cmm_top_k: int = 4
    cmm_dropout: float = 0.1
    cmm_ffn_mult: float = 4.0
    cmm_gate_init: float = 0.5
    cmm_grid_embeddings: bool = False
    ssm_type: str = "s4"
    ssm_config: dict | None = None
    num_queries: int = 8
    image_size: int = 256
    grid_rows: int = 2
    grid_cols: int = 2
    tile_size: int = 128
    tile_overlap: int = 2
    add_global_view: bool = True
    view_size: int | None = None
    freeze_vision: bool = True
    text_only_bypass: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.ssm_config is None:
            self.ssm_config = {}
        super().__post_init__(**kwargs)
        self.validate_firebolt()

    def validate_firebolt(self) -> None:
        """Raise a ValueError naming the first inconsistent setting."""
        checks = [
            (self.fusion_type in FUSION_TYPES, f"fusion_type must be one of {FUSION_TYPES}, got {self.fusion_type!r}"),
            (self.output_mode in OUTPUT_MODES, f"output_mode must be one of {OUTPUT_MODES}, got {self.output_mode!r}"),
            (self.ssm_type in SSM_TYPES, f"ssm_type must be one of {SSM_TYPES}, got {self.ssm_type!r}"),
            (self.cmm_heads > 0 and self.cmm_head_dim > 0, "cmm_heads and cmm_head_dim must be positive"),
            (0 <= self.cmm_top_k, f"cmm_top_k must be >= 0, got {self.cmm_top_k}"),
            (0.0 <= self.cmm_dropout < 1.0, f"cmm_dropout must be in [0, 1), got {self.cmm_dropout}"),
            (self.grid_rows >= 0 and self.grid_cols >= 0, "grid_rows and grid_cols must be >= 0"),
            (self.num_grids > 0, "the grid has no views: set add_global_view or grid_rows/grid_cols > 0"),
            (0 <= self.tile_overlap < self.tile_size, f"tile_overlap must be in [0, tile_size), got {self.tile_overlap}"),
            (self.tile_size <= self.image_size, f"tile_size {self.tile_size} exceeds image_size {self.image_size}"),
            (self.num_queries > 0, "num_queries must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"FireboltConfig: {message}")

    @property
    def num_grids(self) -> int:
        """G: the number of views per image (global view + tiles)."""
        return int(self.add_global_view) + self.grid_rows * self.grid_cols

    @property
    def image_seq_length(self) -> int:
        """How many `<image>` tokens the processor writes for one image."""
        if self.fusion_type == "prepend":
            return self.num_grids
        if self.fusion_type == "cross_attention":
            return self.num_queries
        return 1

    def get_text_config(self, *args, **kwargs):
        return self.text_config

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        # directories saved before the package was renamed say model_type "firebolt": same fields, same weights
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == "fireboltlm":  # the authors' release: another format, to be converted
            from .release import refusal

            raise ValueError(refusal(pretrained_model_name_or_path))
        if config_dict.get("model_type") in LEGACY_MODEL_TYPES:
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs


class FireboltLegacyConfig(FireboltConfig):
    """`AutoConfig` entry for model directories saved before the rename (model_type "firebolt")."""

    model_type = "firebolt"


LEGACY_MODEL_TYPES = ("firebolt",)
MODEL_TYPES = (FireboltConfig.model_type, *LEGACY_MODEL_TYPES)  # what a Firebolt-VL config.json may say


__all__ = ["FireboltConfig", "FireboltLegacyConfig", "MODEL_TYPES", "FUSION_TYPES", "OUTPUT_MODES", "SSM_TYPES"]
