"""OpenAI-compatible HTTP server for Firebolt-VL (FastAPI; run with uvicorn).

    POST /v1/chat/completions   OpenAI messages (text parts, image_url parts), stream (server-sent events),
                                max_tokens / max_completion_tokens, temperature, top_p, stop, seed; usage counts
    GET  /v1/models             the one model served;  GET /v1/models/{id}
    GET  /health                "starting" (503) until the model is loaded, "ok", "shutting down" (503); queue
                                figures (no API key needed; answers while generation runs)
    GET  /metrics               Prometheus text format (metrics.py), no API key

Shutdown is graceful: `begin_shutdown()` (the first SIGINT/SIGTERM under `firebolt-vl serve`) answers 503 to new
requests while the running and queued rows finish for up to `shutdown_grace_s`; what is left then is cancelled.

Request path: read the body (byte limit, 413) -> JSON (400) -> schema (422) -> settings and limits (400) -> the image
bytes (data: URL / allowed local file / optional remote fetch) -> in a worker thread: decode the image (pixel limit)
and tokenize the chat prompt (token limit) -> the engine's queue (429 when full) -> events back through an asyncio
queue -> one JSON answer or an SSE stream. Endpoints are async and the model runs in the engine's own thread, so a long
generation never blocks `/health`. A client that hangs up (streaming or not) has its row cancelled, so abandoned
requests stop using the engine. Any failure becomes an OpenAI-shaped error; the server keeps running.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, EngineStoppedError, Event, Job, QueueFullError, SamplingParams
from .images import ImagePolicy, image_bytes
from .metrics import ServerMetrics
from .schema import APIError, ChatCompletionRequest, validation_error

log = logging.getLogger("firebolt_vl.serve")


@dataclass
class ServerConfig:
    """Limits and policy of one server. Defaults suit a small model on one machine."""

    model_name: str = "firebolt-vl"
    api_key: str | None = None
    allowed_dir: str | None = None  # local image paths are accepted only inside this folder
    allow_remote_images: bool = False
    allowed_media_domains: tuple = ()  # remote image hosts (and their subdomains); empty: any public host
    allowed_media_networks: tuple = ()  # CIDRs opened for remote images on purpose; otherwise public addresses only
    media_resolver: object = None  # async (host, port) -> [addresses]; None: the system's DNS (tests inject one)
    max_body_bytes: int = 32 * 2**20
    max_image_bytes: int = 20 * 2**20  # local files and remote downloads
    max_image_pixels: int | None = None  # None: the processor's own limit
    max_prompt_tokens: int = 4096
    max_tokens_limit: int = 2048  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256
    max_queue: int = 64
    max_batch_size: int = 8
    batch_wait_ms: float = 5.0
    scheduler: str = "continuous"  # "continuous" (rows join and leave between steps) | "static" (whole batches)
    compile: str | None = None  # static scheduler: decode through generate(compile=MODE)
    remote_timeout_s: float = 10.0
    shutdown_grace_s: float = 30.0  # how long running rows may finish after shutdown begins


class CountRequests:
    """ASGI middleware counting chat-completion answers by HTTP status (a plain ASGI wrapper: Starlette's
    BaseHTTPMiddleware would hide a client's disconnect from the endpoint)."""

    def __init__(self, app, counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await self.app(scope, receive, send)
        status = "500"

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            self.counter.labels(status=status).inc()


class _Served:
    """What the routes use, filled once the model is loaded (at once, or by the loader in the lifespan)."""

    def __init__(self):
        self.processor = self.engine = None
        self.max_pixels: int | None = None
        self.context_length = 0
        self.load_error: BaseException | None = None
        self.shutting_down = False

    def bind(self, model, processor, config: "ServerConfig", engine: Engine | None) -> None:
        self.processor = processor
        self.max_pixels = config.max_image_pixels if config.max_image_pixels is not None else processor.max_image_pixels
        self.context_length = int(getattr(model.config.text_config, "max_position_embeddings", 0) or 0)
        self.engine = engine or Engine(model, processor, config.max_batch_size, config.max_queue,
                                       config.batch_wait_ms / 1000, scheduler=config.scheduler,
                                       compile=config.compile)


def create_app(model=None, processor=None, config: ServerConfig | None = None, engine: Engine | None = None,
               loader=None):
    """The FastAPI app around a loaded model (eval mode) and its processor, or around `loader()` -> (model,
    processor), called in a worker thread once the server listens (so /health can say "starting"). The engine thread
    starts with the app's lifespan and stops with it."""
    if (model is None) == (loader is None):
        raise ValueError("give either model and processor, or a loader")
    config = config or ServerConfig()
    policy = ImagePolicy(config.allowed_dir, config.allow_remote_images, config.max_image_bytes,
                         config.remote_timeout_s, tuple(config.allowed_media_domains),
                         tuple(config.allowed_media_networks), config.media_resolver)
    created = int(time.time())
    served = _Served()
    metrics = ServerMetrics()

    def ready(model, processor) -> None:
        served.bind(model, processor, config, engine)
        metrics.watch(served.engine)
        served.engine.start()
        metrics.loaded.set(1)

    async def load_in_background() -> None:
        try:
            ready(*await run_in_threadpool(loader))
        except Exception as e:  # the server stays up and says why on /health
            log.exception("loading the model failed")
            served.load_error = e

    @asynccontextmanager
    async def lifespan(app):
        task = None
        if loader is None:
            ready(model, processor)
        else:
            task = asyncio.ensure_future(load_in_background())
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            metrics.loaded.set(0)
            if served.engine is not None:
                await run_in_threadpool(served.engine.stop)

    def begin_shutdown() -> None:
        """New requests get 503 from now on; running rows go on (see `ServerThread.stop` / `firebolt-vl serve`)."""
        served.shutting_down = True
        if served.engine is not None:
            served.engine.drain(0)

    app = FastAPI(title="Firebolt-VL", version="0.1.0", lifespan=lifespan)
    app.state.served = served
    app.state.config = config
    app.state.metrics = metrics
    app.state.begin_shutdown = begin_shutdown

    app.add_middleware(CountRequests, counter=metrics.requests)

    # ---- errors: always OpenAI's shape ----
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        err = APIError(422, message, param=param, code="invalid_type")
        return JSONResponse(err.body(), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        message = f"{e.detail}: {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(APIError(e.status_code, message, code=code).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _server_error(request, e: Exception):
        log.exception("unhandled error")
        err = APIError(500, f"internal error: {type(e).__name__}", "server_error")
        return JSONResponse(err.body(), status_code=500)

    def check_auth(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error",
                           code="missing_api_key")
        if not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "incorrect API key", "authentication_error", code="invalid_api_key")

    def engine_or_503() -> Engine:
        if served.shutting_down:
            raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")
        if served.engine is None:
            why = f"the model failed to load: {served.load_error}" if served.load_error else "the model is loading"
            raise APIError(503, why, "server_error", code="unavailable")
        return served.engine

    # ---- routes ----
    @app.get("/health")
    async def health():
        engine = served.engine
        if engine is None:
            status = "error" if served.load_error else "starting"
            return JSONResponse({"status": status, "model": config.model_name}, status_code=503)
        status = "shutting down" if served.shutting_down else ("ok" if engine.alive else "error")
        body = {"status": status, "model": config.model_name, "queue": engine.queue_length(),
                "running": engine.running, **{k: v for k, v in engine.stats.items()}}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=metrics.content_type)

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": created, "owned_by": "firebolt-vl",
                "max_model_len": served.context_length or None}

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        check_auth(request)
        if model_id != config.model_name:
            raise APIError(404, f"model {model_id!r} not found (this server serves {config.model_name!r})",
                           param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        engine = engine_or_503()
        processor = served.processor
        raw = await read_body(request, config.max_body_bytes)
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "the request body nests too deeply", code="invalid_json") from None
        try:
            req = ChatCompletionRequest.model_validate(payload)
        except ValidationError as e:
            raise validation_error(e) from None
        if req.model is not None and req.model != config.model_name:
            raise APIError(404, f"model {req.model!r} not found (this server serves {config.model_name!r})",
                           param="model", code="model_not_found")
        params = sampling_params(req, config)
        messages, image_url = flatten_messages(req)
        data = await image_bytes(image_url, policy) if image_url is not None else None
        text = processor.chat_prompt(messages)
        if len(text) > 64 * config.max_prompt_tokens:  # cheap guard before tokenizing a huge prompt
            raise APIError(400, f"the prompt is far over the limit of {config.max_prompt_tokens} tokens",
                           param="messages", code="context_length_exceeded")
        input_ids, pixel_values = await run_in_threadpool(prepare_inputs, processor, text, data, served.max_pixels)
        n_prompt = len(input_ids)
        if n_prompt > config.max_prompt_tokens:
            raise APIError(400, f"the prompt has {n_prompt} tokens, over the limit of {config.max_prompt_tokens}",
                           param="messages", code="context_length_exceeded")
        if served.context_length and n_prompt + params.max_tokens > served.context_length:
            raise APIError(400, f"prompt ({n_prompt} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                                f"context of {served.context_length} tokens", param="max_tokens",
                           code="context_length_exceeded")

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:  # called from the engine thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(input_ids, pixel_values, params, sink)
        try:
            engine.submit(job)
        except QueueFullError as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full") from None
        except EngineStoppedError as e:
            code = "shutting_down" if served.shutting_down or engine.draining else "unavailable"
            raise APIError(503, str(e), "server_error", code=code) from None

        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        stamp = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                sse_stream(job, events, completion_id, stamp, config.model_name, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        pieces: list[str] = []
        getter, next_check = None, time.monotonic() + 1.0
        try:
            while True:
                if time.monotonic() >= next_check:  # about once a second: is anybody still waiting?
                    next_check = time.monotonic() + 1.0
                    if await request.is_disconnected():
                        job.cancel()  # free the engine's row
                        raise APIError(499, "client closed the request", code="client_closed")
                getter = getter or asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter}, timeout=1.0)
                if not done:
                    continue
                event, getter = getter.result(), None
                if event.kind == "delta":
                    pieces.append(event.text)
                elif event.kind == "error":
                    raise engine_error(event.error)
                else:
                    break
        except asyncio.CancelledError:
            job.cancel()
            raise
        finally:
            if getter is not None:
                getter.cancel()
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": stamp,
            "model": config.model_name,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                         "logprobs": None, "finish_reason": event.finish_reason}],
            "usage": usage(event),
        }

    return app


