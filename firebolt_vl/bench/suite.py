"""The models the benchmark compares, built with random weights at the chosen preset's shapes, behind one interface.

Glossary
    B batch rows   T prompt tokens   N new tokens   G grids (views) per image   D decoder width   V vocabulary
    L context length (tokens held by the decoder's cache)

Variants (same decoder size, same image, same question):
    firebolt          Firebolt-VL, CMM fusion, cached decoding: one CMM recurrence step + one LFM2 step per token
    firebolt_eager    the same Firebolt-VL model decoded by its eager step (DynamicCache), next to the compiled one;
                      added when the run compiles the decoding step (--compile, the CPU default)
    firebolt_nocache  the authors' released decoding, `generate(..., use_cache=False)`: vision, CMM and the whole prefix
                      recomputed for every token (timed through `generate` with a timing streamer)
    prepend           FireboltConfig(fusion_type="prepend"): one projected token per grid written into the prompt
    lfm2_vl           `transformers`' Lfm2VlForConditionalGeneration: SigLIP2 NaFlex base over one 512 px tile,
                      pixel-unshuffle + MLP projector, 256 image tokens in the prompt
    lfm2              the bare LFM2 decoder on text only, prompt of the same length: the floor of decoding cost

Each cached variant exposes the stages the benchmark times: `prepare` (pre-processing: image resize/normalise,
tokenisation, host->device), `vision`, `fusion`, `prefill` (-> first-token logits and the decoding state) and `step`
(one new token). `weight_bytes` and `cache_bytes` count the bytes one decoding step reads, for the bandwidth bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from ..static_decoding import StaticState

VARIANT_NAMES = ("firebolt", "firebolt_nocache", "prepend", "lfm2_vl", "lfm2")
# not in the default list: the same Firebolt-VL model decoded by its eager step (added when the run compiles)
EXTRA_VARIANTS = ("firebolt_eager",)
LFM2_VL_SPECIAL_TOKENS = ["<|image_start|>", "<|image_end|>", "<|img_thumbnail|>"]
QUESTION = "Is there a dog in the image?"  # POPE-style question, with the short-answer instruction added below


@dataclass
class Preset:
    """Shapes of one benchmark preset."""

    name: str
    vision: dict  # Firebolt's SigLIP tower (fixed resolution, pooling head)
    text: dict | None  # LFM2 config (None: the tiny one, sized to the tokenizer)
    firebolt: dict  # FireboltConfig keyword arguments (geometry, CMM sizes)
    vl_vision: dict  # LFM2-VL's SigLIP2 NaFlex tower
    vl_tile: int  # LFM2-VL tile side in pixels (the benchmark image has this size: one tile, no splitting)
    vl_patch: int
    vl_downsample: int
    vl_projector_hidden: int
    vl_min_image_tokens: int = 64
    vl_max_image_tokens: int = 256
    scaling_lengths: list = field(default_factory=lambda: [64, 256, 1024, 4096])
    scaling_grids: list = field(default_factory=lambda: [1, 2, 5, 10, 17])


def make_preset(name: str) -> Preset:
    from ..presets import TINY_CMM, paper_text_config, paper_vision_config, tiny_vision_config

    if name in ("paper", "release"):  # release: the paper's shapes, Firebolt-VL converted from the release's format
        return Preset(
            name=name,
            vision=paper_vision_config(),
            text=paper_text_config(),
            # the authors' view geometry: 256 px global view + 2x2 tiles of 128 px, 2 px overlap, encoded natively
            firebolt=dict(image_size=256, tile_size=128, tile_overlap=2, grid_rows=2, grid_cols=2, view_size=None),
            vl_vision=dict(model_type="siglip2_vision_model", hidden_size=768, intermediate_size=3072,
                           num_hidden_layers=12, num_attention_heads=12, patch_size=16, num_patches=256,
                           vision_use_head=False),
            vl_tile=512, vl_patch=16, vl_downsample=2, vl_projector_hidden=2560,
        )
    if name == "tiny":
        tiny = {k: v for k, v in TINY_CMM.items() if k != "num_queries"}
        return Preset(
            name="tiny",
            vision=tiny_vision_config("siglip"),
            text=None,
            firebolt=dict(tiny, view_size=None),
            vl_vision=dict(model_type="siglip2_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, patch_size=8, num_patches=16, vision_use_head=False),
            vl_tile=128, vl_patch=8, vl_downsample=2, vl_projector_hidden=64,
            vl_min_image_tokens=16, vl_max_image_tokens=64,
        )
    raise ValueError(f"unknown preset {name!r}: use 'paper', 'release' or 'tiny'")


def bench_image(size: int) -> Image.Image:
    """A deterministic size x size RGB test picture (shapes on a gradient)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    arr = np.stack([200 * x + 30, 180 * y + 40, 120 * (1 - x) + 60], -1).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(img)
    s = size / 8
    d.ellipse((s, s, 3 * s, 3 * s), fill=(220, 20, 20))
    d.rectangle((4 * s, 4 * s, 7 * s, 6 * s), fill=(20, 40, 200))
    d.polygon([(s, 7 * s), (2.5 * s, 4.5 * s), (4 * s, 7 * s)], fill=(240, 220, 30))
    return img


