"""Helpers for tests and fuzzing: crafted image files, the train command in a subprocess."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

from PIL import Image


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_with_header_size(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (with a valid CRC) but holds a 1x1 image: a decompression-bomb probe."""
    data = bytearray(png_bytes(Image.new("RGB", (1, 1))))
    ihdr = data.index(b"IHDR")
    struct.pack_into(">II", data, ihdr + 4, width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    struct.pack_into(">I", data, ihdr + 17, crc)
    return bytes(data)


def truncated_jpeg(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="JPEG")
    data = buf.getvalue()
    return data[: len(data) // 2]


def run_train_cli(args: list[str], env_extra: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m firebolt_vl.cli train ARGS` in a subprocess (one thread, tracebacks on): what a SIGKILL can stop."""
    repo = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": repo, "OMP_NUM_THREADS": "1", "FIREBOLT_VL_DEBUG": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "firebolt_vl.cli", "train", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)
