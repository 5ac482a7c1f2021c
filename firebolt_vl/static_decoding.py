"""Decoding through a static cache and one compiled step: `generate(compile=MODE)` and the benchmark's compiled path.

Glossary
    B batch rows   T prompt tokens   N new tokens   L cache columns (>= T + N)   D decoder width   V vocabulary

The eager `decode_step` (modeling.py) is the reference. Its decoder cache grows by one column per token (a new shape
every step), so `torch.compile` cannot specialise it. Here every tensor a step touches has a fixed shape and address:

    decoder cache    transformers StaticCache: (B, H, L, Dh) keys/values per attention layer + LFM2's conv states
    attention mask   (B, L): the prompt's mask (left padding 0), then ones; a column past the current token is hidden
                     by the causal mask, not by this one
    positions        (B, 1): each row's position id of the next token (left padding skipped), advanced in place
    SSM state        the CMM's recurrent state, in fixed buffers the step overwrites in place
    CMM memory       the image's grid keys/values and FiLM tables, made eagerly at prefill

`static_step(model)` is one decoding step as a plain function of those tensors (mode "static" runs it as it is);
`compile_decode_step` compiles it. `StaticDecoder` keeps the buffers per (B, L) and a compiled step per mode.
`generate` rounds T + N up to a length bucket (`length_bucket`: a power of two, at least 256), so a few shapes serve
every prompt. Each new (B, L) compiles once: seconds for the tiny test models, 20-50 s at LFM2-350M shapes on 2 CPU
cores. On a CPU it pays off at batch 1 over several long answers (chat, a one-user server), not for one short answer,
and not at batch 8, where the step is no longer a weight stream (docs/bench/README.md).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

COMPILE_MODES = ("static", "default", "reduce-overhead", "max-autotune", "reduction")
MIN_BUCKET = 256  # the shortest cache generate allocates
COMPILE_HELP = ("decode through a static cache and a torch.compile'd step: reduction (the fastest batch-1 CPU step: "
                "1.6x the eager step's tok/s at LFM2-350M shapes on 2 cores), default, reduce-overhead (CUDA graphs), "
                "max-autotune, static (uncompiled). Each new batch size and length bucket compiles once (20-50 s at "
                "those shapes); at batch 8 it gained nothing on CPU (docs/bench/README.md)")


def add_compile_argument(p, advice: str) -> None:
    """The commands' --compile MODE option (checked by `check_compile_mode` where the command runs)."""
    p.add_argument("--compile", default=None, metavar="MODE", help=f"{COMPILE_HELP}; {advice}")


def length_bucket(n: int) -> int:
    """Cache columns for n tokens: the smallest power of two >= max(n, MIN_BUCKET)."""
    return max(MIN_BUCKET, 1 << (max(1, n) - 1).bit_length())