def bench_tokenizer():
    """The locally trained byte-level BPE tokenizer (no download) plus the special tokens LFM2-VL's prompt uses."""
    from ..presets import train_tiny_tokenizer

    tok = train_tiny_tokenizer()
    tok.add_tokens([t for t in LFM2_VL_SPECIAL_TOKENS if t not in tok.get_vocab()], special_tokens=True)
    return tok


# ---------------------------------------------------------------------------------------------------- byte counting
def _is_dynamic_quantized_linear(m: nn.Module) -> bool:
    return type(m).__name__ == "DynamicQuantizedLinear" or type(m).__module__.startswith("torch.ao.nn.quantized")


def tensor_bytes(t: torch.Tensor) -> int:
    from ..quantize import tensor_bytes as stored

    return stored(t)


def module_bytes(module: nn.Module, exclude: set[int] | None = None) -> int:
    """Bytes of the weights of `module` (parameters, and the packed weights of dynamically quantized Linear layers),
    each tensor counted once, skipping tensors whose id() is in `exclude`."""
    seen = set(exclude or ())
    total = 0
    for m in module.modules():
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += tensor_bytes(p)  # torchao quantized weights: integer data + scales
        if _is_dynamic_quantized_linear(m) and hasattr(m, "weight") and callable(m.weight):
            w = m.weight()
            total += w.numel() * w.element_size() + m.out_features * 4  # int8 weight + fp32 bias
    return total


def decoder_step_bytes(body: nn.Module, embedding: nn.Embedding, head: nn.Module, batch: int) -> int:
    """Weight bytes one decoding step of a causal LM reads: every weight of the body and the head, but only one
    embedding row per batch row (a tied head still reads its whole matrix, counted once)."""
    emb = embedding.weight
    total = module_bytes(body, exclude={id(emb)})
    head_w = getattr(head, "weight", None)
    if isinstance(head_w, torch.Tensor) and head_w is emb:
        total += emb.numel() * emb.element_size()  # tied: the head reads the embedding matrix
    elif head not in list(body.modules()):
        total += module_bytes(head, exclude={id(emb)})
    return total + batch * emb.shape[1] * emb.element_size()


def lm_cache_bytes(text_config, batch: int, context: float, itemsize: int) -> float:
    """Bytes of the LFM2 cache one step reads at context length `context`: K and V of every attention layer over the
    context, plus the short-conv states (read and written)."""
    types = list(getattr(text_config, "layer_types", None) or ["full_attention"] * text_config.num_hidden_layers)
    n_attn = sum(t == "full_attention" for t in types)
    n_conv = sum(t == "conv" for t in types)
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    kv = n_attn * 2 * batch * text_config.num_key_value_heads * head_dim * context * itemsize
    conv = n_conv * 2 * batch * text_config.hidden_size * getattr(text_config, "conv_L_cache", 3) * itemsize
    return kv + conv


