"""Firebolt-VL: grid vision encoder -> fusion (CMM by default) -> LFM2 decoder, with O(1)-per-token cached decoding.

Glossary
    B batch   T tokens   G grids per image   N_img images in the batch   D = D_t decoder width   V vocabulary

Forward (training / prefill):
    pixel_values (N_img, 3, S, S) --GridVisionEncoder--> X_v (N_img, G, D_v)
    input_ids (B, T) --embed--> X_t (B, T, D)
    fusion "cmm":  X_out = CMM(X_t, X_v)                                      (B, T, D)
        output_mode "replace": inputs_embeds = X_out (authors' release)
        output_mode "pooled":  inputs_embeds = X_t with the <image> slot set to mean_T(X_out) (paper text)
    fusion "prepend" / "cross_attention": projector(X_v) written at the <image> tokens (processor writes N of them)
    decoder (any causal LM, LFM2 by default): inputs_embeds -> logits (B, T, V)

Decoding keeps, next to the decoder's own cache, the image's correlation keys/values and the CMM's SSM state
(`FireboltCache`), so each new token costs one CMM step and one decoder step, whatever the length so far.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PreTrainedModel,
)
from transformers.modeling_outputs import ModelOutput

from .cmm import CrossModalModulator, GridMemory
from .configuration import FireboltConfig, FireboltLegacyConfig
from .fusion import CrossAttentionResampler, PrependProjector
from .sampling import check_repetition_penalty, penalise_repeats, sampling_warpers
from .vision import GridVisionEncoder

IGNORE_INDEX = -100


@dataclass
class FireboltCache:
    """Everything decoding needs besides the new token: the decoder's cache and the CMM's image memory and SSM state."""

    lm: object  # the decoder's cache (transformers DynamicCache: LFM2 KV + short-conv states)
    attention_mask: torch.Tensor  # (B, T_so_far) 1 = token, 0 = left padding
    positions: torch.Tensor  # (B,) position id of the last token of each row
    memory: GridMemory | None = None  # CMM grid keys/values, computed once per image
    ssm_state: tuple | None = None  # CMM SSM state after the last token


@dataclass
class FireboltOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: FireboltCache | None = None
    cmm_weights: torch.Tensor | None = None  # (B, T, G) head-averaged top-k grid weights, when asked for


class FireboltPreTrainedModel(PreTrainedModel):
    config_class = FireboltConfig
    config: FireboltConfig
    base_model_prefix = "firebolt"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["CrossModalModulator"]

    def _init_weights(self, module):
        if getattr(module, "_firebolt_keep_init", False):
            return  # SSM parameters keep their structured initialisation (HiPPO / dt ranges)
        if isinstance(module, CrossModalModulator):
            with torch.no_grad():
                module.gate.fill_(self.config.cmm_gate_init)
                if module.grid_embed is not None:
                    module.grid_embed.normal_()  # unit scale, like the components of a SigLIP embedding
        elif isinstance(module, CrossAttentionResampler):
            nn.init.normal_(module.queries, std=module.queries.shape[-1] ** -0.5)
        else:
            super()._init_weights(module)


class FireboltForConditionalGeneration(FireboltPreTrainedModel):
    def __init__(self, config: FireboltConfig):
        super().__init__(config)
        self.vision = GridVisionEncoder(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        d_text, d_vision = config.text_config.hidden_size, config.vision_config.hidden_size
        self.cmm = self.projector = None
        if config.fusion_type == "cmm":
            self.cmm = CrossModalModulator(
                d_text,
                d_vision,
                heads=config.cmm_heads,
                head_dim=config.cmm_head_dim,
                top_k=config.cmm_top_k,
                dropout=config.cmm_dropout,
                ffn_mult=config.cmm_ffn_mult,
                gate_init=config.cmm_gate_init,
                ssm_type=config.ssm_type,
                ssm_kwargs=config.ssm_config,
                grid_embeddings=config.num_grids if config.cmm_grid_embeddings else 0,
            )
        elif config.fusion_type == "prepend":
            self.projector = PrependProjector(d_vision, d_text)
        else:
            self.projector = CrossAttentionResampler(d_vision, d_text, num_queries=config.num_queries)
        self.post_init()

    # ---- building from real checkpoints ----
    @classmethod
    def from_components(
        cls,
        vision: str,
        language: str,
        *,
        native_views: bool | None = None,
        dtype: torch.dtype | None = None,
        **config_kwargs,
    ):
        """Assemble a new Firebolt-VL from a SigLIP/SigLIP2 checkpoint and a causal-LM checkpoint (local dirs or hub
        ids). The fusion module is freshly initialised; returns (model, processor).

        `native_views=True` keeps the authors' view geometry (global view at image_size, tiles at tile_size: two
        encoder calls, 256 + 4 x 64 = 512 patch tokens at the release's settings); False resizes every view to the
        encoder's training size so all views go through one batched call (5 x 256 = 1,280 patch tokens there).
        None (default): native when the global view is already at the encoder's training size (the release's
        settings: a 256 px encoder, image_size 256, 128 px tiles), where resizing the tiles up would only multiply the
        encoder's work; resized otherwise.
        """
        from transformers import AutoTokenizer

        from .processing import FireboltProcessor, ensure_image_token
        from .vision import encoder_native_size

        for name, path in (("vision", vision), ("language", language)):
            if os.path.sep in str(path) and not os.path.isdir(path):
                raise FileNotFoundError(f"{name} checkpoint directory not found: {path}")
        encoder = load_vision_tower(vision, dtype=dtype)
        lm = AutoModelForCausalLM.from_pretrained(language, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(language)
        image_token_id = ensure_image_token(tokenizer)
        if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
            lm.resize_token_embeddings(len(tokenizer))
        native_size = encoder_native_size(encoder.config)
        if native_views is None:
            native_views = config_kwargs.get("image_size", FireboltConfig.image_size) == native_size
        if not native_views:
            config_kwargs.setdefault("view_size", native_size)
        config = FireboltConfig(
            vision_config=encoder.config.to_dict(),
            text_config=lm.config.to_dict(),
            image_token_id=image_token_id,
            **config_kwargs,
        )
        model = cls(config)
        model.vision.encoder.load_state_dict(encoder.state_dict())
        model.language_model.load_state_dict(lm.state_dict())
        if dtype is not None:
            model.to(dtype)
        processor = FireboltProcessor.from_config(config, tokenizer)
        return model, processor

    # ---- pieces (also timed one by one by the benchmark) ----
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N_img, 3, S, S) -> X_v (N_img, G, D_v)."""
        return self.vision(pixel_values)

    def _image_rows(self, input_ids: torch.Tensor, n_images: int) -> torch.Tensor:
        """Which rows hold an image, checked against the number of images: (B,) bool."""
        counts = (input_ids == self.config.image_token_id).sum(-1)  # (B,)
        has_image = counts > 0
        per_image = self.config.image_seq_length
        if (counts[has_image] != per_image).any() or int(has_image.sum()) != n_images:
            raise ValueError(
                f"image tokens do not match images: {counts.tolist()} <image> tokens per row for {n_images} image(s); "
                f"each row holds at most one image written as {per_image} <image> token(s) (use FireboltProcessor)"
            )
        return has_image

    def fuse(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        pool_mask: torch.Tensor | None = None,
        return_weights: bool = False,
    ):
        """Text tokens + grid embeddings -> decoder inputs_embeds (B, T, D), the CMM memory and SSM state, weights."""
        text = self.get_input_embeddings()(input_ids)  # (B, T, D)
        n_images = 0 if image_embeds is None else image_embeds.shape[0]
        has_image = self._image_rows(input_ids, n_images)
        memory = state = weights = None
        if self.cmm is not None:
            if image_embeds is not None:
                full = image_embeds.new_zeros(input_ids.shape[0], *image_embeds.shape[1:])  # (B, G, D_v)
                full[has_image] = image_embeds
                memory = self.cmm.grid_memory(full.to(text.dtype), has_image)
            out, state, weights = self.cmm(text, memory, mask=attention_mask, return_weights=True)
            if self.config.output_mode == "replace":
                embeds = out
                if self.config.text_only_bypass:  # the release: rows without an image skip the CMM
                    embeds = torch.where(has_image.view(-1, 1, 1), out, text)
            else:  # "pooled": one vector, the mean of X_out over the prompt, at the <image> slot
                m = attention_mask if pool_mask is None else pool_mask
                m = torch.ones_like(input_ids) if m is None else m
                m = m.unsqueeze(-1).to(out.dtype)
                pooled = (out * m).sum(1) / m.sum(1).clamp_min(1)  # (B, D)
                slot = (input_ids == self.config.image_token_id).unsqueeze(-1)
                embeds = torch.where(slot, pooled.unsqueeze(1), text)
        else:
            embeds = text
            if image_embeds is not None:
                visual = self.projector(image_embeds.to(text.dtype))  # (N_img, N, D)
                slot = (input_ids == self.config.image_token_id).unsqueeze(-1).expand_as(text)
                embeds = text.masked_scatter(slot, visual.reshape(-1))
        return embeds, memory, state, (weights if return_weights else None)

    @staticmethod
    def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
        """Position ids that skip left padding: (B, T)."""
        return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: FireboltCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        pool_mask: torch.Tensor | None = None,
        output_cmm_weights: bool = False,
        supervised_logits_only: bool = False,
        **kwargs,
    ) -> FireboltOutput:
        """Full-sequence forward (training, prefill) or, with `cache`, a decoding step over new tokens.

        labels (B, T) with IGNORE_INDEX (-100) where no loss is taken; aligned with input_ids (shifted inside).
        supervised_logits_only (training, needs labels): the LM head runs only where the next token is supervised;
        logits are then (N, V), one row per supervised token in row-major order (see `supervised_logits`).
        """
        if cache is not None:
            return self.decode_step(input_ids, cache, logits_to_keep)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_embeds = self.encode_images(pixel_values) if pixel_values is not None else None
        if pool_mask is None and labels is not None:
            pool_mask = attention_mask * (labels == IGNORE_INDEX)  # pool over the prompt only
        embeds, memory, state, weights = self.fuse(input_ids, attention_mask, image_embeds, pool_mask, output_cmm_weights)
        if supervised_logits_only:
            if labels is None:
                raise ValueError("supervised_logits_only=True needs labels")
            logits = self.supervised_logits(embeds, attention_mask, labels)
            loss = F.cross_entropy(logits.float(), self.supervised_targets(labels).to(logits.device))
            return FireboltOutput(loss=loss, logits=logits, cmm_weights=weights)
        out = self.prefill(embeds, attention_mask, memory, state, use_cache, logits_to_keep, **kwargs)
        out.loss = self.loss(out.logits, labels) if labels is not None else None
        out.cmm_weights = weights
        return out

    def prefill(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        memory: GridMemory | None = None,
        ssm_state=None,
        use_cache: bool = True,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> FireboltOutput:
        """Decoder over fused embeddings (B, T, D); with use_cache the returned FireboltCache continues decoding."""
        from transformers import DynamicCache

        position_ids = self._positions(attention_mask)
        lm_cache = DynamicCache(config=self.config.text_config) if use_cache else None
        out = self.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=lm_cache,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        cache = None
        if use_cache:
            cache = FireboltCache(out.cache, attention_mask, position_ids[:, -1], memory, ssm_state)
        return FireboltOutput(logits=out.logits, cache=cache)

    def supervised_logits(self, embeds: torch.Tensor, attention_mask: torch.Tensor,
                          labels: torch.Tensor) -> torch.Tensor:
        """Logits (N, V) of the decoder over fused embeds (B, T', D) at the N positions whose next token is
        supervised (labels[:, 1:] != IGNORE_INDEX, row-major; labels (B, T) align with the last T positions). With
        assistant-only labels most positions are prompt, and the LM head (V x D per position, V = 65,536 for LFM2)
        is skipped there: the same loss as `loss(prefill(...).logits, labels)` for a fraction of the head's cost."""
        hidden = self.language_model.get_decoder()(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=self._positions(attention_mask),
            use_cache=False).last_hidden_state  # (B, T', D)
        hidden = hidden[:, -labels.shape[1] :][:, :-1]  # (B, T-1, D): position t predicts token t+1
        return self.language_model.get_output_embeddings()(hidden[labels[:, 1:] != IGNORE_INDEX])  # (N, V)

    @staticmethod
    def supervised_targets(labels: torch.Tensor) -> torch.Tensor:
        """The N supervised next tokens (N,) of labels (B, T), in the row order of `supervised_logits`."""
        targets = labels[:, 1:]  # position t predicts token t+1
        return targets[targets != IGNORE_INDEX]

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy (fp32) over positions whose label is not IGNORE_INDEX."""
        logits = logits[:, -labels.shape[1] :]
        shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # (B*(T-1), V)
        shift_labels = labels[:, 1:].reshape(-1).to(logits.device)  # (B*(T-1),)
        return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)

    def step_embeds(self, input_ids: torch.Tensor, memory: GridMemory | None, ssm_state):
        """New tokens (B, t) after a cached prefix -> decoder inputs (B, t, D) and the CMM's SSM state after them."""
        embeds = self.get_input_embeddings()(input_ids)  # (B, t, D)
        bypass = self.config.text_only_bypass and memory is None  # no image in the batch: raw embeddings
        if self.cmm is not None and self.config.output_mode == "replace" and not bypass:
            raw = embeds
            if input_ids.shape[1] == 1:
                out, ssm_state = self.cmm.step(embeds[:, 0], memory, ssm_state)
                embeds = out.unsqueeze(1)
            else:
                embeds, ssm_state = self.cmm(embeds, memory, state=ssm_state)
            if self.config.text_only_bypass:
                embeds = torch.where(memory.present.view(-1, 1, 1), embeds, raw)
        return embeds, ssm_state

    def decode_step(self, input_ids: torch.Tensor, cache: FireboltCache, logits_to_keep: int = 0) -> FireboltOutput:
        """New tokens (B, t) after the cached prefix: one CMM recurrence + one decoder step each."""
        t = input_ids.shape[1]
        embeds, cache.ssm_state = self.step_embeds(input_ids, cache.memory, cache.ssm_state)
        ones = cache.attention_mask.new_ones(input_ids.shape[0], t)
        cache.attention_mask = torch.cat([cache.attention_mask, ones], dim=1)
        position_ids = cache.positions.unsqueeze(1) + torch.arange(1, t + 1, device=input_ids.device)  # (B, t)
        cache.positions = position_ids[:, -1]
        out = self.language_model(
            inputs_embeds=embeds,
            attention_mask=cache.attention_mask,
            position_ids=position_ids,
            cache=cache.lm,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        cache.lm = out.cache
        return FireboltOutput(logits=out.logits, cache=cache)

    def static_decoder(self):
        """This model's `StaticDecoder` (static caches + compiled decoding steps, firebolt_vl.static_decoding),
        made on first use; a deep copy of the model makes its own."""
        from .static_decoding import StaticDecoder

        decoder = self.__dict__.get("_static_decoder")
        if decoder is None or decoder.owner != id(self):
            decoder = self.__dict__["_static_decoder"] = StaticDecoder(self)
        return decoder

    # ---- generation ----
    def _default_ids(self, eos_token_id, pad_token_id) -> tuple[list[int], int]:
        """EOS ids and the pad id: the arguments, else the decoder config's."""
        tc = self.config.text_config
        eos = tc.eos_token_id if eos_token_id is None else eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        pad = tc.pad_token_id if pad_token_id is None else pad_token_id
        if pad is None:
            pad = eos[0] if eos else 0
        return eos, pad

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        ignore_eos: bool = False,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        streamer=None,
        compile: str | None = None,
        **unused,
    ) -> torch.LongTensor:
        """Greedy or sampled decoding; returns (B, T + new) token ids like `transformers`' generate.

        Left-padded batches are supported (the processor pads on the left). With `use_cache=False` every step
        recomputes vision, fusion and the whole prefix (the authors' released decoding), the reference for tests.
        `ignore_eos=True` always produces max_new_tokens tokens (benchmarks). `repetition_penalty` (CTRL's, as
        transformers: a seen token's logit is divided by it when positive, multiplied when negative) counts the row's
        own tokens only, never its left padding, so a batched row still equals the row run alone.

        `compile` (with the cache): decode through a static cache and one compiled step (firebolt_vl.static_decoding;
        "reduction" is the fastest batch-1 CPU step, "static" the same layout uncompiled, None the eager step). The
        same tokens within float rounding; each new (batch, length bucket) compiles once, worth it over many answers.
        """
        unknown = set(unused) - {"output_scores", "return_dict_in_generate", "num_beams", "token_type_ids"}
        if unknown:
            raise TypeError(f"generate() got unexpected arguments: {sorted(unknown)}")
        if unused.get("num_beams", 1) != 1:
            raise ValueError("beam search is not supported; use num_beams=1")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if input_ids.numel() == 0 or input_ids.shape[1] == 0:
            raise ValueError("empty prompt: input_ids has no tokens")
        eos, pad = self._default_ids(eos_token_id, pad_token_id)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        warpers = sampling_warpers(temperature, top_k, top_p, min_p) if do_sample else None
        repetition_penalty = check_repetition_penalty(repetition_penalty)
        seen = None  # (B, V) bool: tokens of the row so far (prompt without padding, then its own answer)
        eos_t = torch.tensor(eos, device=input_ids.device) if eos and not ignore_eos else None
        unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        prompt_len = input_ids.shape[1]
        sequences = input_ids
        if streamer is not None:
            streamer.put(input_ids.cpu())

        def choose(logits: torch.Tensor) -> torch.Tensor:
            nonlocal seen
            logits = logits.float()
            if repetition_penalty != 1.0:
                if seen is None:
                    counts = torch.zeros(logits.shape, dtype=torch.long, device=logits.device)
                    seen = counts.scatter_add_(1, input_ids, attention_mask.long()) > 0
                logits = penalise_repeats(logits, seen, repetition_penalty)
            if not do_sample:
                return logits.argmax(-1)
            probs = warpers(sequences, logits).softmax(-1)
            return torch.multinomial(probs, 1, generator=generator).squeeze(1)

        static = compile is not None and use_cache  # the static cache + compiled step
        if static:
            from .static_decoding import check_compile_mode, length_bucket

            logits, static_step = self.static_decoder().start(
                input_ids, attention_mask, pixel_values, length_bucket(prompt_len + max_new_tokens),
                check_compile_mode(compile))
        elif use_cache:
            out = self(input_ids, attention_mask, pixel_values, use_cache=True, logits_to_keep=1)
            logits, cache = out.logits[:, -1], out.cache
        else:
            out = self(input_ids, attention_mask, pixel_values, logits_to_keep=1, pool_mask=attention_mask)
            logits = out.logits[:, -1]
        for step in range(max_new_tokens):
            nxt = choose(logits)  # (B,)
            if eos_t is not None:
                nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad))
                unfinished = unfinished & ~torch.isin(nxt, eos_t)
            if seen is not None:
                seen[torch.arange(nxt.shape[0], device=nxt.device), nxt] = True
            sequences = torch.cat([sequences, nxt[:, None]], dim=1)
            if streamer is not None:
                streamer.put(nxt.cpu())
            if step == max_new_tokens - 1 or (eos_t is not None and not bool(unfinished.any())):
                break
            if static:
                logits = static_step(nxt[:, None])
            elif use_cache:
                logits = self.decode_step(nxt[:, None], cache, logits_to_keep=1).logits[:, -1]
            else:
                mask = torch.cat([attention_mask, attention_mask.new_ones(input_ids.shape[0], sequences.shape[1] - prompt_len)], 1)
                pool = F.pad(attention_mask, (0, sequences.shape[1] - prompt_len))
                logits = self(sequences, mask, pixel_values, logits_to_keep=1, pool_mask=pool).logits[:, -1]
        if streamer is not None:
            streamer.end()
        return sequences


def load_vision_tower(path_or_id: str, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The vision tower of a SigLIP / SigLIP2 checkpoint (full dual-encoder or vision-only)."""
    from transformers import Siglip2VisionModel, SiglipVisionModel

    cfg = AutoConfig.from_pretrained(path_or_id)
    classes = {
        "siglip": SiglipVisionModel,
        "siglip_vision_model": SiglipVisionModel,
        "siglip2": Siglip2VisionModel,
        "siglip2_vision_model": Siglip2VisionModel,
    }
    if cfg.model_type not in classes:
        raise ValueError(
            f"{path_or_id}: expected a SigLIP or SigLIP2 checkpoint, found model_type {cfg.model_type!r}"
        )
    return classes[cfg.model_type].from_pretrained(path_or_id, dtype=dtype)


AutoConfig.register(FireboltConfig.model_type, FireboltConfig, exist_ok=True)
AutoConfig.register(FireboltLegacyConfig.model_type, FireboltLegacyConfig, exist_ok=True)  # saved before the rename
AutoModel.register(FireboltConfig, FireboltForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(FireboltConfig, FireboltForConditionalGeneration, exist_ok=True)