# ------------------------------------------------------------------------------------------------ compilation
class DecodeOpsAsReductions(torch.overrides.TorchFunctionMode):
    """Inside this mode two library calls of a batch-1 decoding step are computed as element-wise products and sums
    (the same maths in another summation order, equal within float rounding):

        F.linear over a single row      x (..., K) one row, W (N, K):  (x * W).sum(-1) (+ bias)          -> (..., N)
        F.conv1d depthwise, short input  x (B, C, L), L <= 2 k, W (C, 1, k), groups C, no padding/stride/dilation:
                                         (x.unfold(-1, k, 1) * W).sum(-1) (+ bias)                      -> (B, C, L-k+1)

    Meant for tracing the step with `torch.compile` on CPU: Inductor turns the sums into vectorised, multi-threaded
    streaming reductions over the weights (faster than the BLAS GEMV a Linear layer otherwise becomes) and fuses the
    few-tap convolutions of LFM2's short-conv layers (each otherwise a oneDNN call costing more than its arithmetic);
    see `compile_decode_step`. Other inputs, and weights of other tensor types (quantized), go to the library."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if type(weight) in (torch.Tensor, nn.Parameter) and weight.dim() == 2 and x.numel() == x.shape[-1]:
                y = (x.reshape(1, -1) * weight).sum(-1)  # (N,)
                if bias is not None:
                    y = y + bias
                return y.reshape(*x.shape[:-1], weight.shape[0])
        elif func is torch.conv1d:
            y = _depthwise_conv1d_as_sum(*args, **kwargs)
            if y is not None:
                return y
        return func(*args, **kwargs)


def _depthwise_conv1d_as_sum(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """F.conv1d for a depthwise, unpadded, unit-stride convolution over a short input as a sum over the taps, or None
    for any other convolution. x (B, C, L), weight (C, 1, k) -> (B, C, L - k + 1)."""
    simple = all((v if isinstance(v, int) else tuple(v)) in (s, (s,)) for v, s in ((stride, 1), (padding, 0),
                                                                                      (dilation, 1)))
    if not (simple and type(weight) in (torch.Tensor, nn.Parameter) and x.dim() == 3 and weight.dim() == 3):
        return None
    C, k = weight.shape[0], weight.shape[-1]
    if groups != C or weight.shape[1] != 1 or x.shape[1] != C or not k <= x.shape[-1] <= 2 * k:
        return None
    y = (x.unfold(-1, k, 1) * weight).sum(-1)  # (B, C, L-k+1, k) * (C, 1, k) -> (B, C, L-k+1)
    return y if bias is None else y + bias.view(1, C, 1)


def check_compile_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return mode


def compile_decode_step(step, mode: str):
    """Compile a decoding step function for static shapes (static cache, fixed buffers).

    mode: a torch.compile mode ("default", "reduce-overhead" = CUDA graphs, "max-autotune"), "static" (no
    compilation: the step as it is), or "reduction": torch.compile (default mode) with single-row Linears and short
    depthwise convolutions traced as products + sums (`DecodeOpsAsReductions`), the fastest batch-1 CPU step measured
    (docs/bench/README.md). The eager step stays the reference: a compiled step equals it within float rounding."""
    if check_compile_mode(mode) == "static":
        return step
    if mode == "reduction":
        inner = step

        def step(*args, **kwargs):
            with DecodeOpsAsReductions():
                return inner(*args, **kwargs)

        mode = "default"
    return torch.compile(step, mode=None if mode == "default" else mode, dynamic=False)


# ------------------------------------------------------------------------------------------------ static state
def fixed_address(t: torch.Tensor) -> torch.Tensor:
    """Tag a buffer as living at a fixed address (lets torch.compile's CUDA graphs keep it in place)."""
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(t)
    return t


def new_static_cache(text_config, max_len: int):
    """A transformers StaticCache of max_len columns (its tensors are allocated at the first prefill)."""
    from transformers import StaticCache

    return StaticCache(config=text_config, max_cache_len=max_len)


@dataclass
class StaticState:
    """A batch after its prefill into a static cache: what every decoding step reads and writes."""

    lm_cache: object  # transformers StaticCache, max_len columns
    prompt_mask: torch.Tensor  # (B, T) 1 = token, 0 = left padding
    max_len: int  # L
    memory: object = None  # the CMM's GridMemory (None: no image in the batch, or no CMM)
    ssm_state: tuple | None = None  # the CMM's SSM state, in fixed buffers

    def full_mask(self) -> torch.Tensor:
        """(B, L): the prompt's mask, then ones for the tokens to come."""
        mask = self.prompt_mask.new_ones(self.prompt_mask.shape[0], self.max_len)
        mask[:, : self.prompt_mask.shape[1]] = self.prompt_mask
        return mask

    def first_positions(self) -> torch.Tensor:
        """(B, 1) position id of the first new token of each row."""
        return self.prompt_mask.long().sum(-1, keepdim=True)


def prepare_cmm_step(cmm, memory) -> None:
    """Make, eagerly, the tensors the CMM's step caches on first use (per-image FiLM tables, the SSM's step
    matrices), so that a compiled step only reads them."""
    if cmm is None:
        return
    if memory is not None and callable(getattr(cmm, "film_tables", None)):
        cmm.film_tables(memory)
    if callable(getattr(cmm.ssm, "_step_params", None)):
        cmm.ssm._step_params()
        if getattr(cmm.ssm, "window", None):
            cmm.ssm._window_dB()  # the windowed S4's dA^W dB


def static_step(model):
    """One Firebolt-VL decoding step over a static cache, as a plain function (the function `torch.compile` traces):

        step(tok (B, 1), pos (B, 1), full_mask (B, L), lm_cache, memory, ssm_state) -> logits (B, V)

    The fusion is `decode_step`'s (`model.step_embeds`); the new SSM state is copied into `ssm_state`'s buffers."""

    def step(tok, pos, full_mask, lm_cache, memory, ssm_state):
        embeds, new_state = model.step_embeds(tok, memory, ssm_state)  # (B, 1, D)
        if ssm_state is not None:
            for old, new in zip(ssm_state, new_state):
                if new is not old:  # the CMM stepped (not a text-only batch, not "pooled")
                    old.copy_(new)  # in place: fixed addresses
        logits = model.language_model(inputs_embeds=embeds, attention_mask=full_mask, position_ids=pos,
                                      cache=lm_cache, use_cache=True, logits_to_keep=1).logits
        return logits[:, -1]

    return step


class StaticDecoder:
    """A model's static caches and SSM buffers per batch shape (the `max_shapes` most recent) and its compiled step
    per mode. Get it with `FireboltForConditionalGeneration.static_decoder()`."""

    def __init__(self, model, max_shapes: int = 4):
        self.model = model
        self.owner = id(model)  # a deep copy of the model carries this object: it must not use it (see static_decoder)
        self.max_shapes = max_shapes
        self._buffers: OrderedDict = OrderedDict()  # (B, L, inference, device, dtype) -> [StaticCache, SSM bufs]
        self._steps: dict = {}  # mode -> compiled step
        self._compiled_shapes: set = set()  # (mode, B, L, inference) seen: the first call of each compiles

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor, memory=None, ssm_state=None,
                max_len: int | None = None) -> tuple[torch.Tensor, StaticState]:
        """Decoder over fused embeds (B, T, D) into a static cache of max_len columns (default T):
        -> last-token logits (B, V) and the StaticState the steps continue."""
        B, T = attention_mask.shape
        max_len = T if max_len is None else max_len
        if max_len < T:
            raise ValueError(f"static cache of {max_len} columns is shorter than the prompt ({T} tokens)")
        # inference tensors are writable only in inference mode; a model moved to another device needs new buffers
        key = (B, max_len, torch.is_inference_mode_enabled(), embeds.device, embeds.dtype)
        bufs = self._buffers.pop(key, None)
        if bufs is None:
            bufs = [new_static_cache(self.model.config.text_config, max_len), None]
            while len(self._buffers) >= self.max_shapes:
                self._buffers.popitem(last=False)
        else:
            bufs[0].reset()
        self._buffers[key] = bufs  # most recent last
        if ssm_state is not None:
            if bufs[1] is None:
                bufs[1] = tuple(fixed_address(torch.empty_like(t)) for t in ssm_state)
            for buf, t in zip(bufs[1], ssm_state):
                buf.copy_(t)
            ssm_state = bufs[1]
        prepare_cmm_step(self.model.cmm, memory)
        out = self.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                        position_ids=self.model._positions(attention_mask), cache=bufs[0],
                                        use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], StaticState(bufs[0], attention_mask, max_len, memory, ssm_state)

    def step_fn(self, mode: str):
        """The step for `mode` (see `compile_decode_step`), compiled once per mode."""
        if mode not in self._steps:
            self._steps[mode] = compile_decode_step(static_step(self.model), mode)
        return self._steps[mode]

    def stepper(self, st: StaticState, mode: str):
        """tok (B, 1) -> logits (B, V) of the next token, over `st`; positions advance in place."""
        fn = self.step_fn(mode)
        full_mask, pos = st.full_mask(), st.first_positions()
        shape = (mode, pos.shape[0], st.max_len, torch.is_inference_mode_enabled())
        first = mode != "static" and shape not in self._compiled_shapes

        def step(tok: torch.Tensor) -> torch.Tensor:
            nonlocal first
            if first:
                log.info("compiling the decoding step (mode %s) for batch %d, cache length %d", *shape[:3])
                try:
                    logits = fn(tok, pos, full_mask, st.lm_cache, st.memory, st.ssm_state)
                except Exception as e:
                    raise RuntimeError(f"torch.compile of the decoding step failed (mode {mode!r}): "
                                       f"{type(e).__name__}: {e}; decode without compiling (compile=None)") from e
                self._compiled_shapes.add(shape)
                first = False
            else:
                logits = fn(tok, pos, full_mask, st.lm_cache, st.memory, st.ssm_state)
            pos.add_(1)
            return logits

        return step

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None,
              max_len: int, mode: str):
        """Vision, fusion and the static prefill of a prompt batch (what `generate` does before its first token):
        -> logits (B, V) of the first new token and the step function for the next ones."""
        model = self.model
        image_embeds = model.encode_images(pixel_values) if pixel_values is not None else None
        embeds, memory, state, _ = model.fuse(input_ids, attention_mask, image_embeds)
        logits, st = self.prefill(embeds, attention_mask, memory, state, max_len)
        return logits, self.stepper(st, mode)
