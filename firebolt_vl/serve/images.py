"""Image parts of a request -> image bytes, under the server's policy.

    data:image/...;base64,...   always accepted (the body-size limit bounds it)
    file:///abs/path or a path  only when the server has an allowed folder, and only for files inside it (symlinks are
                                resolved first, so a link pointing outside is refused); relative paths are taken
                                relative to that folder
    http(s)://...               refused unless remote images are allowed; then fetched with httpx, with a timeout,
                                a byte limit and at most 3 redirects, each hop checked: http(s) only, the host in
                                the allowed media domains (when set), every address it resolves to public (not
                                loopback, private, link-local, multicast, reserved, IPv4 and IPv6), and the
                                connection made to the checked address (a second DNS answer cannot redirect it)

Every problem is an APIError(400) whose message says what was wrong; decoding the bytes into pixels (and the pixel
limit) is `firebolt_vl.processing.load_image`'s job.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Awaitable, Callable
from pathlib import Path
from urllib.parse import unquote, urlparse

from .schema import APIError

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)


MAX_REDIRECTS = 3


@dataclass
class ImagePolicy:
    allowed_dir: str | None = None
    allow_remote: bool = False
    max_bytes: int = 20 * 2**20
    timeout_s: float = 10.0
    allowed_domains: tuple = ()  # non-empty: remote hosts must be one of these names or their subdomains
    allowed_networks: tuple = ()  # CIDRs an operator opens on purpose (an intranet image store); all else: public only
    resolver: Callable[[str, int], Awaitable[list[str]]] | None = None  # host, port -> addresses; None: system DNS


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


def address_refusal(address: str, allowed_networks: tuple = ()) -> str | None:
    """Why a server may not fetch from `address` ("loopback", "private", ...), or None for a public unicast address
    (or one inside an operator's `allowed_networks`). IPv4-mapped IPv6 addresses are judged as the IPv4 they carry."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in ipaddress.ip_network(net, strict=False) for net in allowed_networks):
        return None
    for kind in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private"):  # most specific first
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if isinstance(ip, ipaddress.IPv6Address) and (ip.is_site_local or ip.sixtofour or ip.teredo):
        return "tunnelled or site-local"
    if not ip.is_global:
        return "non-global"
    return None


def _domain_allowed(host: str, domains: tuple) -> bool:
    host = host.lower().rstrip(".")
    return any(host == d or host.endswith("." + d) for d in (d.lower().strip(".") for d in domains))


async def _system_resolve(host: str, port: int) -> list[str]:
    import asyncio
    import socket

    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


async def _checked_address(url, policy: ImagePolicy) -> str:
    """The address to connect to for `url` (an httpx.URL), after the scheme, domain and address checks: every address
    the name resolves to must be allowed (a mixed answer is refused), and the connection is pinned to the first."""
    if url.scheme not in ("http", "https"):
        raise _bad(f"image URL scheme {url.scheme!r} is not allowed for remote images: use http or https",
                   code="image_url_not_allowed")
    if url.userinfo:
        raise _bad("credentials in image URLs are not accepted", code="image_url_not_allowed")
    host = url.host
    if not host:
        raise _bad("the image URL has no host", code="image_url_not_allowed")
    if policy.allowed_domains and not _domain_allowed(host, policy.allowed_domains):
        raise _bad(f"image host {host!r} is not one of the server's allowed media domains",
                   code="image_url_not_allowed")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        ipaddress.ip_address(host)
        addresses = [host]
    except ValueError:
        try:
            addresses = await (policy.resolver or _system_resolve)(host, port)
        except OSError:
            addresses = []
        if not addresses:
            raise _bad(f"could not resolve the image host {host!r}", code="image_fetch_failed") from None
    for address in addresses:
        why = address_refusal(address, policy.allowed_networks)
        if why:
            raise _bad(f"image host {host!r} resolves to a {why} address: remote images are fetched from public "
                       "addresses only", code="image_url_not_allowed")
    return addresses[0]


async def _fetch(url: str, policy: ImagePolicy) -> bytes:
    """Follow up to MAX_REDIRECTS redirects by hand so that every hop is checked, each request going to the address
    that was checked (the Host header and TLS server name keep the original name, so certificates still verify)."""
    import httpx

    try:
        current = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        raise _bad("malformed image URL", code="image_url_not_allowed") from None
    try:
        async with httpx.AsyncClient(timeout=policy.timeout_s, follow_redirects=False, trust_env=False) as client:
            for hop in range(MAX_REDIRECTS + 1):
                address = await _checked_address(current, policy)
                pinned = current.copy_with(host=address)
                extensions = {"sni_hostname": current.host} if current.scheme == "https" else {}
                request = client.build_request("GET", pinned, headers={"Host": current.netloc.decode("ascii")},
                                               extensions=extensions)
                response = await client.send(request, stream=True)
                try:
                    if response.status_code in (301, 302, 303, 307, 308) and "location" in response.headers:
                        try:
                            current = current.join(response.headers["location"])
                        except (httpx.InvalidURL, ValueError):
                            raise _bad("the image server sent a malformed redirect", code="image_fetch_failed") from None
                        continue
                    return await _read_image(response, policy)
                finally:
                    await response.aclose()
    except httpx.HTTPError as e:  # the exception's text may describe the internal network: name only its kind
        raise _bad(f"could not fetch the image from {url}: {type(e).__name__}", code="image_fetch_failed") from None
    raise _bad(f"could not fetch the image from {url}: more than {MAX_REDIRECTS} redirects", code="image_fetch_failed")


async def _read_image(response, policy: ImagePolicy) -> bytes:
    """The body of a 200 answer under the byte limit; the body of any other answer is never read or echoed."""
    if response.status_code != 200:
        raise _bad(f"could not fetch the image: HTTP {response.status_code}", code="image_fetch_failed")
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > policy.max_bytes:
        raise _bad(f"remote image is {declared} bytes, over the limit of {policy.max_bytes}", code="image_too_large")
    data = bytearray()
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) > policy.max_bytes:
            raise _bad(f"remote image is over the limit of {policy.max_bytes} bytes", code="image_too_large")
    return bytes(data)


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
