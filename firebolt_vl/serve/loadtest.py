"""Load test for the server: streaming chat completions with mixed answer lengths and Poisson arrivals, from 1..N
concurrent clients, against the static and the continuous scheduler in the same run.

    python -m firebolt_vl.serve.loadtest --preset tiny --clients 1,8,32 --requests 96            # both schedulers
    python -m firebolt_vl.serve.loadtest --preset paper --clients 8 --requests 16 --max-tokens 64  # paper shapes
    python -m firebolt_vl.serve.loadtest --model DIR --schedulers continuous --rate 4            # a model directory
    python -m firebolt_vl.serve.loadtest --url http://127.0.0.1:8000 --model-name NAME           # a running server

Workload (seeded, the same for every scheduler and client count): request i asks for a length drawn uniformly from
--min-tokens..--max-tokens (ignore_eos, so that is its exact answer length), half of them with an image. With
--rate R the requests arrive as a Poisson process of R per second (exponential gaps); at most --clients are in flight
and an arrival waits for a free client; --rate 0 is a closed loop (each client sends its next request at once).

Figures per run: output tokens/s over the wall time, requests/s, end-to-end latency, and time to first token (TTFT)
and time per output token (TPOT, each gap between two tokens of a row) as p50/p95/p99. With --preset/--model the
server runs in this process (uvicorn in a thread) and TTFT/TPOT come from the engine's token hooks (queueing to the
first token, then the gaps; exact, unaffected by text the tokenizer shows late or never, as a random model's
out-of-vocabulary ids are); with --url they are measured on the client from the first content chunk. The client is
one asyncio loop in the same process, light next to the model but sharing the CPU: compare schedulers within a run.
The last stdout line is JSON with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import tempfile
import threading
import time


def _percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]  # noqa: E731 (nearest rank)
    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99)}


def workload(requests: int, min_tokens: int, max_tokens: int, rate: float, seed: int = 0) -> list[tuple[float, int]]:
    """[(arrival time in s from the start, max_tokens)] for each request; arrival 0 for all when rate is 0."""
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= --min-tokens <= --max-tokens, got {min_tokens}, {max_tokens}")
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(requests):
        out.append((t, rng.randint(min_tokens, max_tokens)))
        if rate > 0:
            t += rng.expovariate(rate)
    return out


def _payload(i: int, image_url: str | None, max_tokens: int, model_name: str | None) -> dict:
    prompts = ["What color is the circle?", "How many shapes are there?", "Describe the picture briefly.",
               "Is there a red circle on the left?"]
    parts = [{"type": "text", "text": prompts[i % len(prompts)]}]
    if image_url is not None and i % 2 == 0:
        parts.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    body = {"messages": [{"role": "user", "content": parts}], "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if model_name:
        body["model"] = model_name
    return body


class _EngineTimings:
    """Collects the engine's TTFT / inter-token samples (seconds), passing them on to the hooks already there."""

    def __init__(self, engine):
        self.lock = threading.Lock()
        self.ttft: list[float] = []
        self.tpot: list[float] = []
        self.previous = engine.timing

        def first(s):
            with self.lock:
                self.ttft.append(s)
            if self.previous is not None:
                self.previous.first_token(s)

        def nxt(s):
            with self.lock:
                self.tpot.append(s)
            if self.previous is not None:
                self.previous.next_token(s)

        from .engine import TokenTiming

        engine.timing = TokenTiming(first_token=first, next_token=nxt)

    def take(self) -> tuple[list[float], list[float]]:
        with self.lock:
            out = (self.ttft, self.tpot)
            self.ttft, self.tpot = [], []
        return out