# ---- request pieces ----
async def read_body(request, limit: int) -> bytes:
    """The body, or 413 past `limit` bytes. An oversize body is drained (up to 4x the limit) before answering, so the
    client reads the 413 instead of a reset connection."""
    declared = request.headers.get("content-length")
    too_large = APIError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
    if declared and declared.isdigit() and int(declared) > 4 * limit:
        raise too_large
    data, seen = bytearray(), 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen <= limit:
            data += chunk
        elif seen > 4 * limit:
            break
    if seen > limit:
        raise too_large
    return bytes(data)


def sampling_params(req: ChatCompletionRequest, config: ServerConfig) -> SamplingParams:
    """Settings of the request, checked against what the model and the limits allow (400 otherwise)."""
    if req.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n", code="unsupported_parameter")
    if req.logprobs or req.top_logprobs is not None:
        param = "logprobs" if req.logprobs else "top_logprobs"
        raise APIError(400, "logprobs / top_logprobs are not supported", param=param, code="unsupported_parameter")
    if req.tools:
        raise APIError(400, "tools are not supported by this model", param="tools", code="unsupported_parameter")
    max_tokens = req.max_completion_tokens or req.max_tokens or min(config.default_max_tokens, config.max_tokens_limit)
    if max_tokens > config.max_tokens_limit:
        raise APIError(400, f"max_tokens is {max_tokens}, over this server's limit of {config.max_tokens_limit}",
                       param="max_tokens", code="max_tokens_too_large")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4:
        raise APIError(400, f"at most 4 stop strings, got {len(stop)}", param="stop", code="invalid_value")
    if any(not s for s in stop):
        raise APIError(400, "stop strings must not be empty", param="stop", code="invalid_value")
    return SamplingParams(
        max_tokens=int(max_tokens),
        temperature=1.0 if req.temperature is None else float(req.temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p),
        min_p=0.0 if req.min_p is None else float(req.min_p),
        repetition_penalty=1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
        seed=req.seed,
        stop=tuple(stop),
        ignore_eos=req.ignore_eos,
    )


