"""The OpenAI-compatible server: answers equal `generate`, streaming, limits and bad input (4xx, server keeps going),
concurrency, batching, auth, remote images; and `firebolt-vl serve` from the command line.

Servers run on free loopback ports (uvicorn in a background thread); clients are httpx and, where installed, openai."""

import asyncio
import base64
import functools
import http.server
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from PIL import Image

from firebolt_vl.serve.app import ServerConfig, start_server
from firebolt_vl.serve.engine import Engine, Event, Job, SamplingParams
from firebolt_vl.testing import png_bytes, png_with_header_size

PROMPT = "What color is the circle?"


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def user(text: str, image_url: str | None = None) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": image_url}}] if image_url else []
    parts.append({"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


def reference(model, processor, text: str, image=None, max_tokens=12, temperature=0.0, top_p=1.0, seed=None, stop=()):
    """What `model.generate` answers for the same chat turn: (text, finish_reason, completion_tokens)."""
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": text}]
    enc = processor(processor.chat_prompt([{"role": "user", "content": content}]), images=image)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
                         top_p=top_p, generator=gen)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    eos = model.config.text_config.eos_token_id
    finish, n = "length", len(new)
    if eos in new:
        new, finish, n = new[: new.index(eos)], "stop", new.index(eos) + 1
    answer = processor.decode(new)
    hits = [answer.find(s) for s in stop if s in answer]
    if hits:
        answer, finish = answer[: min(hits)], "stop"
    return answer, finish, n


def client(url: str, **kw) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=120, trust_env=False, **kw)


def read_stream(response) -> tuple[str, str | None, list[dict]]:
    """SSE lines -> (content, finish_reason, chunks)."""
    chunks, text, finish = [], "", None
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        if line == "data: [DONE]":
            break
        chunk = json.loads(line[6:])
        chunks.append(chunk)
        for choice in chunk.get("choices", []):
            text += choice["delta"].get("content") or ""
            finish = choice["finish_reason"] or finish
    return text, finish, chunks


@pytest.fixture(scope="module")
def images(tmp_path_factory, red_image):
    allowed = tmp_path_factory.mktemp("allowed")
    outside = tmp_path_factory.mktemp("outside")
    red_image.save(allowed / "red.png")
    red_image.save(outside / "secret.png")
    return {"allowed": allowed, "outside": outside, "red": red_image}


@pytest.fixture(scope="module")
def red_image():  # module scope for the fixtures below
    from PIL import ImageDraw

    img = Image.new("RGB", (96, 80), (240, 240, 240))
    ImageDraw.Draw(img).ellipse((10, 10, 30, 30), fill=(220, 20, 20))
    return img


@pytest.fixture(scope="module")
def tiny(tiny_factory):
    return tiny_factory()


@pytest.fixture(scope="module")
def server(tiny, images):
    model, processor = tiny
    config = ServerConfig(model_name="tiny", allowed_dir=str(images["allowed"]), max_prompt_tokens=128,
                          max_tokens_limit=1000, max_body_bytes=256 * 1024, max_queue=64, max_batch_size=8)
    srv = start_server(model, processor, config)
    yield srv
    srv.stop()


def test_models_and_health(server):
    with client(server.url) as c:
        assert c.get("/health").json()["status"] == "ok"
        models = c.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        assert c.get("/v1/models/tiny").json()["id"] == "tiny"
        r = c.get("/v1/models/other")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


CASES = {
    "greedy_image": dict(image=True, temperature=0.0, seed=None),
    "sampled_image_seed": dict(image=True, temperature=0.9, top_p=0.8, seed=7),
    "sampled_text_seed": dict(image=False, temperature=1.2, seed=3),
}


@pytest.mark.parametrize("case", CASES)
def test_plain_and_stream_equal_generate(server, tiny, images, case):
    model, processor = tiny
    spec = dict(CASES[case])
    image = images["red"] if spec.pop("image") else None
    expected, finish, n = reference(model, processor, PROMPT, image, max_tokens=12, **spec)
    body = {"model": "tiny", "messages": user(PROMPT, data_url(png_bytes(image)) if image else None),
            "max_tokens": 12, "temperature": spec["temperature"]}
    body.update({k: spec[k] for k in ("top_p", "seed") if spec.get(k) is not None})
    with client(server.url) as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["object"] == "chat.completion"
        assert out["choices"][0]["message"] == {"role": "assistant", "content": expected}
        assert out["choices"][0]["finish_reason"] == finish
        assert out["usage"]["completion_tokens"] == n
        assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + n
        with c.stream("POST", "/v1/chat/completions",
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as s:
            assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
            text, stream_finish, chunks = read_stream(s)
    assert text == expected and stream_finish == finish
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"]["completion_tokens"] == n


def test_openai_client(server, tiny, images):
    openai = pytest.importorskip("openai")
    model, processor = tiny
    expected, finish, _ = reference(model, processor, PROMPT, images["red"], max_tokens=10, temperature=0.7, seed=11)
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    messages = user(PROMPT, data_url(png_bytes(images["red"])))
    out = api.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0.7, seed=11)
    assert out.choices[0].message.content == expected and out.choices[0].finish_reason == finish
    stream = api.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0.7, seed=11,
                                         stream=True)
    pieces = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    assert "".join(pieces) == expected
    assert [m.id for m in api.models.list().data] == ["tiny"]


