"""Tiny random checkpoints in the exact Hugging Face layouts (SigLIP / SigLIP2 + LFM2 + a locally trained tokenizer),
for tests and offline demos. They go through the same loading code as real checkpoints (`from_components`).

The `paper` shapes (SigLIP2-base at 256 px + LFM2-350M) are available as configs for benchmarks with random weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]

# A small corpus so the tiny tokenizer covers the words of prompts, captions and the synthetic benchmark.
_WORDS = (
    "what color is the shape object circle square triangle star diamond cross red green blue yellow purple orange "
    "black white gray brown pink cyan how many are there in image picture photo a an of to left right top bottom "
    "middle center quadrant which bar tallest shortest chart word written text is it yes no not there answer question "
    "with option letter from given choices directly describe briefly caption single phrase use A B C D 0 1 2 3 4 5 6 "
    "7 8 9 10 above below next near small large big cat dog sun car tree house book fish bird moon ship key cup hat "
    "the user assistant system please look at and or on under over between"
).split()


def tiny_corpus() -> list[str]:
    """Deterministic sentences built from the word list (no randomness: the tokenizer is the same everywhere)."""
    lines = [" ".join(_WORDS[i : i + 7]) for i in range(0, len(_WORDS), 3)]
    lines += [f"What color is the {s}? {c}." for s in _WORDS[4:9] for c in _WORDS[9:20]]
    lines += [f"How many {c} shapes are there? {n}" for c in _WORDS[9:16] for n in range(10)]
    lines += ["Answer with the option's letter from the given choices directly.", "Is there a red circle? Yes. No."]
    return lines * 3


def train_tiny_tokenizer(vocab_size: int = 512, corpus: list[str] | None = None):
    """A byte-level BPE tokenizer trained here with `tokenizers`, wrapped as a PreTrainedTokenizerFast with a
    ChatML template (LFM2's own layout). Byte-level: any text encodes, nothing is unknown."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .processing import CHATML_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        bos_token="<|startoftext|>",
        eos_token="<|im_end|>",
        unk_token=None,
        additional_special_tokens=["<|endoftext|>", "<|im_start|>", "<image>"],
        chat_template=CHATML_TEMPLATE,
    )


def tiny_vision_config(kind: str = "siglip", hidden: int = 32, image_size: int = 32, patch: int = 8) -> dict:
    common = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=patch,
    )
    if kind == "siglip2":
        return dict(model_type="siglip2_vision_model", num_patches=(image_size // patch) ** 2, **common)
    return dict(model_type="siglip_vision_model", image_size=image_size, **common)


def tiny_text_config(vocab_size: int, hidden: int = 64, layers: int = 4, tokenizer=None, **overrides) -> dict:
    types = ["conv" if i % 2 == 0 else "full_attention" for i in range(layers)]
    ids = {}
    if tokenizer is not None:
        ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return dict(
        model_type="lfm2",
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=types,
        max_position_embeddings=4096,
        block_auto_adjust_ff_dim=False,
        tie_word_embeddings=True,
        **{**ids, **overrides},
    )


def paper_vision_config() -> dict:
    """SigLIP2-base patch16 at 256 px (the released code's encoder: a fixed-resolution `siglip` checkpoint)."""
    return dict(model_type="siglip_vision_model", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, image_size=256, patch_size=16)


def paper_text_config() -> dict:
    """LiquidAI/LFM2-350M: hidden 1024, 16 layers (attention at 2,5,8,10,12,14), vocab 65,536, tied embeddings."""
    attn = {2, 5, 8, 10, 12, 14}
    return dict(model_type="lfm2", vocab_size=65536, hidden_size=1024, intermediate_size=6656, num_hidden_layers=16,
                num_attention_heads=16, num_key_value_heads=8, layer_types=["full_attention" if i in attn else "conv" for i in range(16)],
                max_position_embeddings=128000, block_multiple_of=256, block_ffn_dim_multiplier=1.0,
                block_auto_adjust_ff_dim=True, tie_word_embeddings=True, conv_L_cache=3, norm_eps=1e-5,
                pad_token_id=0, bos_token_id=1, eos_token_id=7)


def write_component_checkpoints(directory, vision_kind: str = "siglip", seed: int = 0, tokenizer=None,
                                vision: dict | None = None, text: dict | None = None) -> tuple[Path, Path]:
    """Write <dir>/vision (config.json + model.safetensors) and <dir>/language (LFM2 + tokenizer) with random weights,
    laid out exactly like hub checkpoints. Returns the two paths."""
    from transformers import AutoConfig, AutoModelForCausalLM, Siglip2VisionModel, SiglipVisionModel

    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = tokenizer or train_tiny_tokenizer()
    vcfg = dict(vision or tiny_vision_config(vision_kind))
    vcls = Siglip2VisionModel if vcfg["model_type"] == "siglip2_vision_model" else SiglipVisionModel
    vmodel = vcls(AutoConfig.for_model(**vcfg))
    vmodel.save_pretrained(directory / "vision")
    tcfg = dict(text or tiny_text_config(len(tokenizer), tokenizer=tokenizer))
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tcfg))
    lm.save_pretrained(directory / "language")
    tokenizer.save_pretrained(directory / "language")
    return directory / "vision", directory / "language"


TINY_CMM = dict(cmm_heads=2, cmm_head_dim=8, cmm_top_k=4, ssm_config={"d_state": 16}, image_size=64, tile_size=32,
                tile_overlap=2, num_queries=4)


def build_tiny(workdir, vision_kind: str = "siglip", seed: int = 0, native_views: bool = False, init_std: float = 0.02,
               **overrides):
    """A tiny random Firebolt-VL assembled from tiny component checkpoints written in `workdir`: (model, processor).
    `init_std` sets the decoder's initializer range (tests use a large one so random models emit varied tokens)."""
    from .modeling import FireboltForConditionalGeneration

    tokenizer = train_tiny_tokenizer()
    text = tiny_text_config(len(tokenizer), tokenizer=tokenizer, initializer_range=init_std)
    vision_dir, language_dir = write_component_checkpoints(workdir, vision_kind, seed, tokenizer, text=text)
    torch.manual_seed(seed)
    return FireboltForConditionalGeneration.from_components(
        str(vision_dir), str(language_dir), native_views=native_views, **{**TINY_CMM, **overrides}
    )
