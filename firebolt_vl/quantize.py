"""Weight-only quantization of the decoding path: int8 (per output channel) and int4 (groups of 128/64/32 input
features) with torchao, and fp16 (16-bit weight storage, fp32 compute) in plain PyTorch, for the LFM2 decoder and the
CMM.

What is quantized (every nn.Linear whose weight is read once per new token):
    language_model   every nn.Linear of the LFM2 decoder (attention and short-conv projections, MLPs) and the LM head
    cmm              q_proj, k_proj, v_proj, film_in, film_out, the FFN
What stays in floating point:
    vision tower     runs once per image, not per token; SigLIP reads its patch embedding's weight dtype
    cmm.ssm          the SSM (A, B, C, dt, D, its output projection): the recurrence carried over the whole answer is
                     the numerically sensitive part, and its weights are ~1% of a step's bytes at the paper's shapes
    norms, the embedding table, conv kernels, biases
The LM head: LFM2 ties it to the embedding table. The head is the largest single matrix a step reads (65536 x 1024 at
the paper's shapes, a fifth of the decoder), so it is quantized; the embedding table stays in floating point (a step
reads one row of it, and torchao's int8 embedding lookup dequantizes the whole matrix). Quantizing breaks the tie in
memory: the resident model holds the fp32 table and an int8 (int4) copy of the head.

Kernels (torchao 0.18, torch 2.13):
    int8  Int8WeightOnlyConfig -> torchao Int8Tensor; on CPU its eager linear converts the int8 weight to the
          activation dtype and calls mm (or, under torch.compile with bf16 activations, aten._weight_int8pack_mm)
    int4  CPU: torchao's PrototypeInt4WeightOnlyConfig -> Int4OpaqueTensor (aten._weight_int4pack_mm_for_cpu);
          the stable Int4WeightOnlyConfig's default packing needs the `mslk` kernels (GPU). CUDA: Int4WeightOnlyConfig
          with the tinygemm "tile_packed_to_4d" packing, which takes bf16 activations only.
    fp16  `HalfWeightLinear`: the weight stored in float16, converted to the activations' dtype at each call, fp32
          activations and accumulation. Eager, the conversion is a pass over the weight (prefill pays it); in the
          compiled decoding step (firebolt_vl.static_decoding, mode "reduction") Inductor fuses it into the
          weight-streaming reduction, which then reads 2 bytes per weight instead of 4. On an AVX2 CPU (no AVX-512,
          no VNNI) that is the one weight format whose decoding beats fp32: the int8 and int4 kernels above, and
          Inductor's own int8 reductions, are compute-bound there (docs/bench/README.md).

Saved form: a model directory keeps its floating-point weights and records the mode in `quantization.json`;
`hub.load_model_dir` quantizes at load. Quantizing fixed weights is deterministic, so the loaded model holds exactly
the integer weights and scales the saved one ran with. (torchao's prototype safetensors support covers Int8Tensor
but not the CPU int4 tensor, so storing the quantized tensors would serve one mode of two.)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("none", "int8", "int4", "fp16")
QUANTIZE_HELP = ("weight-only quantization of the decoder and the CMM: none, int8, int4 (torchao), fp16 (16-bit weight "
                 "storage, fp32 compute: the fastest CPU decoding with --compile reduction) (default: as the model "
                 "directory records, else none)")
FP16_MAX = 65504.0  # the largest finite float16: a layer with a larger weight stays in fp32
QUANT_FILE = "quantization.json"
INT4_GROUP_SIZES = (128, 64, 32)  # the first that divides a layer's input width is used; layers fitting none (or
#                                   with an output width not a multiple of 16, the int4 packing's unit) stay fp


def add_quantize_argument(p) -> None:
    p.add_argument("--quantize", default=None, choices=list(MODES), help=QUANTIZE_HELP)


def check_mode(mode: str | None) -> str:
    """'none' | 'int8' | 'int4' | 'fp16' (None -> 'none'); a clear error for anything else."""
    mode = "none" if mode in (None, "", "fp", "float") else str(mode).lower()
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}: use one of {', '.join(MODES)}")
    return mode


def _torchao():
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise ImportError("quantization needs torchao: pip install 'torchao>=0.18,<0.19'") from None
    return torchao


def target_linears(model) -> dict[str, nn.Linear]:
    """{qualified name: nn.Linear} of the layers `quantize_model` converts (see the module docstring)."""
    out = {}
    roots = [("language_model", getattr(model, "language_model", None)), ("cmm", getattr(model, "cmm", None))]
    for root_name, root in roots:
        if root is None:
            continue
        skip = {id(m) for m in root.ssm.modules()} if root_name == "cmm" and hasattr(root, "ssm") else set()
        for name, m in root.named_modules():
            if isinstance(m, nn.Linear) and id(m) not in skip and type(m.weight) is nn.Parameter:
                out[f"{root_name}.{name}"] = m
    return out


def quantize_model(model, mode: str | None, group_size: int | None = None):
    """Quantize the decoder's and the CMM's nn.Linear weights in place with torchao; returns the model.

    mode: 'none' (no change), 'int8' (weight-only, symmetric, one scale per output channel) or 'int4' (weight-only,
    asymmetric, one scale + zero point per group of `group_size` input features; default: the first of 128, 64, 32
    dividing the layer's width; layers that fit no group or whose output width is not a multiple of 16 stay in
    floating point). `model.firebolt_quantized_layers` lists what was converted. The model must already be on its
    device and in its dtype."""
    mode = check_mode(mode)
    if mode == "none":
        return model
    done_mode = getattr(model, "firebolt_quantization", "none")
    if done_mode == mode:
        return model
    if done_mode != "none":
        raise ValueError(f"the model is already quantized ({done_mode}); load it again to quantize it as {mode}")
    layers = target_linears(model)
    if not layers:
        raise ValueError("nothing to quantize: the model has no decoder / CMM nn.Linear layers")
    if mode == "fp16":
        done = {name for name, m in layers.items() if HalfWeightLinear.convert(m)}
        model.firebolt_quantization = mode
        model.firebolt_quantized_layers = sorted(done)
        return model
    _torchao()
    import logging

    from torchao.quantization import quantize_
    device = next(iter(layers.values())).weight.device
    ids = {id(m) for m in layers.values()}
    if mode == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        configs = [(None, Int8WeightOnlyConfig())]
    else:
        configs = [(g, _int4_config(g, device, model)) for g in ((group_size,) if group_size else INT4_GROUP_SIZES)]
    logging.getLogger("torchao").setLevel(logging.WARNING)  # its per-layer "skipping" lines
    done = set()
    for g, config in configs:
        def pick(m, fqn, g=g):
            # int4 kernels: the input width in whole groups, the output width a multiple of 16 (weight packing)
            return id(m) in ids and id(m) not in done and (g is None or (m.in_features % g == 0
                                                                         and m.out_features % 16 == 0))

        chosen = [m for m in layers.values() if pick(m, "")]
        quantize_(model, config, filter_fn=pick)
        done |= {id(m) for m in chosen}
    model.firebolt_quantization = mode
    model.firebolt_quantized_layers = sorted(n for n, m in layers.items() if id(m) in done)
    return model


def _int4_config(group_size: int, device: torch.device, model):
    if device.type == "cpu":
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False)
    if device.type == "cuda":
        from torchao.quantization import Int4WeightOnlyConfig

        dtype = next(model.parameters()).dtype
        if dtype != torch.bfloat16:
            raise ValueError(f"int4 on CUDA (torchao's tinygemm kernel) takes bf16 activations: load with --dtype bf16 "
                             f"(the model is {dtype})")
        return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d",
                                    set_inductor_config=False)
    raise ValueError(f"int4 weight-only quantization is not available on {device.type} (CPU and CUDA only)")


class HalfWeightLinear(nn.Linear):
    """nn.Linear whose weight is stored in float16 and computed in the activations' dtype: y = x W^T + b with
    W = weight.to(x.dtype). Made from an fp32 nn.Linear by `convert` (the quantize mode "fp16")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    @classmethod
    def convert(cls, linear: nn.Linear) -> bool:
        """Store `linear`'s fp32 weight in float16, in place; False (layer unchanged) for a non-fp32 weight or one
        with a magnitude float16 cannot hold. A weight shared with another module (a tied LM head) is copied, so
        the other module keeps its fp32 tensor."""
        w = linear.weight
        if w.dtype != torch.float32 or not bool(w.detach().abs().max() <= FP16_MAX):
            return False
        linear.weight = nn.Parameter(w.detach().to(torch.float16), requires_grad=False)
        linear.__class__ = cls
        return True


