"""Image parts of a request -> image bytes, under the server's policy.

    data:image/...;base64,...   always accepted (the body-size limit bounds it)
    file:///abs/path or a path  only when the server has an allowed folder, and only for files inside it (symlinks are
                                resolved first, so a link pointing outside is refused); relative paths are taken
                                relative to that folder
    http(s)://...               refused unless remote images are allowed; then fetched with httpx, with a timeout,
                                a byte limit and at most 3 redirects

Every problem is an APIError(400) whose message says what was wrong; decoding the bytes into pixels (and the pixel
limit) is `firebolt_vl.processing.load_image`'s job.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from .schema import APIError

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)


@dataclass
class ImagePolicy:
    allowed_dir: str | None = None
    allow_remote: bool = False
    max_bytes: int = 20 * 2**20
    timeout_s: float = 10.0


def _bad(message: str, code: str = "invalid_image") -> APIError:
    return APIError(400, message, param="messages", code=code)


def decode_data_url(url: str, max_bytes: int) -> bytes:
    m = _DATA_URL.match(url)
    if not m:
        raise _bad("malformed data: URL (expected data:image/<type>;base64,<data>)")
    if not m.group("b64"):
        raise _bad("data: URLs must be base64 encoded (data:image/<type>;base64,<data>)")
    payload = url[m.end():].strip()
    if len(payload) * 3 // 4 > max_bytes:
        raise _bad(f"image data is over the limit of {max_bytes} bytes", code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("corrupt base64 data in the image data: URL") from None


def local_path(url: str, policy: ImagePolicy) -> Path:
    """The file a file:// URL or plain path names, refused unless it lies inside the allowed folder."""
    raw = unquote(urlparse(url).path) if url.startswith("file:") else url
    if policy.allowed_dir is None:
        raise _bad("local image paths are disabled on this server (start it with --allowed-dir to allow a folder)",
                   code="image_path_not_allowed")
    root = Path(policy.allowed_dir).resolve()
    path = Path(raw)
    path = (path if path.is_absolute() else root / path).resolve()
    if not path.is_relative_to(root):
        raise _bad(f"image path {raw!r} is outside the allowed folder", code="image_path_not_allowed")
    if not path.is_file():
        raise _bad(f"image file not found: {raw}")
    return path


def read_local(url: str, policy: ImagePolicy) -> bytes:
    path = local_path(url, policy)
    size = os.path.getsize(path)
    if size > policy.max_bytes:
        raise _bad(f"image file is {size} bytes, over the limit of {policy.max_bytes}", code="image_too_large")
    with open(path, "rb") as f:
        return f.read()


async def fetch_remote(url: str, policy: ImagePolicy) -> bytes:
    """GET an http(s) image with a byte limit, a per-operation timeout and an overall deadline (2x the timeout, so a
    server trickling bytes cannot hold the request)."""
    import asyncio

    if not policy.allow_remote:
        raise _bad("remote image URLs are disabled on this server (send a data: URL, or start it with "
                   "--allow-remote-images)", code="remote_images_disabled")
    try:
        return await asyncio.wait_for(_fetch(url, policy), timeout=2 * policy.timeout_s)
    except asyncio.TimeoutError:
        raise _bad(f"could not fetch the image from {url}: no complete answer within {2 * policy.timeout_s:g} s",
                   code="image_fetch_failed") from None


async def _fetch(url: str, policy: ImagePolicy) -> bytes:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=policy.timeout_s, follow_redirects=True, max_redirects=3) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise _bad(f"could not fetch the image: HTTP {response.status_code} from {url}",
                               code="image_fetch_failed")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                    raise _bad(f"remote image is {declared} bytes, over the limit of {policy.max_bytes}",
                               code="image_too_large")
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > policy.max_bytes:
                        raise _bad(f"remote image is over the limit of {policy.max_bytes} bytes",
                                   code="image_too_large")
                return bytes(data)
    except httpx.HTTPError as e:
        raise _bad(f"could not fetch the image from {url}: {type(e).__name__}: {e}",
                   code="image_fetch_failed") from None


async def image_bytes(url: str, policy: ImagePolicy) -> bytes:
    """Any accepted image URL -> its bytes (local files are read in a worker thread)."""
    from starlette.concurrency import run_in_threadpool

    scheme = urlparse(url).scheme.lower() if ":" in url[:12] else ""
    if scheme == "data":
        return decode_data_url(url, policy.max_bytes)
    if scheme in ("http", "https"):
        return await fetch_remote(url, policy)
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        return await run_in_threadpool(read_local, url, policy)
    raise _bad(f"unsupported image URL scheme {scheme!r}: use data:, file: (with --allowed-dir) or http(s)")