# ---------------------------------------------------------------------------------------------------- variants
class Variant:
    """A model under test. Subclasses implement the stages; `kind` is "cached" or "nocache"."""

    name = "variant"
    kind = "cached"
    description = ""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype):
        self.model, self.device, self.dtype = model, device, dtype
        self.notes: list[str] = []
        self._buffers: dict = {}  # static caches / state buffers reused across runs (fixed addresses)

    # stages (timed by the runner)
    def prepare(self, batch: int) -> dict:
        raise NotImplementedError

    def vision(self, inp: dict):
        return None

    def fusion(self, inp: dict, vis):
        return None

    def prefill(self, inp: dict, fused):
        """-> (logits of the last position (B, V), decoding state)."""
        raise NotImplementedError

    def step(self, tok: torch.Tensor, state) -> torch.Tensor:
        """tok (B, 1) -> logits (B, V) of the next position."""
        raise NotImplementedError

    # static cache + torch.compile path
    def supports_static(self) -> bool:
        """Whether this variant decodes through the run's static cache + compiled step when the run has one."""
        return False

    # False: decode through the stock eager path even when the run compiles (the peers' reference path)
    compiled_step = True

    # accounting
    def prompt_tokens(self, inp: dict) -> int:
        return int(inp["input_ids"].shape[1])

    def weight_bytes(self, batch: int) -> int:
        raise NotImplementedError

    def cache_bytes(self, batch: int, context: float) -> float:
        raise NotImplementedError

    def total_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def resident_bytes(self) -> int:
        return module_bytes(self.model)


def _to(inp: dict, device, dtype) -> dict:
    out = {}
    for k, v in inp.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, dtype=dtype if v.is_floating_point() else None, non_blocking=True)
        out[k] = v
    return out