def is_quantized(model) -> bool:
    return getattr(model, "firebolt_quantization", "none") != "none"


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor occupies as stored: a torchao quantized weight counts its integer data, scales and zero points
    (its numel() x element_size() would count the floating-point tensor it stands for)."""
    names = getattr(t, "tensor_data_names", None)
    if names:
        parts = [getattr(t, a, None) for a in (*names, *getattr(t, "optional_tensor_data_names", ()))]
        return sum(x.numel() * x.element_size() for x in parts if isinstance(x, torch.Tensor))
    return t.numel() * t.element_size()


# ---- the saved form: quantization.json next to the floating-point weights ----
def read_mode(directory) -> str:
    """The quantization recorded in a model directory ('none' if it records none)."""
    path = Path(directory) / QUANT_FILE
    if not path.is_file():
        return "none"
    try:
        return check_mode(json.loads(path.read_text()).get("mode"))
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{path} is not a valid quantization record: {e}") from None


def record(mode: str) -> str:
    """The text of quantization.json for `mode`."""
    if check_mode(mode) == "fp16":
        library = f"torch {torch.__version__} (firebolt_vl.quantize.HalfWeightLinear)"
    else:
        import torchao

        library = f"torchao {torchao.__version__}"
    return json.dumps({"mode": check_mode(mode), "library": library,
                       "weights": "stored in floating point; quantized at load by firebolt_vl.quantize.quantize_model "
                                  "(deterministic: the same integer weights and scales every load)",
                       "quantized": "language_model nn.Linear layers incl. the LM head; the CMM's nn.Linear layers "
                                    "outside the SSM"}, indent=1) + "\n"
