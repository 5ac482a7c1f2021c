"""`firebolt-vl build` and `firebolt-vl generate`."""

from __future__ import annotations

import tempfile


def add_build_arguments(p):
    p.add_argument("--vision", help="SigLIP/SigLIP2 checkpoint: local directory or hub id")
    p.add_argument("--language", help="LFM2 (or any causal LM) checkpoint with its tokenizer: local directory or hub id")
    p.add_argument("--preset", choices=["tiny"], help="build from tiny random checkpoints instead (offline demos/tests)")
    p.add_argument("--output", required=True, help="directory to write the model into")
    p.add_argument("--fusion-type", default="cmm", choices=["cmm", "prepend", "cross_attention"])
    p.add_argument("--output-mode", default="replace", choices=["replace", "pooled"])
    p.add_argument("--ssm-type", default="s4", choices=["s4", "s4d", "mamba"])
    p.add_argument("--d-state", type=int, default=None, help="SSM state size (default: the SSM's own, 64 for S4)")
    p.add_argument("--cmm-heads", type=int, default=4)
    p.add_argument("--cmm-head-dim", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4, help="grids kept per token (0 = all)")
    p.add_argument("--cmm-dropout", type=float, default=0.1)
    p.add_argument("--ffn-mult", type=float, default=4.0)
    p.add_argument("--gate-init", type=float, default=0.5)
    p.add_argument("--grid", default="2x2", help="tiles as ROWSxCOLS")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--tile-size", type=int, default=128)
    p.add_argument("--tile-overlap", type=int, default=2)
    p.add_argument("--no-global-view", action="store_true")
    views = p.add_mutually_exclusive_group()
    views.add_argument("--native-views", dest="native_views", action="store_const", const=True, default=None,
                       help="encode views at their own pixel sizes (the authors' geometry: global view + 128 px "
                            "tiles, two encoder calls). Default: native when --image-size equals the encoder's "
                            "training size (the release's settings, 512 patch tokens), resized otherwise")
    views.add_argument("--resized-views", dest="native_views", action="store_const", const=False,
                       help="resize every view to the encoder's training size (one batched encoder call; 5 x 256 = "
                            "1,280 patch tokens at the release's settings)")
    p.add_argument("--seed", type=int, default=0)


def build(
    output: str,
    vision: str | None = None,
    language: str | None = None,
    preset: str | None = None,
    fusion_type: str = "cmm",
    output_mode: str = "replace",
    ssm_type: str = "s4",
    d_state: int | None = None,
    cmm_heads: int = 4,
    cmm_head_dim: int = 32,
    top_k: int = 4,
    cmm_dropout: float = 0.1,
    ffn_mult: float = 4.0,
    gate_init: float = 0.5,
    grid: str = "2x2",
    image_size: int = 256,
    tile_size: int = 128,
    tile_overlap: int = 2,
    no_global_view: bool = False,
    native_views: bool | None = None,
    seed: int = 0,
) -> int:
    """Assemble a new model (fresh fusion module) and save it with its tokenizer and processor into `output`."""
    import torch

    from .hub import save_model_dir
    from .modeling import FireboltForConditionalGeneration
    from .presets import build_tiny

    try:
        rows, cols = (int(x) for x in grid.lower().split("x"))
    except ValueError:
        raise ValueError(f"--grid must look like 2x2, got {grid!r}") from None
    fusion = dict(fusion_type=fusion_type, output_mode=output_mode, ssm_type=ssm_type, grid_rows=rows, grid_cols=cols,
                  add_global_view=not no_global_view, native_views=native_views)
    if preset == "tiny":
        if vision or language:
            raise ValueError("--preset tiny builds its own checkpoints: drop --vision/--language")
        with tempfile.TemporaryDirectory() as work:
            model, processor = build_tiny(work, seed=seed, **fusion)
    else:
        if not (vision and language):
            raise ValueError("give --vision and --language checkpoints, or --preset tiny")
        torch.manual_seed(seed)
        ssm_config = {"d_state": d_state} if d_state else {}
        model, processor = FireboltForConditionalGeneration.from_components(
            vision, language, cmm_heads=cmm_heads, cmm_head_dim=cmm_head_dim, cmm_top_k=top_k,
            cmm_dropout=cmm_dropout, cmm_ffn_mult=ffn_mult, cmm_gate_init=gate_init, ssm_config=ssm_config,
            image_size=image_size, tile_size=tile_size, tile_overlap=tile_overlap, **fusion)
    save_model_dir(model, processor, output)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved {model.config.fusion_type} model ({n / 1e6:.2f}M parameters, G={model.config.num_grids}) to {output}")
    return 0


def add_generate_arguments(p):
    from .hub import THREADS_HELP
    from .quantize import add_quantize_argument

    p.add_argument("--model", required=True, help="Firebolt-VL model directory (or a LoRA adapter directory)")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory applied on top of --model")
    p.add_argument("--image", default=None, help="image file (omit for a text-only prompt)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16")
    add_quantize_argument(p)
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)


def generate(
    model: str,
    prompt: str,
    image: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    device: str = "auto",
    dtype: str | None = None,
    adapter: str | None = None,
    quantize: str | None = None,
    threads: int | None = None,
) -> int:
    """Print the model's answer to `prompt` about `image`."""
    print(answer(model, prompt, image, max_new_tokens, temperature, top_p, seed, device, dtype, adapter, quantize,
                 threads))
    return 0


def answer(model_dir, prompt, image=None, max_new_tokens=64, temperature=0.0, top_p=1.0, seed=0, device="auto", dtype=None,
           adapter=None, quantize=None, threads=None) -> str:
    import torch

    from .hub import load_model_dir, parse_dtype, resolve_device, set_threads
    from .processing import load_image

    pil = load_image(image) if image is not None else None  # bad images fail before the model loads
    dev = resolve_device(device)
    set_threads(dev, threads)
    model, processor = load_model_dir(model_dir, dev, parse_dtype(dtype), adapter=adapter, quantize=quantize)
    if pil is not None:
        pil = load_image(pil, processor.max_image_pixels)
    inputs = processor(processor.build_prompt(prompt, pil is not None), images=pil)
    inputs = {k: v.to(dev) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                         temperature=max(temperature, 1e-5), top_p=top_p, generator=gen)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:]).strip()