async def _run(url: str, clients: int, plan: list[tuple[float, int]], image_url: str | None,
               model_name: str | None, api_key: str | None, timings: _EngineTimings | None) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    latencies, ttft_client, tpot_client = [], [], []
    tokens, failures = 0, 0
    free = asyncio.Semaphore(clients)

    async def one(c, i: int, arrival: float, n: int, start: float):
        nonlocal tokens, failures
        await asyncio.sleep(max(0.0, start + arrival - time.perf_counter()))
        async with free:
            t0 = time.perf_counter()
            first = last = None
            got = 0
            try:
                async with c.stream("POST", "/v1/chat/completions", json=_payload(i, image_url, n, model_name)) as r:
                    if r.status_code != 200:
                        await r.aread()
                        print(f"request {i}: HTTP {r.status_code}: {r.text[:200]}")
                        failures += 1
                        return
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            print(f"request {i}: {chunk['error']}")
                            failures += 1
                            return
                        if chunk.get("usage"):
                            got = chunk["usage"]["completion_tokens"]
                        for choice in chunk.get("choices", []):
                            if choice["delta"].get("content"):
                                now = time.perf_counter()
                                first = now if first is None else first
                                last = now
            except httpx.TransportError as e:
                print(f"request {i}: {type(e).__name__}: {e}")
                failures += 1
                return
            latencies.append(time.perf_counter() - t0)
            tokens += got
            if first is not None:
                ttft_client.append(first - t0)
                if got > 1 and last > first:
                    tpot_client.append((last - first) / (got - 1))

    async with httpx.AsyncClient(base_url=url, timeout=3600, headers=headers, trust_env=False,
                                 limits=httpx.Limits(max_connections=clients + 4)) as c:
        warm = _payload(0, image_url, 2, model_name)  # warm-up, not counted
        async with c.stream("POST", "/v1/chat/completions", json=warm) as r:
            await r.aread()
        if timings is not None:
            timings.take()
        start = time.perf_counter()
        await asyncio.gather(*(one(c, i, a, n, start) for i, (a, n) in enumerate(plan)))
        wall = time.perf_counter() - start
    if timings is not None:
        ttft, tpot, source = *timings.take(), "engine"
    else:
        ttft, tpot, source = ttft_client, tpot_client, "client"
    return {
        "clients": clients, "requests": len(plan), "failures": failures, "wall_s": wall, "tokens": tokens,
        "tokens_per_s": tokens / wall, "requests_per_s": len(plan) / wall, "latency_s": _percentiles(latencies),
        "ttft_s": _percentiles(ttft), "tpot_s": _percentiles(tpot), "timing_source": source,
    }


def _build(args):
    """(model, processor) for --preset / --model."""
    import torch

    if args.preset == "tiny":
        from ..presets import build_tiny

        with tempfile.TemporaryDirectory() as work:
            model, processor = build_tiny(work, init_std=0.5)
        return model.eval(), processor
    if args.preset == "paper":  # SigLIP2-base 256 px + LFM2-350M shapes, random weights, the benchmark's tokenizer
        from ..bench.suite import bench_tokenizer, make_preset
        from ..configuration import FireboltConfig
        from ..modeling import FireboltForConditionalGeneration
        from ..processing import FireboltProcessor

        preset = make_preset("paper")
        tok = bench_tokenizer()
        torch.manual_seed(0)
        cfg = FireboltConfig(vision_config=dict(preset.vision), text_config=dict(preset.text),
                             image_token_id=tok.convert_tokens_to_ids("<image>"), fusion_type="cmm", **preset.firebolt)
        return FireboltForConditionalGeneration(cfg).eval(), FireboltProcessor.from_config(cfg, tok)
    from ..hub import load_model_dir, resolve_device

    return load_model_dir(args.model, resolve_device("auto"))


