"""Load test for the server: N concurrent clients send chat completions; prints requests/s, tokens/s and latencies.

    python -m firebolt_vl.serve.loadtest --preset tiny --clients 32 --requests 128       # in-process server, tiny model
    python -m firebolt_vl.serve.loadtest --model DIR --max-batch-size 1                   # no batching, to compare
    python -m firebolt_vl.serve.loadtest --url http://127.0.0.1:8000 --model-name NAME   # a running `firebolt-vl serve`

With --preset/--model the server runs in this process (uvicorn in a thread); the client side is one asyncio loop
(httpx), light next to the model but sharing the CPU: a separate `firebolt-vl serve` process gives cleaner figures.
Half of the requests carry an image (a data: URL) unless --no-image.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import tempfile
import time


def _payload(i: int, image_url: str | None, max_tokens: int, temperature: float, model_name: str | None) -> dict:
    prompts = ["What color is the circle?", "How many shapes are there?", "Describe the picture briefly.",
               "Is there a red circle on the left?"]
    parts = [{"type": "text", "text": prompts[i % len(prompts)]}]
    if image_url is not None and i % 2 == 0:
        parts.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    body = {"messages": [{"role": "user", "content": parts}], "max_tokens": max_tokens, "temperature": temperature,
            "ignore_eos": True}
    if model_name:
        body["model"] = model_name
    return body


async def _run(url: str, clients: int, requests: int, max_tokens: int, image_url: str | None, temperature: float,
               model_name: str | None, api_key: str | None) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    latencies, tokens, failures = [], 0, 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def worker(c):
        nonlocal tokens, failures
        while not queue.empty():
            i = queue.get_nowait()
            t0 = time.perf_counter()
            try:
                body = _payload(i, image_url, max_tokens, temperature, model_name)
                r = await c.post("/v1/chat/completions", json=body)
            except httpx.TransportError as e:
                print(f"request {i}: {type(e).__name__}: {e}")
                failures += 1
                continue
            latencies.append(time.perf_counter() - t0)
            if r.status_code == 200:
                tokens += r.json()["usage"]["completion_tokens"]
            else:
                failures += 1

    async with httpx.AsyncClient(base_url=url, timeout=600, headers=headers, trust_env=False,
                                 limits=httpx.Limits(max_connections=clients + 4)) as c:
        await c.post("/v1/chat/completions", json=_payload(0, image_url, 2, temperature, model_name))  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(worker(c) for _ in range(clients)))
        wall = time.perf_counter() - start
        health = (await c.get("/health")).json()
    lat = sorted(latencies) or [float("nan")]
    return {
        "requests": requests, "clients": clients, "failures": failures, "wall_s": wall,
        "requests_per_s": requests / wall, "tokens_per_s": tokens / wall,
        "p50_s": statistics.median(lat), "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))], "max_s": lat[-1],
        "batches": health.get("batches"), "rows": health.get("rows"),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server")
    src.add_argument("--model", help="serve this model directory in-process")
    src.add_argument("--preset", choices=["tiny"], help="serve a tiny random model in-process")
    p.add_argument("--model-name", default=None, help="the model id to send (with --url)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-image", action="store_true")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the in-process server (default: one fewer than the cores)")
    args = p.parse_args(argv)

    from PIL import Image, ImageDraw

    from ..testing import png_bytes

    img = Image.new("RGB", (96, 80), (240, 240, 240))
    ImageDraw.Draw(img).ellipse((10, 10, 30, 30), fill=(220, 20, 20))
    image_url = None if args.no_image else "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()

    server, url = None, args.url
    if url is None:
        import torch

        from .app import ServerConfig, start_server

        import os

        # as `firebolt-vl serve` does on a CPU: leave a core to the HTTP side (and here, to the client)
        torch.set_num_threads(args.threads or min(torch.get_num_threads(), max(1, (os.cpu_count() or 2) - 1)))
        if args.preset:
            from ..presets import build_tiny

            with tempfile.TemporaryDirectory() as work:
                model, processor = build_tiny(work, init_std=0.5)
            model.eval()
        else:
            from ..hub import load_model_dir, resolve_device

            model, processor = load_model_dir(args.model, resolve_device("auto"))
        config = ServerConfig(max_batch_size=args.max_batch_size, max_queue=max(64, args.clients * 2),
                              max_tokens_limit=max(2048, args.max_tokens))
        server = start_server(model, processor, config)
        url = server.url
    try:
        r = asyncio.run(_run(url, args.clients, args.requests, args.max_tokens, image_url, args.temperature,
                             args.model_name if args.url else None, args.api_key))
    finally:
        if server is not None:
            server.stop()
    print(f"{r['requests']} requests from {r['clients']} clients, {args.max_tokens} tokens each "
          f"(max batch {args.max_batch_size if not args.url else 'server'}): {r['wall_s']:.2f} s, "
          f"{r['requests_per_s']:.1f} requests/s, {r['tokens_per_s']:.0f} tokens/s, latency p50 {r['p50_s']:.2f} s "
          f"p95 {r['p95_s']:.2f} s max {r['max_s']:.2f} s, failures {r['failures']}, "
          f"server batches {r['batches']} for {r['rows']} rows")
    return 0 if r["failures"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