def flatten_messages(req: ChatCompletionRequest) -> tuple[list[dict], str | None]:
    """Messages for `processor.chat_prompt` ("developer" read as "system") and the one image URL (or None)."""
    if not req.messages:
        raise APIError(400, "messages must not be empty", param="messages", code="empty_messages")
    out, images = [], []
    for m in req.messages:
        role = "system" if m.role == "developer" else m.role
        if m.content is None or isinstance(m.content, str):
            out.append({"role": role, "content": m.content or ""})
            continue
        parts = []
        for part in m.content:
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
            else:
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                images.append(url)
                parts.append({"type": "image"})
        out.append({"role": role, "content": parts})
    if len(images) > 1:
        raise APIError(400, f"this model takes at most one image per conversation, got {len(images)}",
                       param="messages", code="too_many_images")
    has_text = any((m["content"] if isinstance(m["content"], str) else
                    "".join(p.get("text", "") for p in m["content"])).strip() for m in out)
    if not has_text and not images:
        raise APIError(400, "the messages hold no text and no image", param="messages", code="empty_messages")
    return out, (images[0] if images else None)


def prepare_inputs(processor, text: str, data: bytes | None, max_pixels: int | None):
    """(worker thread) image bytes -> pixels and prompt -> token ids: (ids list, pixel_values (3, S, S) or None)."""
    from PIL import Image

    from ..processing import ImageLoadError, load_image

    image = None
    if data is not None:
        try:
            image = load_image(data, max_pixels)
        except ImageLoadError as e:
            message = str(e).replace("image bytes", "the image")
            code = "image_too_large" if ("too large" in message or "over the limit" in message) else "invalid_image"
            raise APIError(400, message, param="messages", code=code) from None
        except Image.DecompressionBombError as e:
            raise APIError(400, f"image refused: {e}", param="messages", code="image_too_large") from None
    try:
        enc = processor([text], images=[image])
    except ValueError as e:
        raise APIError(400, str(e), param="messages", code="invalid_prompt") from None
    pixel_values = enc["pixel_values"][0] if image is not None else None
    return enc["input_ids"][0].tolist(), pixel_values