def _row(name: str, r: dict) -> str:
    ms = lambda d: "/".join(f"{1000 * d[k]:.0f}" for k in ("p50", "p95", "p99"))  # noqa: E731
    return (f"{name:<11} {r['clients']:>3} {r['requests']:>4} {r['wall_s']:7.1f} {r['tokens_per_s']:8.1f} "
            f"{r['requests_per_s']:6.2f} {ms(r['ttft_s']):>17} {ms(r['tpot_s']):>14} {ms(r['latency_s']):>17} "
            f"{r['failures']:>4}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server")
    src.add_argument("--model", help="serve this model directory in-process")
    src.add_argument("--preset", choices=["tiny", "paper"],
                     help="serve random weights in-process: tiny, or paper shapes (SigLIP2-base 256 px + LFM2-350M)")
    p.add_argument("--model-name", default=None, help="the model id to send (with --url)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--schedulers", default="static,continuous",
                   help="comma-separated, each measured on the same workloads in this run (in-process only)")
    p.add_argument("--clients", default="32", help="comma-separated concurrent client counts, e.g. 1,8,32,64")
    p.add_argument("--requests", type=int, default=64, help="requests per (scheduler, client count)")
    p.add_argument("--min-tokens", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--rate", type=float, default=0.0, help="Poisson arrivals per second (0: closed loop)")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload (lengths, arrival gaps)")
    p.add_argument("--no-image", action="store_true")
    p.add_argument("--max-batch-size", type=int, default=None, help="the engine's rows at once (default: the most "
                   "clients asked for, so both schedulers may batch every client)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the in-process server (default: one fewer than the cores)")
    p.add_argument("--output", default=None, help="also write the JSON figures here")
    args = p.parse_args(argv)
    client_counts = [int(c) for c in args.clients.split(",") if c.strip()]
    schedulers = [s.strip() for s in args.schedulers.split(",") if s.strip()]
    if not client_counts or min(client_counts) < 1:
        p.error("--clients: give positive client counts, e.g. 1,8,32")
    from .engine import SCHEDULERS

    if args.url:
        schedulers = ["server"]
    elif not schedulers or set(schedulers) - set(SCHEDULERS):
        p.error(f"--schedulers: choose from {','.join(SCHEDULERS)}")

    from PIL import Image, ImageDraw

    from ..testing import png_bytes

    img = Image.new("RGB", (96, 80), (240, 240, 240))
    ImageDraw.Draw(img).ellipse((10, 10, 30, 30), fill=(220, 20, 20))
    image_url = None if args.no_image else "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()
    plan = workload(args.requests, args.min_tokens, args.max_tokens, args.rate, args.seed)
    batch = args.max_batch_size or max(client_counts)

    model = processor = None
    if not args.url:
        import torch

        from .cli import set_serve_threads

        # as `firebolt-vl serve` on a CPU: a core left to HTTP (and here, to the client)
        set_serve_threads(torch.device("cpu"), args.threads)
        model, processor = _build(args)
    header = (f"{'scheduler':<11} {'cl':>3} {'req':>4} {'wall_s':>7} {'tok/s':>8} {'req/s':>6} "
              f"{'TTFT ms p50/95/99':>17} {'TPOT p50/95/99':>14} {'latency p50/95/99':>17} {'fail':>4}")
    print(f"workload: {args.requests} requests, {args.min_tokens}..{args.max_tokens} tokens each "
          f"({sum(n for _, n in plan)} in all), rate {args.rate or 'closed loop'}, max batch {batch}", flush=True)
    print(header, flush=True)
    results = []
    for scheduler in schedulers:
        server, url, timings, engine = None, args.url, None, None
        if url is None:
            from .app import ServerConfig, ServerThread, create_app
            from .engine import Engine

            config = ServerConfig(max_batch_size=batch, max_queue=max(64, 2 * args.requests),
                                  max_tokens_limit=max(2048, args.max_tokens), scheduler=scheduler)
            engine = Engine(model, processor, batch, config.max_queue, config.batch_wait_ms / 1000, scheduler)
            server = ServerThread(create_app(model, processor, config, engine=engine), "127.0.0.1", 0,
                                  "warning").start()
            url = server.url
            timings = _EngineTimings(engine)  # after the app's start-up, which plugs its metrics into the engine
        try:
            for clients in client_counts:
                before = dict(engine.stats) if engine is not None else {}
                r = asyncio.run(_run(url, clients, plan, image_url, args.model_name if args.url else None,
                                     args.api_key, timings))
                r["scheduler"] = scheduler
                if engine is not None:  # static: batches run; continuous: join groups and decoding steps
                    r["engine"] = {k: engine.stats[k] - before[k] for k in ("batches", "steps")}
                results.append(r)
                print(_row(scheduler, r), flush=True)
        finally:
            if server is not None:
                server.stop()
    ratios = {}
    by = {(r["scheduler"], r["clients"]): r for r in results}
    for clients in client_counts:
        s, c = by.get(("static", clients)), by.get(("continuous", clients))
        if s and c:
            ratios[clients] = {"tokens_per_s": c["tokens_per_s"] / s["tokens_per_s"],
                               "ttft_p95": c["ttft_s"]["p95"] / s["ttft_s"]["p95"],
                               "tpot_p50": c["tpot_s"]["p50"] / s["tpot_s"]["p50"]}
            print(f"continuous / static at {clients} clients: tokens/s x{ratios[clients]['tokens_per_s']:.2f}, "
                  f"TTFT p95 x{ratios[clients]['ttft_p95']:.2f}, TPOT p50 x{ratios[clients]['tpot_p50']:.2f}")
    out = {"workload": {"requests": args.requests, "min_tokens": args.min_tokens, "max_tokens": args.max_tokens,
                        "rate": args.rate, "seed": args.seed, "image": not args.no_image, "max_batch_size": batch,
                        "source": args.url or args.preset or args.model},
           "runs": results, "continuous_over_static": ratios}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))
    return 0 if all(r["failures"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
