"""`firebolt-vl serve`, `firebolt-vl chat` and `firebolt-vl explain`: command functions and their arguments (heavy imports
stay inside the functions so building the CLI parser stays cheap)."""

from __future__ import annotations

import sys
from pathlib import Path


def _model_arguments(p) -> None:
    from ..quantize import add_quantize_argument

    p.add_argument("--model", required=True, help="Firebolt-VL model directory")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory applied on top of --model")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: as saved)")
    add_quantize_argument(p)


def _load(model: str, device: str, dtype: str | None, adapter: str | None = None, quantize: str | None = None):
    from ..hub import load_model_dir, parse_dtype, resolve_device

    return load_model_dir(model, resolve_device(device), parse_dtype(dtype), adapter=adapter, quantize=quantize)


# ---- serve ----
def set_serve_threads(device, threads: int | None) -> None:
    """The server's torch intra-op threads: `threads` if given, else on a CPU one fewer than the cores. The engine's
    threads spin between ops; the event loop and image decoding keep a core (on 2 cores, 1 thread served ~10x more
    requests/s than 2)."""
    import os

    import torch

    from ..hub import set_threads

    set_threads(device, threads, cpu_default=lambda: min(torch.get_num_threads(), max(1, (os.cpu_count() or 2) - 1)))


def add_serve_arguments(p) -> None:
    from ..static_decoding import add_compile_argument

    _model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the folder's name)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes "
                   "(default: the FIREBOLT_API_KEY environment variable, else no key)")
    p.add_argument("--allowed-dir", default=None, help="accept local image paths / file:// URLs inside this folder")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs from public addresses (size-limited, with a timeout; loopback, "
                        "private, link-local, multicast and reserved addresses are refused after every redirect)")
    p.add_argument("--allowed-media-domains", default=None,
                   help="comma-separated hosts remote images may come from (subdomains included); default: any")
    p.add_argument("--allow-media-network", action="append", default=None, metavar="CIDR",
                   help="also fetch remote images from this network (e.g. an intranet image store); repeatable")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long the static scheduler waits to fill a batch")
    p.add_argument("--scheduler", choices=["continuous", "static"], default="continuous",
                   help="continuous: requests join the running batch between decoding steps and finished rows leave "
                        "at once; static: a batch runs until its longest row ends (the earlier engine)")
    add_compile_argument(p, "needs --scheduler static; a CPU server for one user pairs it with --max-batch-size 1")
    p.add_argument("--max-body-bytes", type=int, default=32 * 2**20)
    p.add_argument("--max-image-bytes", type=int, default=20 * 2**20)
    p.add_argument("--max-image-pixels", type=int, default=None, help="default: the processor's limit")
    p.add_argument("--max-prompt-tokens", type=int, default=4096)
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="the largest max_tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the model on a CPU device (default: one fewer than the cores, so the "
                        "HTTP side keeps a core: on 2 cores, 1 thread served ~10x more requests/s than 2)")
    p.add_argument("--shutdown-grace-s", type=float, default=30.0,
                   help="on SIGINT/SIGTERM, answer 503 to new requests and let running ones finish for this long")
    p.add_argument("--log-level", default="info")


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    dtype: str | None = None,
    adapter: str | None = None,
    quantize: str | None = None,
    served_model_name: str | None = None,
    api_key: str | None = None,
    allowed_dir: str | None = None,
    allow_remote_images: bool = False,
    allowed_media_domains: str | None = None,
    allow_media_network: list[str] | None = None,
    max_batch_size: int = 8,
    max_queue: int = 64,
    batch_wait_ms: float = 5.0,
    scheduler: str = "continuous",
    compile: str | None = None,
    max_body_bytes: int = 32 * 2**20,
    max_image_bytes: int = 20 * 2**20,
    max_image_pixels: int | None = None,
    max_prompt_tokens: int = 4096,
    max_tokens_limit: int = 2048,
    default_max_tokens: int = 256,
    threads: int | None = None,
    shutdown_grace_s: float = 30.0,
    log_level: str = "info",
) -> int:
    """Serve the model over an OpenAI-compatible HTTP API until interrupted."""
    import ipaddress
    import os

    from ..hub import resolve_device
    from .app import GracefulServer, ServerConfig, create_app
    from .engine import check_serve_compile

    check_serve_compile(scheduler, compile)
    set_serve_threads(resolve_device(device), threads)

    if allowed_dir is not None and not Path(allowed_dir).is_dir():
        raise NotADirectoryError(f"--allowed-dir is not a directory: {allowed_dir}")
    domains = tuple(d.strip() for d in (allowed_media_domains or "").split(",") if d.strip())
    networks = tuple(allow_media_network or ())
    for net in networks:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ValueError(f"--allow-media-network: not a network (CIDR): {net!r}") from None
    if (domains or networks) and not allow_remote_images:
        raise ValueError("--allowed-media-domains / --allow-media-network need --allow-remote-images")
    if not 0 <= port < 65536:
        raise ValueError(f"--port must be in 0..65535, got {port}")
    api_key = api_key or os.environ.get("FIREBOLT_API_KEY") or None
    config = ServerConfig(
        model_name=served_model_name or Path(model).resolve().name, api_key=api_key, allowed_dir=allowed_dir,
        allow_remote_images=allow_remote_images, allowed_media_domains=domains, allowed_media_networks=networks,
        max_body_bytes=max_body_bytes, max_image_bytes=max_image_bytes,
        max_image_pixels=max_image_pixels, max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit,
        default_max_tokens=default_max_tokens, max_queue=max_queue, max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms, scheduler=scheduler, compile=compile, shutdown_grace_s=shutdown_grace_s,
    )
    from ..hub import check_model_dir

    check_model_dir(model)  # a missing or wrong directory fails now, with one line, not after the server started
    app = create_app(config=config, loader=lambda: _load(model, device, dtype, adapter, quantize))
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: listening on {host} without an API key", file=sys.stderr)
    print(f"serving {config.model_name!r} at http://{host}:{port}/v1 once loaded (/health says when; Ctrl-C drains "
          f"running requests for up to {shutdown_grace_s:g} s, twice to stop at once)", file=sys.stderr, flush=True)
    GracefulServer(app, host=host, port=port, log_level=log_level).run()
    return 0