class FireboltVariant(Variant):
    """Firebolt-VL through its public pieces: encode_images -> fuse -> prefill -> decode_step (cmm or prepend)."""

    def __init__(self, name, model, processor, image, question, device, dtype):
        super().__init__(model, device, dtype)
        self.name, self.processor, self.image, self.question = name, processor, image, question
        cfg = model.config
        if cfg.fusion_type == "cmm":
            self.description = (f"Firebolt-VL (CMM, {cfg.ssm_type.upper()}, G={cfg.num_grids}), recurrent CMM decoding "
                                "next to the LFM2 cache")
        else:
            self.description = (f"prepend design: {cfg.image_seq_length} projected grid tokens in the prompt "
                                f"(FireboltConfig fusion_type={cfg.fusion_type!r})")

    def prepare(self, batch):
        from ..eval.prompts import short_answer_prompt

        text = self.processor.build_prompt(short_answer_prompt(self.question), with_image=True)
        enc = self.processor([text] * batch, images=[self.image] * batch)
        return _to(enc, self.device, self.dtype)

    def vision(self, inp):
        return self.model.encode_images(inp["pixel_values"])

    def fusion(self, inp, vis):
        embeds, memory, state, _ = self.model.fuse(inp["input_ids"], inp["attention_mask"], vis)
        return embeds, memory, state

    def prefill(self, inp, fused):
        embeds, memory, state = fused
        out = self.model.prefill(embeds, inp["attention_mask"], memory, state, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out.cache

    def step(self, tok, cache):
        return self.model.decode_step(tok, cache, logits_to_keep=1).logits[:, -1]

    # ---- static cache + compiled step
    def supports_static(self):
        return self.compiled_step and self.model.config.output_mode == "replace"

    def static_prefill(self, inp, fused, max_len: int):
        embeds, memory, state = fused
        return self.model.static_decoder().prefill(embeds, inp["attention_mask"], memory, state, max_len)

    def static_step_fn(self):
        from ..static_decoding import static_step

        return static_step(self.model)

    # ---- accounting
    def weight_bytes(self, batch):
        lm = self.model.language_model
        total = decoder_step_bytes(lm, lm.get_input_embeddings(), lm.get_output_embeddings(), batch)
        if self.model.cmm is not None:
            total += cmm_step_bytes(self.model.cmm)
        return total

    def cache_bytes(self, batch, context):
        tc = self.model.config.text_config
        total = lm_cache_bytes(tc, batch, context, self.dtype_itemsize())
        cmm = self.model.cmm
        if cmm is not None:
            G, D = self.model.config.num_grids, tc.hidden_size
            keys = batch * cmm.heads * G * cmm.head_dim
            values = batch * G * D
            tables = 2 * batch * G * 2 * D if _cmm_uses_film_tables(cmm) else 0
            state = sum(t.numel() for t in cmm.ssm.init_state(batch)) * 2  # read + write, fp32
            total += (keys + values + tables) * self.dtype_itemsize() + state * 4
        return total

    def dtype_itemsize(self):
        return torch.empty((), dtype=self.dtype).element_size()


def static_cache(variant: "Variant", text_config, batch: int, max_len: int):
    """A transformers StaticCache for (batch, max_len), created once per variant and reset for every run."""
    from ..static_decoding import new_static_cache

    key = ("lm", batch, max_len)
    cache = variant._buffers.get(key)
    if cache is None:
        cache = variant._buffers[key] = new_static_cache(text_config, max_len)
    else:
        cache.reset()
    return cache


def _cmm_uses_film_tables(cmm) -> bool:
    """Whether decoding steps take FiLM parameters from per-image tables (CrossModalModulator.film_tables, eval)."""
    return callable(getattr(cmm, "film_tables", None)) and not cmm.training


def cmm_step_bytes(cmm: nn.Module) -> int:
    """Weight bytes one CMM recurrence step reads: q_proj, the FiLM projections (unless their per-image tables are
    used), norms, the SSM's step matrices and output layer, the FFN. k_proj / v_proj act once per image (prefill)."""
    skip = {id(p) for p in cmm.k_proj.parameters()} | {id(p) for p in cmm.v_proj.parameters()}
    if _cmm_uses_film_tables(cmm):
        skip |= {id(p) for p in cmm.film_in.parameters()} | {id(p) for p in cmm.film_out.parameters()}
    ssm = cmm.ssm
    # what the SSM's step reads instead of its raw dynamics parameters: its cached step tensors
    step_params = getattr(ssm, "_step_factors", None) or getattr(ssm, "_step_params", None)
    extra = 0
    if callable(step_params):
        skip |= {id(p) for p in ssm.parameters(recurse=False)}  # raw dynamics: replaced by the cached step tensors
        with torch.no_grad():
            extra = sum(t.numel() * t.element_size() for t in _flatten(step_params()))
        if getattr(ssm, "window", None):  # the windowed S4's step also reads dA^W dB (its input buffer is state)
            extra += sum(t.numel() * t.element_size() for t in _flatten(ssm._window_dB()))
    return module_bytes(cmm, exclude=skip) + extra


def _flatten(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _flatten(o)


class FireboltNoCacheVariant(Variant):
    """The authors' released decoding: `generate(use_cache=False)` recomputes vision, CMM and the prefix per token."""

    kind = "nocache"

    def __init__(self, base: FireboltVariant):
        super().__init__(base.model, base.device, base.dtype)
        self.base = base
        self.name = "firebolt_nocache"
        self.description = ("Firebolt-VL as released: model.generate(use_cache=False) reruns the 5 vision passes, the "
                            "CMM and the whole prefix for every new token")

    def prepare(self, batch):
        return self.base.prepare(batch)

    def generate(self, inp, new_tokens, streamer):
        return self.model.generate(**inp, max_new_tokens=new_tokens, ignore_eos=True, use_cache=False,
                                   streamer=streamer)

    def weight_bytes(self, batch):
        return None

    def cache_bytes(self, batch, context):
        return None


class Lfm2VlVariant(Variant):
    """`transformers`' LFM2-VL at the same LLM size: SigLIP2 NaFlex over one tile, pixel unshuffle, MLP projector,
    image tokens at `<image>` in the prompt."""

    name = "lfm2_vl"

    def __init__(self, model, tokenizer, processor, image, question, preset: Preset, device, dtype):
        super().__init__(model, device, dtype)
        self.tokenizer, self.processor, self.image, self.question, self.preset = tokenizer, processor, image, question, preset
        self.image_tokens = None
        self.description = ("LFM2-VL (transformers Lfm2VlForConditionalGeneration): SigLIP2 NaFlex base, "
                            f"{preset.vl_tile} px tile, pixel-unshuffle x{preset.vl_downsample} + MLP projector")
        self.notes.append(
            "pre-processing: the single-tile path of Lfm2VlImageProcessor (smart resize to multiples of patch x "
            "downsample within [min, max] image tokens, rescale 1/255, normalise mean=std=0.5, patchify, pad to "
            "max_num_patches) re-implemented here because that processor needs torchvision, which is not installed; "
            "the image token count is Lfm2VlProcessor's formula; prompt = <|image_start|> + <image> x n + "
            "<|image_end|> + question")

    # -- the single-tile path of Lfm2VlImageProcessor (written here; torchvision is not a dependency)
    def _smart_resize(self, h: int, w: int) -> tuple[int, int]:
        p = self.preset
        f = p.vl_patch * p.vl_downsample
        lo = p.vl_min_image_tokens * p.vl_patch**2 * p.vl_downsample**2
        hi = p.vl_max_image_tokens * p.vl_patch**2 * p.vl_downsample**2
        hb, wb = max(f, round(h / f) * f), max(f, round(w / f) * f)
        if hb * wb > hi:
            beta = math.sqrt(h * w / hi)
            hb, wb = max(f, math.floor(h / beta / f) * f), max(f, math.floor(w / beta / f) * f)
        elif hb * wb < lo:
            beta = math.sqrt(lo / (h * w))
            hb, wb = math.ceil(h * beta / f) * f, math.ceil(w * beta / f) * f
        return hb, wb

    def _image_inputs(self, image: Image.Image):
        p = self.preset
        h, w = self._smart_resize(image.height, image.width)
        if (h, w) != (image.height, image.width):
            image = image.resize((w, h), Image.BILINEAR)
        arr = (np.asarray(image, dtype=np.float32) / 255.0 - 0.5) / 0.5  # (h, w, 3)
        x = torch.from_numpy(arr).permute(2, 0, 1)  # (3, h, w)
        gh, gw = h // p.vl_patch, w // p.vl_patch
        patches = x.reshape(3, gh, p.vl_patch, gw, p.vl_patch).permute(1, 3, 2, 4, 0)
        patches = patches.reshape(gh * gw, p.vl_patch * p.vl_patch * 3)  # (P, p*p*3), row-major patches
        max_patches = max(p.vl_max_image_tokens * p.vl_downsample**2, (p.vl_tile // p.vl_patch) ** 2)
        mask = torch.zeros(max_patches, dtype=torch.long)
        mask[: gh * gw] = 1
        patches = torch.nn.functional.pad(patches, (0, 0, 0, max_patches - gh * gw))
        n_tokens = math.ceil(gh / p.vl_downsample) * math.ceil(gw / p.vl_downsample)  # Lfm2VlProcessor's count
        return patches, mask, (gh, gw), n_tokens

    def prepare(self, batch):
        from ..eval.prompts import short_answer_prompt

        patches, mask, (gh, gw), n = self._image_inputs(self.image)
        self.image_tokens = n
        block = "<|image_start|>" + "<image>" * n + "<|image_end|>"
        text = self.processor.build_prompt(short_answer_prompt(self.question), with_image=True)
        text = text.replace("<image>\n", block)
        enc = self.tokenizer([text] * batch, add_special_tokens=False, return_tensors="pt")
        inp = {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "pixel_values": patches.unsqueeze(0).expand(batch, -1, -1).contiguous(),
            "pixel_attention_mask": mask.unsqueeze(0).expand(batch, -1).contiguous(),
            "spatial_shapes": torch.tensor([[gh, gw]] * batch),
        }
        got = int((enc["input_ids"][0] == self.model.config.image_token_id).sum())
        if got != n:
            raise RuntimeError(f"LFM2-VL prompt holds {got} image tokens, expected {n}")
        return _to(inp, self.device, self.dtype)

    def vision(self, inp):
        tower = self.model.model.vision_tower
        return tower(pixel_values=inp["pixel_values"], spatial_shapes=inp["spatial_shapes"],
                     pixel_attention_mask=inp["pixel_attention_mask"]).last_hidden_state  # (B, P, D_v)

    def fusion(self, inp, hidden):
        """Unpad, reshape to the patch grid, project (pixel unshuffle + MLP), write at the image tokens."""
        projector = self.model.model.multi_modal_projector
        lengths = inp["pixel_attention_mask"].sum(1)
        feats = []
        for b in range(hidden.shape[0]):
            gh, gw = (int(v) for v in inp["spatial_shapes"][b])
            grid = hidden[b, : int(lengths[b])].reshape(1, gh, gw, -1)
            feats.append(projector(grid).reshape(-1, projector.linear_2.out_features))
        feats = torch.cat(feats)  # (B * n, D)
        embeds = self.model.get_input_embeddings()(inp["input_ids"])
        slot = (inp["input_ids"] == self.model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        return embeds.masked_scatter(slot, feats.to(embeds.dtype))

    def prefill(self, inp, embeds):
        from transformers import DynamicCache

        mask = inp["attention_mask"]
        cache = DynamicCache(config=self.model.config.text_config)
        out = self.model(inputs_embeds=embeds, attention_mask=mask, cache=cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1], _DecodeState(out.cache, mask, mask.shape[1])

    def step(self, tok, st):
        st.length += 1
        mask = st.mask(tok.shape[0])
        pos = torch.full_like(tok, st.length - 1)
        out = self.model(input_ids=tok, attention_mask=mask, position_ids=pos, cache=st.cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def supports_static(self):
        return self.compiled_step

    def static_prefill(self, inp, embeds, max_len):
        mask = inp["attention_mask"]
        cache = static_cache(self, self.model.config.text_config, mask.shape[0], max_len)
        out = self.model(inputs_embeds=embeds, attention_mask=mask, cache=cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1], StaticState(cache, mask, max_len)

    def static_step_fn(self):
        model = self.model

        def step(tok, pos, full_mask, lm_cache, memory, ssm_state):
            return model(input_ids=tok, attention_mask=full_mask, position_ids=pos, cache=lm_cache,
                         use_cache=True, logits_to_keep=1).logits[:, -1]

        return step

    def weight_bytes(self, batch):
        lm = self.model.model.language_model
        return decoder_step_bytes(lm, lm.embed_tokens, self.model.lm_head, batch)

    def cache_bytes(self, batch, context):
        return lm_cache_bytes(self.model.config.text_config, batch, context, torch.empty((), dtype=self.dtype).element_size())


class _DecodeState:
    """LM cache + a preallocated attention mask (sliced, never concatenated) for the manual decoding loops."""

    def __init__(self, cache, prompt_mask: torch.Tensor, length: int, capacity: int = 8192):
        self.cache, self.length = cache, length
        B = prompt_mask.shape[0]
        self._mask = prompt_mask.new_ones(B, max(capacity, length + 1))
        self._mask[:, : prompt_mask.shape[1]] = prompt_mask

    def mask(self, batch: int) -> torch.Tensor:
        if self.length > self._mask.shape[1]:
            self._mask = torch.cat([self._mask, self._mask.new_ones(batch, self._mask.shape[1])], 1)
        return self._mask[:, : self.length]


class Lfm2Variant(Variant):
    """The bare LFM2 decoder on text only (AutoModelForCausalLM.from_config(text_config)); prompt of the same length
    as Firebolt-VL's."""

    name = "lfm2"

    def __init__(self, model, processor, question, device, dtype):
        super().__init__(model, device, dtype)
        self.processor, self.question = processor, question
        self.description = "bare LFM2 decoder (AutoModelForCausalLM.from_config(text_config)), text only: the floor"

    def prepare(self, batch):
        from ..eval.prompts import short_answer_prompt

        # Firebolt-VL's prompt text (its <image> slot is one ordinary token here): the same prompt length
        text = self.processor.build_prompt(short_answer_prompt(self.question), with_image=True)
        enc = self.processor.tokenizer([text] * batch, add_special_tokens=False, return_tensors="pt")
        return _to(dict(enc), self.device, self.dtype)

    def prefill(self, inp, fused):
        from transformers import DynamicCache

        mask = inp["attention_mask"]
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=inp["input_ids"], attention_mask=mask, cache=cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1], _DecodeState(out.cache, mask, mask.shape[1])

    def step(self, tok, st):
        st.length += 1
        mask = st.mask(tok.shape[0])
        pos = torch.full_like(tok, st.length - 1)
        out = self.model(input_ids=tok, attention_mask=mask, position_ids=pos, cache=st.cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def supports_static(self):
        return self.compiled_step

    def static_prefill(self, inp, fused, max_len):
        mask = inp["attention_mask"]
        cache = static_cache(self, self.model.config, mask.shape[0], max_len)
        out = self.model(input_ids=inp["input_ids"], attention_mask=mask, cache=cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1], StaticState(cache, mask, max_len)

    def static_step_fn(self):
        model = self.model

        def step(tok, pos, full_mask, lm_cache, memory, ssm_state):
            return model(input_ids=tok, attention_mask=full_mask, position_ids=pos, cache=lm_cache,
                         use_cache=True, logits_to_keep=1).logits[:, -1]

        return step

    def weight_bytes(self, batch):
        return decoder_step_bytes(self.model, self.model.get_input_embeddings(), self.model.get_output_embeddings(), batch)

    def cache_bytes(self, batch, context):
        return lm_cache_bytes(self.model.config, batch, context, torch.empty((), dtype=self.dtype).element_size())


# ---------------------------------------------------------------------------------------------------- building
@dataclass
class Suite:
    preset: Preset
    tokenizer: object
    image: Image.Image
    question: str
    variants: dict  # name -> Variant
    device: torch.device
    dtype: torch.dtype
    build_s: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    release_check: dict | None = None  # preset release: the converted S4 against the release's, float64


def quantize_int8(parent: nn.Module, names: list[str]) -> None:
    """int8 weights for CPU: dynamic quantization (torch.ao; int8 weights, activations quantized on the fly) of every
    nn.Linear inside the children `names` of `parent` -- the decoding path (decoder, fusion module). Vision towers stay
    in floating point: they run once per image, and SigLIP2 reads its patch embedding's weight dtype."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            child = getattr(parent, name, None)
            if child is None:
                continue
            holder = nn.ModuleDict({"m": child})  # lets a bare nn.Linear child be swapped too
            quantize_dynamic(holder, {nn.Linear}, dtype=torch.qint8, inplace=True)
            setattr(parent, name, holder["m"])


def build_suite(preset_name: str, device: torch.device, dtype: torch.dtype, names: list[str], int8: bool = False,
                seed: int = 0, progress=None, model_dir: str | None = None, quantize=(),
                adapter: str | None = None) -> Suite:
    """Build the requested variants with random weights (seeded) at the preset's shapes.

    Firebolt-VL (firebolt, firebolt_nocache) comes from `model_dir` when given (a saved model directory, e.g. the
    output of convert-release); with preset "release" from a release-format checkpoint of random weights at the real
    shapes, converted by `convert_release` (see bench/release_model.py); else it is built from the preset's config.
    `quantize` ('int8', 'int4'): the same Firebolt-VL model, weight-only quantized (firebolt_vl.quantize), added as
    variants firebolt_int8 / firebolt_int4 next to the floating-point `firebolt`."""
    import time

    from transformers import AutoConfig, AutoModelForCausalLM, Lfm2VlConfig, Lfm2VlForConditionalGeneration

    from ..configuration import FireboltConfig
    from ..modeling import FireboltForConditionalGeneration
    from ..presets import tiny_text_config
    from ..processing import FireboltProcessor

    preset = make_preset(preset_name)
    tok = bench_tokenizer()
    # tiny: a wide initialisation so random models emit varied tokens (the loops' token checks then mean something)
    text = dict(preset.text) if preset.text is not None else tiny_text_config(len(tok), tokenizer=tok,
                                                                                initializer_range=0.5)
    image = bench_image(preset.vl_tile)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    suite = Suite(preset, tok, image, QUESTION, {}, device, dtype)
    if int8 and device.type != "cpu":
        raise ValueError("--int8 (dynamic quantization of nn.Linear) is a CPU option")

    def finish(model, int8_targets):
        model = model.eval().to(device=device, dtype=dtype)
        if int8:
            for parent, names in int8_targets(model):
                quantize_int8(parent, names)
        return model

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        suite.build_s[name] = time.perf_counter() - t0
        if progress is not None:
            progress(name)
        return out

    def firebolt(fusion_type):
        torch.manual_seed(seed)
        cfg = FireboltConfig(vision_config=dict(preset.vision), text_config=dict(text), image_token_id=image_token_id,
                             fusion_type=fusion_type, **preset.firebolt)
        model = finish(FireboltForConditionalGeneration(cfg),
                       lambda m: [(m, ["language_model", "cmm" if m.cmm is not None else "projector"])])
        return model, FireboltProcessor.from_config(cfg, tok)

    def converted():
        if model_dir is not None:
            from ..hub import load_model_dir

            model, proc = load_model_dir(model_dir, adapter=adapter)
            suite.notes.append(f"firebolt / firebolt_nocache: the model directory {model_dir}"
                               + (f" with the adapter {adapter}" if adapter else ""))
        else:
            from .release_model import build_release_model

            model, proc, report = build_release_model(text, dict(preset.vision), tok, seed)
            suite.notes.append(
                "firebolt / firebolt_nocache: random weights written in the authors' release format at its shapes "
                f"(SigLIP2-base 256 px, LFM2-350M, CMM 4x32 top-k 4, S4 d_state 64 with C~ and l_kernel 512), "
                f"converted by firebolt_vl.release.convert_release: {report['ssm_type']} "
                f"ssm_config {report['ssm_config']}, native views")
            suite.release_check = report.get("s4_check")
        return finish(model, lambda m: [(m, ["language_model", "cmm" if m.cmm is not None else "projector"])]), proc

    fb = None
    if "firebolt" in names or "firebolt_nocache" in names:
        from_release = model_dir is not None or preset.name == "release"
        model, proc = timed("firebolt", converted if from_release else (lambda: firebolt("cmm")))
        fb = FireboltVariant("firebolt", model, proc, image, QUESTION, device, dtype)
        if "firebolt" in names:
            suite.variants["firebolt"] = fb
        if "firebolt_nocache" in names:
            suite.variants["firebolt_nocache"] = FireboltNoCacheVariant(fb)
        if "firebolt_eager" in names:  # the same model (shared weights) through the eager decoding step
            eager = FireboltVariant("firebolt_eager", fb.model, fb.processor, image, QUESTION, device, dtype)
            eager.compiled_step = False
            eager.description += "; eager decoding step (DynamicCache), the reference of the compiled one"
            suite.variants["firebolt_eager"] = eager
        for mode in quantize:
            import copy

            from ..quantize import quantize_model

            name = f"firebolt_{mode}"
            qmodel = timed(name, lambda: quantize_model(copy.deepcopy(fb.model), mode))
            suite.variants[name] = FireboltVariant(name, qmodel, fb.processor, image, QUESTION, device, dtype)
            suite.variants[name].description += f"; {mode} weight-only (torchao) decoder + CMM"
            names = [*names, name] if name not in names else names
    if "prepend" in names:
        model, proc = timed("prepend", lambda: firebolt("prepend"))
        suite.variants["prepend"] = FireboltVariant("prepend", model, proc, image, QUESTION, device, dtype)
    if "lfm2_vl" in names:
        def vl():
            torch.manual_seed(seed)
            cfg = Lfm2VlConfig(vision_config=dict(preset.vl_vision), text_config=dict(text),
                               image_token_id=image_token_id, projector_hidden_size=preset.vl_projector_hidden,
                               downsample_factor=preset.vl_downsample)
            return finish(Lfm2VlForConditionalGeneration(cfg),
                          lambda m: [(m.model, ["language_model", "multi_modal_projector"]), (m, ["lm_head"])])

        model = timed("lfm2_vl", vl)
        proc = fb.processor if fb is not None else FireboltProcessor(tok)
        suite.variants["lfm2_vl"] = Lfm2VlVariant(model, tok, proc, image, QUESTION, preset, device, dtype)
    if "lfm2" in names:
        def lm():
            torch.manual_seed(seed)
            return finish(AutoModelForCausalLM.from_config(AutoConfig.for_model(**text)),
                          lambda m: [(m, ["model", "lm_head"])])

        model = timed("lfm2", lm)
        proc = fb.processor if fb is not None else FireboltProcessor(tok)
        suite.variants["lfm2"] = Lfm2Variant(model, proc, QUESTION, device, dtype)
    # keep the requested order
    suite.variants = {n: suite.variants[n] for n in names if n in suite.variants}
    return suite