def engine_error(error: BaseException | None) -> APIError:
    if isinstance(error, EngineStoppedError):
        return APIError(503, str(error), "server_error", code="unavailable")
    log.error("generation failed: %r", error)
    return APIError(500, f"generation failed: {type(error).__name__}: {error}", "server_error")


def usage(event: Event) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


async def sse_stream(job: Job, events: asyncio.Queue, completion_id: str, stamp: int, model_name: str,
                     include_usage: bool):
    """chat.completion.chunk events: the role first, then content deltas, then the finish_reason (and usage)."""

    def chunk(delta: dict, finish_reason=None, **extra) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": stamp, "model": model_name,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}], **extra}
        if include_usage and "usage" not in body:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await events.get()
            if event.kind == "delta":
                yield chunk({"content": event.text})
            elif event.kind == "done":
                yield chunk({}, event.finish_reason)
                if include_usage:
                    body = {"id": completion_id, "object": "chat.completion.chunk", "created": stamp,
                            "model": model_name, "system_fingerprint": None, "choices": [], "usage": usage(event)}
                    yield f"data: {json.dumps(body)}\n\n"
                break
            else:
                yield f"data: {json.dumps(engine_error(event.error).body())}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # the client went away (or we are done): stop decoding this row


# ---- running ----
class GracefulServer:
    """uvicorn's Server with a graceful first signal: the app answers 503 to new requests while its running rows finish
    (up to `shutdown_grace_s`), then the server exits; a second signal exits at once."""

    def __new__(cls, app, **uvicorn_config):
        import uvicorn

        class _Server(uvicorn.Server):
            draining = False

            def handle_exit(self, sig, frame):
                if self.draining:
                    return super().handle_exit(sig, frame)
                self.begin_drain()

            def begin_drain(self):
                self.draining = True
                app.state.begin_shutdown()
                threading.Thread(target=self._exit_when_idle, daemon=True, name="firebolt-vl-drain").start()

            def _exit_when_idle(self):
                engine = app.state.served.engine
                if engine is not None:
                    engine.drain(app.state.config.shutdown_grace_s)
                    engine.stop()  # what is still running now gets an error event, so its stream closes
                self.should_exit = True

        return _Server(uvicorn.Config(app, **uvicorn_config))


class ServerThread:
    """uvicorn serving `app` from a background thread on an already bound socket (port 0 = a free port).
    Used by the tests and the load test; `firebolt-vl serve` runs uvicorn in the foreground instead."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = GracefulServer(app, log_level=log_level, timeout_graceful_shutdown=5, timeout_keep_alive=30)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="firebolt-vl-uvicorn")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def shutdown(self, timeout: float = 60.0) -> None:
        """Graceful: as the first SIGTERM under `firebolt-vl serve` (503 to new requests, running rows finish)."""
        self.server.begin_drain()
        self.thread.join(timeout)
        self.sock.close()

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def start_server(model, processor, config: ServerConfig | None = None, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning", loader=None) -> ServerThread:
    """Serve in a background thread; returns the started ServerThread (`.url`, `.stop()`, `.shutdown()`)."""
    return ServerThread(create_app(model, processor, config, loader=loader), host, port, log_level).start()