# ---- chat ----
def add_chat_arguments(p) -> None:
    from ..hub import THREADS_HELP
    from ..static_decoding import add_compile_argument

    _model_arguments(p)
    p.add_argument("--image", default=None, help="image to talk about (change it with /image PATH)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    add_compile_argument(p, "pays off after a few long answers")


def chat(
    model: str,
    image: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    system: str | None = None,
    device: str = "auto",
    dtype: str | None = None,
    adapter: str | None = None,
    quantize: str | None = None,
    threads: int | None = None,
    compile: str | None = None,
) -> int:
    """Interactive multi-turn chat in the terminal, answers streamed as they are generated."""
    from ..hub import resolve_device, set_threads
    from ..static_decoding import check_compile_mode
    from .chat import ChatSession, run_chat

    if compile is not None:
        check_compile_mode(compile)
    if image is not None and not Path(image).is_file():
        raise FileNotFoundError(f"image file not found: {image}")
    if max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    set_threads(resolve_device(device), threads)
    loaded, processor = _load(model, device, dtype, adapter, quantize)
    session = ChatSession(loaded, processor, image, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, seed=seed, system=system, compile=compile)
    return run_chat(session)


# ---- explain ----
def add_explain_arguments(p) -> None:
    _model_arguments(p)
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--output", required=True, help="picture to write (.png)")
    p.add_argument("--json", default=None, help="also write the weights (per token, per word, overall) as JSON")
    p.add_argument("--max-words", type=int, default=15, help="word panels drawn (all words go to --json)")


def explain(
    model: str,
    image: str,
    prompt: str,
    output: str,
    json: str | None = None,
    max_words: int = 15,
    device: str = "auto",
    dtype: str | None = None,
    adapter: str | None = None,
    quantize: str | None = None,
) -> int:
    """Draw the CMM's token-to-grid weights over the image, per prompt word and overall."""
    import json as json_module

    from ..processing import atomic_write_text, load_image
    from .explain import explain_weights, render_explanation, require_cmm

    if not Path(image).is_file():
        raise FileNotFoundError(f"image file not found: {image}")
    loaded, processor = _load(model, device, dtype, adapter, quantize)
    require_cmm(loaded)
    pil = load_image(image, processor.max_image_pixels)
    result = explain_weights(loaded, processor, pil, prompt)
    render_explanation(pil, result, output, max_words=max_words)
    if json:
        atomic_write_text(json, json_module.dumps(result.to_dict(), indent=1))
    names = result.view_names()
    top = ", ".join(f"{names[g]} {result.overall[g]:.2f}" for g in result.overall.argsort()[::-1][:3])
    print(f"wrote {output} ({len(result.words)} words, {len(names)} views; overall: {top})")
    return 0