def test_stop_strings(server, tiny, images):
    model, processor = tiny
    full, _, _ = reference(model, processor, PROMPT, images["red"], max_tokens=16)
    stop = full[5:8]
    assert len(stop) == 3
    expected, finish, _ = reference(model, processor, PROMPT, images["red"], max_tokens=16, stop=(stop,))
    assert finish == "stop" and expected == full[: full.find(stop)]
    body = {"messages": user(PROMPT, data_url(png_bytes(images["red"]))), "max_tokens": 16, "temperature": 0,
            "stop": [stop, "\u2603never"]}
    with client(server.url) as c:
        out = c.post("/v1/chat/completions", json=body).json()
        assert out["choices"][0]["message"]["content"] == expected
        assert out["choices"][0]["finish_reason"] == "stop"
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            text, stream_finish, _ = read_stream(s)
    assert text == expected and stream_finish == "stop"


def test_local_image_paths(server, tiny, images):
    model, processor = tiny
    expected, _, _ = reference(model, processor, PROMPT, images["red"], max_tokens=8)
    path = images["allowed"] / "red.png"
    with client(server.url) as c:
        for url in (path.as_uri(), str(path), "red.png"):
            r = c.post("/v1/chat/completions", json={"messages": user(PROMPT, url), "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == expected


def _big_prompt() -> str:
    return "what color is the shape " * 60


BAD = {
    "not_json": (b"{not json", 400, "invalid_json"),
    "messages_not_list": ({"messages": "hi"}, 422, None),
    "max_tokens_string": ({"messages": user("hi"), "max_tokens": "lots"}, 422, None),
    "temperature_bool": ({"messages": user("hi"), "temperature": True}, 422, None),
    "unknown_part": ({"messages": [{"role": "user", "content": [{"type": "input_audio", "x": 1}]}]}, 422, None),
    "bad_role": ({"messages": [{"role": "robot", "content": "hi"}]}, 422, None),
    "top_level_list": ([1, 2], 422, None),
    "empty_messages": ({"messages": []}, 400, "empty_messages"),
    "empty_content": ({"messages": [{"role": "user", "content": "  "}]}, 400, "empty_messages"),
    "corrupt_base64": ({"messages": user("hi", "data:image/png;base64,iVBORw0K!!!")}, 400, "invalid_image"),
    "not_an_image": ({"messages": user("hi", data_url(b"just some text, not a picture"))}, 400, "invalid_image"),
    "huge_png_header": ({"messages": user("hi", data_url(png_with_header_size(20000, 20000)))}, 400, "image_too_large"),
    "two_images": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(Image.new("RGB", (4, 4))))}},
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(Image.new("RGB", (4, 4))))}}]}]},
        400, "too_many_images"),
    "long_prompt": ({"messages": user(_big_prompt())}, 400, "context_length_exceeded"),
    "max_tokens_over_limit": ({"messages": user("hi"), "max_tokens": 1001}, 400, "max_tokens_too_large"),
    "n_2": ({"messages": user("hi"), "n": 2}, 400, "unsupported_parameter"),
    "logprobs": ({"messages": user("hi"), "logprobs": True}, 400, "unsupported_parameter"),
    "top_logprobs": ({"messages": user("hi"), "top_logprobs": 3}, 400, "unsupported_parameter"),
    "min_p_over_1": ({"messages": user("hi"), "min_p": 1.5}, 422, None),
    "repetition_penalty_0": ({"messages": user("hi"), "repetition_penalty": 0}, 422, None),
    "wrong_model": ({"model": "gpt-4o", "messages": user("hi")}, 404, "model_not_found"),
    "path_outside": ("OUTSIDE", 400, "image_path_not_allowed"),
    "path_traversal": ("TRAVERSAL", 400, "image_path_not_allowed"),
    "remote_url": ({"messages": user("hi", "http://127.0.0.1:9/cat.png")}, 400, "remote_images_disabled"),
    "body_too_large": ({"messages": user("x" * 300_000)}, 413, "request_too_large"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gets_4xx_and_server_lives(server, images, case):
    body, status, code = BAD[case]
    if body == "OUTSIDE":
        body = {"messages": user("hi", str(images["outside"] / "secret.png"))}
    elif body == "TRAVERSAL":
        body = {"messages": user("hi", f"../{images['outside'].name}/secret.png")}
    with client(server.url) as c:
        if isinstance(body, bytes):
            r = c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        else:
            r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        if code is not None:
            assert err["code"] == code, err
        assert c.get("/health").json()["status"] == "ok"
        ok = c.post("/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 2, "temperature": 0})
        assert ok.status_code == 200


def test_unknown_route_and_method(server):
    with client(server.url) as c:
        r = c.get("/v1/nothing")
        assert r.status_code == 404 and "error" in r.json()
        r = c.get("/v1/chat/completions")
        assert r.status_code == 405 and "error" in r.json()


def test_health_answers_during_long_generation(server):
    body = {"messages": user("hello"), "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
    with client(server.url) as c, client(server.url) as probe:
        with c.stream("POST", "/v1/chat/completions", json=body) as s:
            lines = s.iter_lines()
            next(line for line in lines if '"content": "' in line and '"role"' not in line)  # decoding has begun
            health = probe.get("/health")
            assert health.status_code == 200
            assert health.json()["running"] == 1  # answered while the generation was still decoding
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_stops_decoding(server, stream):
    body = {"messages": user("hello"), "max_tokens": 1000, "temperature": 0, "ignore_eos": True, "stream": stream}
    with client(server.url) as c:
        before = c.get("/health").json()["tokens"]
        if stream:
            with c.stream("POST", "/v1/chat/completions", json=body) as s:
                for line in s.iter_lines():
                    if '"content": "' in line and '"role"' not in line:
                        break  # a few tokens in: hang up
        else:
            with client(server.url) as impatient, pytest.raises(httpx.ReadTimeout):
                impatient.post("/v1/chat/completions", json=body, timeout=0.3)
        r = c.post("/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200  # queued behind the abandoned request, which ended early
        assert c.get("/health").json()["tokens"] - before < 1000


def test_32_concurrent_clients(server, tiny, images):
    model, processor = tiny
    prompts = [(PROMPT, images["red"]), ("how many shapes", None), ("is there a red circle", images["red"]),
               ("describe the picture", None)]
    expected = [reference(model, processor, p, img, max_tokens=8)[0] for p, img in prompts]

    async def one(c, i):
        text, img = prompts[i % len(prompts)]
        body = {"messages": user(text, data_url(png_bytes(img)) if img else None), "max_tokens": 8, "temperature": 0}
        r = await c.post("/v1/chat/completions", json=body)
        return i, r.status_code, r.json()

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=300, trust_env=False,
                                     limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*(one(c, i) for i in range(32)))

    start = time.perf_counter()
    results = asyncio.run(main())
    elapsed = time.perf_counter() - start
    assert all(status == 200 for _, status, _ in results)
    for i, _, out in results:  # batched greedy rows equal the same request run alone
        assert out["choices"][0]["message"]["content"] == expected[i % len(prompts)]
    print(f"32 concurrent clients: {32 / elapsed:.1f} requests/s")


@pytest.mark.parametrize("compile_mode", [None, "static"])
def test_engine_batches_mixed_rows(tiny, red_image, compile_mode):
    """Jobs waiting together share one left-padded batch (image and text-only rows, different max_tokens) and each
    row equals the request run alone; also through the static-cache decoding of `serve --compile` (its compiled
    modes equal it: tests/test_model.py)."""
    model, processor = tiny
    engine = Engine(model, processor, max_batch_size=8, batch_wait_s=0.0, scheduler="static",
                    compile=compile_mode).start()
    done = threading.Event()
    results: dict[int, list[Event]] = {}

    def sink_for(i, last):
        def sink(ev):
            results.setdefault(i, []).append(ev)
            if ev.kind != "delta" and last:
                done.set()
        return sink

    try:
        blocker = processor(processor.build_prompt("hello", False))["input_ids"][0].tolist()
        # a sampled job first (a batch key of its own): whenever the engine wakes, the greedy jobs form the next batch
        engine.submit(Job(blocker, None, SamplingParams(max_tokens=50, temperature=1.0, ignore_eos=True),
                          sink_for(-1, False)))
        specs = [("What color is the circle?", red_image, 6), ("how many shapes", None, 9),
                 ("is there a red circle in the picture", red_image, 4)]
        for i, (text, img, n) in enumerate(specs):
            enc = processor(processor.build_prompt(text, img is not None), images=img)
            pix = enc["pixel_values"][0] if img is not None else None
            engine.submit(Job(enc["input_ids"][0].tolist(), pix, SamplingParams(max_tokens=n), sink_for(i, i == 2)))
        assert done.wait(120)
        time.sleep(0.2)
    finally:
        engine.stop()
    assert engine.stats["batches"] == 2 and engine.stats["rows"] == 4
    for i, (text, img, n) in enumerate(specs):
        expected, finish, count = reference(model, processor, text, img, max_tokens=n)
        events = results[i]
        assert "".join(e.text for e in events if e.kind == "delta") == expected
        assert events[-1].kind == "done" and events[-1].finish_reason == finish
        assert events[-1].completion_tokens == count


class _Quiet(http.server.SimpleHTTPRequestHandler):
    """Serves the allowed folder; /to/<url> answers 302 to <url> (for the redirect checks)."""

    def do_GET(self):
        if self.path.startswith("/to/"):
            self.send_response(302)
            self.send_header("Location", self.path[len("/to/"):])
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host(images):
    """A loopback HTTP server holding red.png, reached by the name images.test through the test resolver."""
    handler = functools.partial(_Quiet, directory=str(images["allowed"]))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()


async def fake_resolver(host: str, port: int) -> list[str]:
    """*.test names -> the loopback test host (the system's DNS knows none of them, so a fetch that works went to the
    address this resolver gave: the connection is pinned to the checked address)."""
    host = host.rstrip(".")
    if host == "images.test" or host.endswith(".images.test") or host == "other.test":
        return ["127.0.0.1"]
    if host == "rebind.test":
        return ["127.0.0.1", "10.0.0.7"]  # one allowed and one private address in the same answer
    raise OSError(f"unknown host {host}")


REMOTE_POLICY = dict(media_resolver=fake_resolver, allowed_media_networks=("127.0.0.1/32",))


@pytest.fixture(scope="module")
def guarded_server(tiny):
    """API key, remote images allowed (loopback 127.0.0.1 opened for the test host), a queue of 1 and batches of 1."""
    model, processor = tiny
    config = ServerConfig(model_name="tiny", api_key="sekret", allow_remote_images=True, max_image_bytes=100_000,
                          max_queue=1, max_batch_size=1, max_tokens_limit=400, **REMOTE_POLICY)
    srv = start_server(model, processor, config)
    yield srv
    srv.stop()


def test_api_key(guarded_server):
    with client(guarded_server.url) as c:
        assert c.get("/health").status_code == 200  # probes need no key
        r = c.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        r = c.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = c.post("/v1/chat/completions", json={"messages": user("hi")})
        assert r.status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200


def test_remote_images_when_allowed(guarded_server, image_host, tiny, images):
    model, processor = tiny
    expected, _, _ = reference(model, processor, PROMPT, images["red"], max_tokens=6)
    auth = {"Authorization": "Bearer sekret"}
    base = f"http://images.test:{image_host}"
    with client(guarded_server.url, headers=auth) as c:
        def ask(url):
            return c.post("/v1/chat/completions", json={"messages": user(PROMPT, url), "max_tokens": 6,
                                                         "temperature": 0})

        for url in (f"{base}/red.png", f"{base}/to/{base}/red.png"):  # direct, and one redirect to an allowed host
            r = ask(url)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == expected
        r = ask(f"{base}/missing.png")
        assert r.status_code == 400 and r.json()["error"]["code"] == "image_fetch_failed"
        assert "<" not in r.json()["error"]["message"]  # the server's error page is not echoed
        refused = {
            "http://127.0.0.2:9/x.png": "loopback",  # loopback outside the opened 127.0.0.1/32
            f"{base}/to/http://127.0.0.2:{image_host}/red.png": "loopback",  # an allowed name redirecting to loopback
            f"{base}/to/http://169.254.169.254/latest/meta-data/": "link-local",  # cloud metadata
            f"{base}/to/http://[::1]:{image_host}/red.png": "loopback",
            "http://rebind.test/red.png": "private",  # a mixed DNS answer is refused as a whole
            f"{base}/to/file:///etc/passwd": "scheme",
            f"http://user:pw@images.test:{image_host}/red.png": "credentials",
        }
        for url, why in refused.items():
            r = ask(url)
            assert r.status_code == 400 and r.json()["error"]["code"] == "image_url_not_allowed", (url, r.text)
            assert why in r.json()["error"]["message"], (url, r.text)
        r = ask(f"{base}/to/{base}/to/{base}/to/{base}/to/{base}/red.png")  # 4 redirects
        assert r.status_code == 400 and "redirects" in r.json()["error"]["message"]


@pytest.mark.parametrize("address, why", [
    ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.1", "private"), ("172.16.5.4", "private"),
    ("169.254.169.254", "link-local"), ("224.0.0.251", "multicast"), ("240.0.0.1", "reserved"),
    ("0.0.0.0", "unspecified"), ("100.64.0.1", "non-global"), ("::1", "loopback"), ("fe80::1%eth0", "link-local"),
    ("fc00::1", "private"), ("ff02::1", "multicast"), ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"),
    ("::", "unspecified"), ("8.8.8.8", None), ("2606:4700:4700::1111", None), ("::ffff:8.8.4.4", None),
])
def test_address_refusal(address, why):
    from firebolt_vl.serve.images import address_refusal

    assert address_refusal(address) == why
    assert address_refusal(address, ("0.0.0.0/0", "::/0")) is None if ":" not in address or "ffff" in address \
        else address_refusal(address, ("::/0",)) is None


def test_allowed_media_domains(image_host, images):
    from firebolt_vl.serve.images import ImagePolicy, fetch_remote
    from firebolt_vl.serve.schema import APIError

    policy = ImagePolicy(allow_remote=True, allowed_domains=("images.test",), allowed_networks=("127.0.0.1/32",),
                         resolver=fake_resolver)
    red = (images["allowed"] / "red.png").read_bytes()
    for host in ("images.test", "cdn.images.test", "IMAGES.TEST."):
        assert asyncio.run(fetch_remote(f"http://{host}:{image_host}/red.png", policy)) == red
    for url in (f"http://other.test:{image_host}/red.png",
                f"http://images.test:{image_host}/to/http://other.test:{image_host}/red.png"):
        with pytest.raises(APIError, match="not one of the server's allowed media domains"):
            asyncio.run(fetch_remote(url, policy))


def test_queue_full_gets_429(guarded_server):
    auth = {"Authorization": "Bearer sekret"}
    long = {"messages": user("hello"), "max_tokens": 250, "temperature": 0, "ignore_eos": True, "stream": True}
    with client(guarded_server.url, headers=auth) as c:
        with c.stream("POST", "/v1/chat/completions", json=long) as s:
            lines = s.iter_lines()
            next(line for line in lines if '"content": "' in line and '"role"' not in line)  # decoding now

            def quick(_):
                with client(guarded_server.url, headers=auth) as q:
                    return q.post("/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 2}).status_code

            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(4) as pool:
                statuses = list(pool.map(quick, range(4)))
            for _ in lines:
                pass
        assert 429 in statuses and 200 in statuses, statuses
        r = c.post("/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 2})
        assert r.status_code == 200  # the queue drains and the server goes on


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command(tiny, tmp_path):
    from firebolt_vl.hub import save_model_dir

    model, processor = tiny
    save_model_dir(model, processor, tmp_path / "model")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "firebolt_vl.cli", "serve", "--model", str(tmp_path / "model"),
                             "--port", str(port), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(url + "/health", trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.3)
        with client(url) as c:
            assert c.get("/v1/models").json()["data"][0]["id"] == "model"
            r = c.post("/v1/chat/completions", json={"model": "model", "messages": user("hi"), "max_tokens": 3})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(30)


def test_compile_needs_the_static_scheduler(tiny, capsys):
    from firebolt_vl.cli import main as cli_main

    model, processor = tiny
    with pytest.raises(ValueError, match="--scheduler static"):
        Engine(model, processor, scheduler="continuous", compile="reduction")
    with pytest.raises(ValueError, match="compile mode"):
        Engine(model, processor, scheduler="static", compile="fast")
    assert cli_main(["serve", "--model", "/nonexistent", "--compile", "reduction"]) == 2  # before the model loads
    assert "--scheduler static" in capsys.readouterr().err


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
def test_engine_failure_isolated_to_the_bad_row(tiny, red_image, scheduler):
    """A failing row does not sink its batch-mates: static batches are retried row by row, continuous rows are
    prefilled alone once their group's prefill failed; the bad row gets an error event, its batch-mate still its answer."""
    model, processor = tiny
    engine = Engine(model, processor, max_batch_size=8, batch_wait_s=0.0, scheduler=scheduler)
    got: dict[str, list[Event]] = {"good": [], "bad": []}
    finished = threading.Semaphore(0)

    def sink(name):
        def put(ev):
            got[name].append(ev)
            if ev.kind != "delta":
                finished.release()
        return put

    enc = processor(processor.build_prompt(PROMPT, True), images=red_image)
    ids = enc["input_ids"][0].tolist()
    good = Job(ids, enc["pixel_values"][0], SamplingParams(max_tokens=5), sink("good"))
    bad = Job(ids, torch.zeros(3, 7, 7), SamplingParams(max_tokens=5), sink("bad"))  # wrong image size
    with engine._cond:  # queue both before the engine thread looks, so they share one batch
        engine._pending.extend([good, bad])
    engine.start()
    try:
        assert finished.acquire(timeout=120) and finished.acquire(timeout=120)
    finally:
        engine.stop()
    assert got["bad"][-1].kind == "error" and isinstance(got["bad"][-1].error, (ValueError, RuntimeError))
    expected, finish, _ = reference(model, processor, PROMPT, red_image, max_tokens=5)
    assert "".join(e.text for e in got["good"] if e.kind == "delta") == expected
    assert got["good"][-1].finish_reason == finish and engine.stats["errors"] == 1


# ---- sampling extensions, operators' signals, start-up and shutdown ----
def test_repetition_penalty_and_min_p(server, tiny, images):
    """The server's repetition_penalty / min_p answers equal `generate`'s; the penalty counts a row's own tokens only
    (a left-padded batch row equals the row alone) and follows CTRL's rule on the first step."""
    model, processor = tiny
    expected, _, _ = reference(model, processor, PROMPT, images["red"], max_tokens=8)
    with client(server.url) as c:
        for extra in ({"repetition_penalty": 1.8}, {"min_p": 0.2, "temperature": 0.9, "seed": 5}):
            body = {"messages": user(PROMPT, data_url(png_bytes(images["red"]))), "max_tokens": 8, "temperature": 0,
                    "ignore_eos": True, **extra}
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            prompt = processor.build_prompt(PROMPT, with_image=True)
            enc = processor(prompt, images=images["red"])
            kw = dict(max_new_tokens=8, ignore_eos=True, repetition_penalty=extra.get("repetition_penalty", 1.0))
            if "min_p" in extra:
                kw.update(do_sample=True, temperature=0.9, min_p=0.2, generator=torch.Generator().manual_seed(5))
            out = model.generate(**enc, **kw)
            text = processor.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            assert r.json()["choices"][0]["message"]["content"] == text
    assert expected is not None
    # CTRL's rule on step one, from the forward's logits
    enc = processor([processor.build_prompt("red red red circle", with_image=False)])
    logits = model(**enc).logits[0, -1].float()
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[enc["input_ids"][0]] = True
    penalised = torch.where(seen, torch.where(logits > 0, logits / 3.0, logits * 3.0), logits)
    first = model.generate(**enc, max_new_tokens=1, repetition_penalty=3.0, ignore_eos=True)[0, -1]
    assert int(first) == int(penalised.argmax())
    # a left-padded row equals the row alone
    prompts = [processor.build_prompt("what color", with_image=False),
               processor.build_prompt("what color is the big red circle on the left side", with_image=False)]
    batch = processor(prompts)
    both = model.generate(**batch, max_new_tokens=6, repetition_penalty=1.7, ignore_eos=True)
    alone = processor([prompts[0]])
    one = model.generate(**alone, max_new_tokens=6, repetition_penalty=1.7, ignore_eos=True)
    assert both[0, -6:].tolist() == one[0, -6:].tolist()


def _metric_samples(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_endpoint(tiny):
    model, processor = tiny
    srv = start_server(model, processor, ServerConfig(model_name="tiny", max_tokens_limit=50))
    try:
        with client(srv.url) as c:
            for n in (3, 5):
                r = c.post("/v1/chat/completions", json={"messages": user("hi"), "max_tokens": n, "temperature": 0,
                                                          "ignore_eos": True})
                assert r.status_code == 200
            assert c.post("/v1/chat/completions", json={"messages": []}).status_code == 400
            r = c.get("/metrics")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            m = _metric_samples(r.text)
    finally:
        srv.stop()
    assert m[("firebolt_vl_requests_total", (("status", "200"),))] == 2
    assert m[("firebolt_vl_requests_total", (("status", "400"),))] == 1
    assert m[("firebolt_vl_generated_tokens_total", ())] == 8
    assert m[("firebolt_vl_time_to_first_token_seconds_count", ())] == 2
    assert m[("firebolt_vl_time_per_output_token_seconds_count", ())] == 6
    assert m[("firebolt_vl_queue_length", ())] == 0 and m[("firebolt_vl_running_rows", ())] == 0
    assert m[("firebolt_vl_model_loaded", ())] == 1


def test_health_says_starting_until_loaded(tiny):
    model, processor = tiny
    release = threading.Event()

    def loader():
        release.wait(30)
        return model, processor

    srv = start_server(None, None, ServerConfig(model_name="tiny"), loader=loader)
    try:
        with client(srv.url) as c:
            r = c.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "starting"
            r = c.post("/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 2})
            assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
            release.set()
            deadline = time.monotonic() + 30
            while c.get("/health").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.get("/health").json()["status"] == "ok"
            assert c.post("/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 2}).status_code == 200
    finally:
        srv.stop()


@pytest.mark.parametrize("grace, finish", [(60.0, "length"), (0.3, None)])
def test_graceful_shutdown(tiny, grace, finish):
    """Shutdown: new requests get 503 and /health says so; a running stream finishes within the grace period (all
    its tokens), or is cancelled with an error event once the grace period is over; then the server exits."""
    model, processor = tiny
    srv = start_server(model, processor, ServerConfig(model_name="tiny", max_tokens_limit=2000, shutdown_grace_s=grace))
    n = 40 if finish else 2000
    body = {"messages": user("hello"), "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True}
    stopper = threading.Thread(target=srv.shutdown, daemon=True)
    with client(srv.url) as c, client(srv.url) as other:
        with c.stream("POST", "/v1/chat/completions", json=body) as s:
            lines = s.iter_lines()
            next(line for line in lines if '"content": "' in line and '"role"' not in line)  # decoding now
            stopper.start()
            deadline = time.monotonic() + 10
            while not srv.server.draining and time.monotonic() < deadline:
                time.sleep(0.01)
            if finish:
                r = other.post("/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 2})
                assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
                h = other.get("/health")
                assert h.status_code == 503 and h.json()["status"] == "shutting down"
            rest = "\n".join(lines)
    stopper.join(60)
    assert not srv.thread.is_alive()
    if finish:
        assert '"finish_reason": "length"' in rest
    else:
        assert "shutting down" in rest and '"finish_reason": "length"' not in rest


# ---- continuous batching: rows join the running batch between steps and leave when finished ----
class _Recorder:
    """Event sinks that log (sequence number, job name, event) in engine order and wake waiters."""

    def __init__(self):
        self.log: list[tuple[int, str, Event]] = []
        self.cond = threading.Condition()

    def sink(self, name):
        def put(ev):
            with self.cond:
                self.log.append((len(self.log), name, ev))
                self.cond.notify_all()
        return put

    def wait(self, pred, timeout=120.0):
        with self.cond:
            assert self.cond.wait_for(lambda: pred(self), timeout), "timed out waiting for the engine"

    def events(self, name):
        return [ev for _, n, ev in self.log if n == name]

    def first(self, name, kind="delta"):
        return next(i for i, n, ev in self.log if n == name and ev.kind == kind)

    def done(self, name):
        return next((i for i, n, ev in self.log if n == name and ev.kind != "delta"), None)


def _job(processor, text, image, params, sink):
    enc = processor(processor.build_prompt(text, image is not None), images=image)
    return Job(enc["input_ids"][0].tolist(), enc["pixel_values"][0] if image is not None else None, params, sink)


def _generated(model, processor, text, img, kw) -> tuple[str, int]:
    """What `generate` answers alone for a job with SamplingParams(**kw): (text, completion tokens)."""
    enc = processor(processor.build_prompt(text, img is not None), images=img)
    gen = torch.Generator().manual_seed(kw["seed"]) if "seed" in kw else None
    out = model.generate(**enc, max_new_tokens=kw["max_tokens"], do_sample="temperature" in kw,
                         temperature=kw.get("temperature", 1.0), top_p=kw.get("top_p", 1.0),
                         min_p=kw.get("min_p"), repetition_penalty=kw.get("repetition_penalty", 1.0),
                         ignore_eos=kw.get("ignore_eos", False), generator=gen)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    eos = model.config.text_config.eos_token_id
    if not kw.get("ignore_eos") and eos in new:
        new = new[: new.index(eos) + 1]
    return processor.decode([t for t in new if t != eos], skip_special_tokens=True), len(new)


@pytest.mark.parametrize("bypass", [False, True], ids=["cmm", "text_only_bypass"])
def test_continuous_join_mid_flight_equals_generate(tiny_factory, red_image, bypass):
    """Requests that join a running batch mid-flight (image and text rows, greedy, seeded sampling with top_p /
    min_p, repetition penalty, different lengths, one joining after another left) answer exactly what `generate`
    answers for each of them alone, and so does the row that was running all along; also with the release's
    text-only bypass (text rows skip the CMM, so their grid memory must say "no image" after a merge)."""
    model, processor = tiny_factory(text_only_bypass=True) if bypass else tiny_factory()
    engine = Engine(model, processor, max_batch_size=8, scheduler="continuous").start()
    rec = _Recorder()
    first = ("long", PROMPT, red_image, dict(max_tokens=60, ignore_eos=True))
    joiners = [
        ("greedy_text", "how many shapes", None, dict(max_tokens=9)),
        ("seeded_image", "is there a red circle", red_image, dict(max_tokens=12, temperature=0.9, top_p=0.8, seed=7)),
        ("seeded_text", "describe the picture", None, dict(max_tokens=10, temperature=1.1, min_p=0.05, seed=3,
                                                           ignore_eos=True)),
        ("penalty", PROMPT, red_image, dict(max_tokens=8, repetition_penalty=1.6, ignore_eos=True)),
    ]
    late = ("after_leave", "what color is the square", None, dict(max_tokens=7, temperature=0.7, seed=11))
    try:
        engine.submit(_job(processor, first[1], first[2], SamplingParams(**first[3]), rec.sink("long")))
        rec.wait(lambda r: len(r.events("long")) >= 3)  # the long row is decoding
        for name, text, img, kw in joiners:
            engine.submit(_job(processor, text, img, SamplingParams(**kw), rec.sink(name)))
        rec.wait(lambda r: r.done("greedy_text") is not None)  # a row has left: the next one takes its slot
        engine.submit(_job(processor, late[1], late[2], SamplingParams(**late[3]), rec.sink("after_leave")))
        rec.wait(lambda r: all(r.done(n) is not None for n, *_ in [first, *joiners, late]))
    finally:
        engine.stop()
    long_done = rec.done("long")
    for name, text, img, kw in [first, *joiners, late]:
        events = rec.events(name)
        assert events[-1].kind == "done", events[-1]
        if name != "long":  # it ran beside the long row, not after it
            assert rec.first("long") < rec.first(name) < long_done, name
        expected, count = _generated(model, processor, text, img, kw)
        assert "".join(e.text for e in events if e.kind == "delta") == expected, name
        assert events[-1].completion_tokens == count, name
    assert engine.stats["errors"] == 0 and engine.stats["rows"] == 6
    assert engine.stats["steps"] < sum(rec.events(n)[-1].completion_tokens for n in ["long", *[j[0] for j in joiners]])


@pytest.mark.parametrize("scheduler", ["continuous", "static"])
def test_finished_rows_free_their_slot(tiny, scheduler):
    """Two slots, a long row and two short ones: under continuous batching the second short request takes the slot
    the first one left and finishes long before the long row; the static engine makes it wait for the whole batch."""
    model, processor = tiny
    engine = Engine(model, processor, max_batch_size=2, batch_wait_s=0.0, scheduler=scheduler)
    rec = _Recorder()
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    with engine._cond:  # all three wait before the engine looks: long + short1 fill both slots
        engine._pending.extend([_job(processor, "hello", None, SamplingParams(max_tokens=80, ignore_eos=True),
                                     rec.sink("long")),
                                _job(processor, "how many", None, params, rec.sink("short1")),
                                _job(processor, "what color", None, params, rec.sink("short2"))])
    engine.start()
    try:
        rec.wait(lambda r: all(r.done(n) is not None for n in ("long", "short1", "short2")))
        deadline = time.monotonic() + 10
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.stop()
    assert [rec.events(n)[-1].completion_tokens for n in ("long", "short1", "short2")] == [80, 3, 3]
    assert engine.running == 0 and engine.stats["tokens"] == 86
    if scheduler == "continuous":
        assert rec.done("short2") < rec.done("long")
        assert engine.stats["steps"] == 79  # the long row's 79 steps after its prefill carried the short ones
    else:
        assert rec.done("short2") > rec.done("long")


def test_cancelled_row_leaves_the_running_batch(tiny):
    """A row whose client went away (job.cancel(), what the server does on a disconnect) leaves the running batch
    before the next step: its slot is free, its neighbour carries on to its full answer."""
    model, processor = tiny
    engine = Engine(model, processor, max_batch_size=4, scheduler="continuous").start()
    rec = _Recorder()
    gone = _job(processor, "hello", None, SamplingParams(max_tokens=1000, ignore_eos=True), rec.sink("gone"))
    stays = _job(processor, "hi", None, SamplingParams(max_tokens=40, ignore_eos=True), rec.sink("stays"))
    try:
        engine.submit(gone)
        engine.submit(stays)
        rec.wait(lambda r: len(r.events("gone")) >= 3 and len(r.events("stays")) >= 1)
        gone.cancel()
        rec.wait(lambda r: r.done("stays") is not None)
        deadline = time.monotonic() + 10
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.running == 0
    finally:
        engine.stop()
    assert rec.events("stays")[-1].finish_reason == "length" and rec.events("stays")[-1].completion_tokens == 40
    assert rec.done("gone") is None  # a cancelled job gets nothing more
    assert 40 < engine.stats["tokens"] < 100 and engine.stats["steps"] < 100


def test_continuous_slots_move_their_window_and_grow(tiny, red_image, monkeypatch):
    """The slot buffers start small here (8 columns), so the running rows' window is moved and the buffers grow while
    rows decode, and a joining prompt longer than the running rows' columns moves them right: every answer still
    equals `generate` alone, and a later job reuses a freed slot."""
    from firebolt_vl.serve import batching

    moves = []
    move = batching.SlotBatch._move_window
    monkeypatch.setattr(batching, "_MIN_COLUMNS", 8)
    monkeypatch.setattr(batching.SlotBatch, "_move_window", lambda self, end: (moves.append(end), move(self, end)))
    model, processor = tiny
    # joins at once (no gathering by the measured join cost): the join points, hence the window moves, are fixed
    engine = Engine(model, processor, max_batch_size=2, scheduler="continuous", max_join_wait_s=0.0).start()
    rec = _Recorder()
    long_prompt = "is there a red circle on the left of the picture or a blue square in the middle of it"
    specs = [("long", "hi", None, dict(max_tokens=160, ignore_eos=True)),
             ("long_prompt", long_prompt, red_image, dict(max_tokens=30, temperature=0.9, seed=5, ignore_eos=True)),
             ("reuse", PROMPT, None, dict(max_tokens=12, ignore_eos=True))]
    try:
        engine.submit(_job(processor, specs[0][1], specs[0][2], SamplingParams(**specs[0][3]), rec.sink("long")))
        rec.wait(lambda r: len(r.events("long")) >= 20)
        engine.submit(_job(processor, specs[1][1], specs[1][2], SamplingParams(**specs[1][3]), rec.sink("long_prompt")))
        rec.wait(lambda r: r.done("long_prompt") is not None)
        engine.submit(_job(processor, specs[2][1], specs[2][2], SamplingParams(**specs[2][3]), rec.sink("reuse")))
        rec.wait(lambda r: all(r.done(n) is not None for n, *_ in specs))
    finally:
        engine.stop()
    for name, text, img, kw in specs:
        events = rec.events(name)
        expected, count = _generated(model, processor, text, img, kw)
        assert "".join(e.text for e in events if e.kind == "delta") == expected, name
        assert events[-1].completion_tokens == count, name
    assert rec.done("reuse") < rec.done("long")  # it ran beside the long row, in the slot the long prompt left
    assert len(moves) >= 3 and engine.stats["errors"] == 0  # the first join, the long prompt, the full buffers
