"""Readers for the training data formats, yielding uniform conversation records.

Every reader is an iterable (a ``torch.utils.data.IterableDataset`` when torch
is importable) of dicts::

    {
        "image": PIL.Image.Image (RGB) or None,   # None = text-only record
        "conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...],
        "source": str,        # dataset name (reader's ``source``)
        "id": str,            # record id (from the data, else "<source>:<index>")
        "index": int,         # entry position in this reader's (sharded) stream
        "meta": dict,         # remaining fields of the raw record (family, scorer, ...)
        # PreferenceReader only: "rejected": str
    }

Images are loaded **eagerly**: each image is opened, fully decoded
(``im.load()`` with ``ImageFile.LOAD_TRUNCATED_IMAGES`` forced to False),
EXIF-transposed and converted to RGB before the record is yielded, so a
truncated/corrupt file is detected by the reader and never reaches the model.
Images that are missing or unreadable are counted, logged with
``logging.warning`` (once per file, at most ``max_warnings`` distinct files per
reader) and skipped - never replaced.  Counters live in ``reader.stats``::

    {"ok": n, "skipped_missing": n, "skipped_corrupt": n, "skipped_invalid": n}

(``skipped_invalid``: malformed records, e.g. no human/gpt turn or a caption
sample without text; ``corrupt_shards``: unreadable or truncated tar shards.)
Counters accumulate over passes (epochs); ``shard()``/``skip()`` return readers
with fresh counters.  With DataLoader workers every worker process has its own
copy of the counters.

Supported formats (see :func:`open_dataset` for auto-detection):

* :class:`ConversationReader` - LLaVA / ShareGPT records in a JSON list or JSONL
  (``id``, ``image`` relative to ``image_root`` - default the file's folder -,
  ``conversations`` with ``from``/``value`` in human/gpt, or user/assistant,
  or ``role``/``content``; ``messages`` is accepted for ``conversations``).
  ``<image>`` is put at the start of the first human turn when the record has an
  image but no placeholder; records without ``image`` are text-only.
* :class:`CaptionReader` - ``{"image": path, "caption": text}`` JSONL/JSON.
* :class:`WebDatasetCaptionReader` - img2dataset-style webdataset tar shards
  (``<key>.jpg|png|webp`` + ``<key>.txt`` and/or ``<key>.json`` with a
  ``caption``), streamed member by member with :mod:`tarfile` (one sample in
  memory at a time).  Accepts a brace pattern (``cc3m/{00000..00331}.tar``), a
  directory of ``*.tar`` files or a list of paths.
  Captions become ``human: "<image>\\n" + prompt``, ``gpt: caption``, the prompt
  chosen deterministically from :data:`CAPTION_PROMPTS` by a CRC32 of the
  sample key.
* :class:`PreferenceReader` - MMPR-style JSONL (``image``, ``question``,
  ``chosen``, ``rejected``): the chosen response is the target; the rejected
  one is kept under ``record["rejected"]``.

Sharding and resuming
---------------------
Entries are numbered in file order (``g`` = 0, 1, ... over non-blank JSONL
lines / JSON list items / tar samples in shard order).  ``reader.shard(rank,
world_size)`` returns a new reader with the entries ``g % world_size ==
rank``; ``reader.skip(n)`` returns a new reader without the first ``n``
entries of *its* stream (no image is decoded for skipped entries).  Each
yielded record carries ``"index"`` = its position in the (sharded, unskipped)
stream, and ``reader.position`` is the number of entries consumed so far, so a
run resumes with ``base.shard(rank, ws).skip(last_index + 1)``.  Positions
count entries, not successfully decoded records, so they do not depend on
which images failed.  ``shard`` must be applied before ``skip``.
Under a ``DataLoader`` with several workers, the entries remaining after
shard/skip are dealt round-robin to the workers (``split_workers=True``).
:class:`WebDatasetCaptionReader` also offers ``shard(..., by="file")`` (each
rank reads whole tar files; positions are then counted within the rank's files).

``len(reader)`` is available for JSON/JSONL readers (number of entries after
shard/skip - an upper bound on the records yielded; counting JSONL lines scans
the file once, cached); tar readers have no ``len``.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import tarfile
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from PIL import Image, ImageFile, ImageOps

try:  # a proper IterableDataset for torch.utils.data.DataLoader
    from torch.utils.data import IterableDataset as _IterableBase
except Exception:  # pragma: no cover - torch is optional for the data code
    _IterableBase = object  # type: ignore[assignment,misc]

__all__ = [
    "CAPTION_PROMPTS",
    "IMAGE_TOKEN",
    "BaseReader",
    "ConversationReader",
    "CaptionReader",
    "WebDatasetCaptionReader",
    "PreferenceReader",
    "open_dataset",
    "load_image",
    "normalize_conversations",
    "caption_prompt",
]

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
CAPTION_PROMPTS: Tuple[str, ...] = (
    "Describe the image briefly.",
    "Write a short caption for the image.",
    "What does the image show? Answer briefly.",
    "Give a brief description of the picture.",
)
IMAGE_EXTS: Tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

_HUMAN_ROLES = {"human", "user"}
_GPT_ROLES = {"gpt", "assistant", "model", "bot"}
_SYSTEM_ROLES = {"system"}

_truncation_lock = threading.Lock()


# --------------------------------------------------------------------------- helpers
class _ImageError(Exception):
    def __init__(self, kind: str, msg: str):
        super().__init__(msg)
        self.kind = kind  # "missing" | "corrupt"


@contextmanager
def _strict_truncation():
    """Make sure truncated images raise instead of being silently padded."""
    with _truncation_lock:
        old = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = old


def load_image(src: Union[str, os.PathLike, bytes], name: Optional[str] = None) -> Image.Image:
    """Open a path or encoded bytes, fully decode it, EXIF-transpose, convert to RGB.

    ``name`` labels encoded bytes in error messages (e.g. ``shard.tar#key.jpg``).

    Raises ``_ImageError`` with ``kind`` "missing" (no such file) or "corrupt"
    (unidentified, truncated or otherwise undecodable).
    """
    if isinstance(src, (bytes, bytearray)):
        fp: Any = io.BytesIO(src)
        name = name or "<bytes>"
    else:
        name = os.fspath(src)
        if not os.path.isfile(name):
            raise _ImageError("missing", "image not found: %s" % name)
        fp = name
    try:
        with _strict_truncation():
            with Image.open(fp) as src_im:
                src_im.load()
                im = ImageOps.exif_transpose(src_im)
                if im.mode != "RGB":
                    im = im.convert("RGB")
                elif im is src_im:  # detach from the (closing) file
                    im = im.copy()
        return im
    except FileNotFoundError as e:
        raise _ImageError("missing", "image not found: %s" % name) from e
    except Exception as e:  # UnidentifiedImageError, OSError (truncated), SyntaxError, zlib.error, ...
        raise _ImageError("corrupt", "cannot decode image %s: %s: %s" % (name, type(e).__name__, e)) from e


def caption_prompt(key: str, prompts: Sequence[str] = CAPTION_PROMPTS) -> str:
    """Deterministic (process-independent) choice of a caption prompt for ``key``."""
    return prompts[zlib.crc32(key.encode("utf-8")) % len(prompts)]


def _text_of(content: Any) -> Tuple[Optional[str], int]:
    """Turn a turn's value/content into text; returns (text, number of image parts)."""
    if content is None:
        return None, 0
    if isinstance(content, str):
        return content, 0
    if isinstance(content, list):  # OpenAI-style parts
        parts: List[str] = []
        n_img = 0
        for p in content:
            if isinstance(p, str):
                parts.append(p)
            elif isinstance(p, dict):
                t = p.get("type")
                if t in ("image", "image_url"):
                    parts.append(IMAGE_TOKEN)
                    n_img += 1
                elif "text" in p:
                    parts.append(str(p["text"]))
        return "\n".join(parts), n_img
    return None, 0


def _strip_image_token(text: str) -> str:
    return text.replace(IMAGE_TOKEN + "\n", "").replace("\n" + IMAGE_TOKEN, "").replace(IMAGE_TOKEN, "").strip()


def normalize_conversations(turns: Any, has_image: bool) -> Tuple[Optional[List[Dict[str, str]]], str]:
    """Normalise a list of turns to ``[{"from": "human"|"gpt"|"system", "value": str}]``.

    Returns ``(conversations, "")`` or ``(None, reason)`` when the record is invalid.
    Ensures exactly one ``<image>`` (in the first human turn, prepended when
    absent) for records with an image and none for text-only records.
    """
    if not isinstance(turns, list) or not turns:
        return None, "no conversations"
    out: List[Dict[str, str]] = []
    for t in turns:
        if not isinstance(t, dict):
            return None, "turn is not an object"
        role = t.get("from", t.get("role"))
        value = t.get("value", t.get("content"))
        role = str(role).strip().lower() if role is not None else ""
        text, _ = _text_of(value)
        if text is None:
            return None, "turn without text"
        if role in _HUMAN_ROLES:
            role = "human"
        elif role in _GPT_ROLES:
            role = "gpt"
        elif role in _SYSTEM_ROLES:
            role = "system"
        else:
            return None, "unknown role %r" % role
        out.append({"from": role, "value": text})
    if not any(t["from"] == "human" for t in out) or not any(t["from"] == "gpt" for t in out):
        return None, "needs at least one human and one gpt turn"
    n_tok = sum(t["value"].count(IMAGE_TOKEN) for t in out)
    if has_image:
        if n_tok > 1:
            return None, "%d <image> placeholders for one image" % n_tok
        if n_tok == 0:
            first = next(t for t in out if t["from"] == "human")
            first["value"] = IMAGE_TOKEN + "\n" + first["value"]
    elif n_tok:
        for t in out:
            t["value"] = _strip_image_token(t["value"])
    return out, ""


def _expand_urls(spec: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]) -> List[str]:
    if isinstance(spec, (list, tuple)):
        urls: List[str] = []
        for s in spec:
            urls.extend(_expand_urls(s))
        return urls
    s = os.fspath(spec)
    if "{" in s and ".." in s:
        try:
            from braceexpand import braceexpand
        except ImportError:  # pragma: no cover
            from webdataset.shardlists import expand_urls as _eu  # type: ignore

            return list(_eu(s))
        return list(braceexpand(s))
    if os.path.isdir(s):
        return sorted(str(p) for p in Path(s).iterdir() if p.name.endswith(".tar") and p.is_file())
    return [s]


def _worker_split() -> Tuple[int, int]:
    try:
        from torch.utils.data import get_worker_info
    except Exception:  # pragma: no cover
        return 0, 1
    info = get_worker_info()
    if info is None:
        return 0, 1
    return int(info.id), int(info.num_workers)


# --------------------------------------------------------------------------- base
class BaseReader(_IterableBase):  # type: ignore[misc,valid-type]
    """Common iteration, sharding, skipping, statistics and logging."""

    kind = "base"

    def __init__(self, source: str, split_workers: bool = True, max_warnings: int = 50):
        self.source = source
        self.split_workers = split_workers
        self.max_warnings = int(max_warnings)
        self._rank = 0
        self._world = 1
        self._skip = 0
        self.position = 0
        self._reset_stats()

    # ---- statistics / logging
    def _reset_stats(self) -> None:
        self.stats: Dict[str, int] = {"ok": 0, "skipped_missing": 0, "skipped_corrupt": 0, "skipped_invalid": 0}
        self._warned: set = set()
        self._suppressed = False

    def _warn(self, key: str, msg: str) -> None:
        if key in self._warned:
            return
        if len(self._warned) >= self.max_warnings:
            if not self._suppressed:
                self._suppressed = True
                logger.warning("[%s] more than %d problems; further warnings suppressed (see reader.stats)",
                               self.source, self.max_warnings)
            return
        self._warned.add(key)
        logger.warning("[%s] %s", self.source, msg)

    def _skip_bad(self, kind: str, key: str, msg: str) -> None:
        self.stats["skipped_" + kind] = self.stats.get("skipped_" + kind, 0) + 1
        self._warn(key, "skipping: " + msg)

    def _image(self, src, key: str) -> Optional[Image.Image]:
        """Decode an image or count/log/skip it (returns None when skipped)."""
        try:
            return load_image(src, name=key)
        except _ImageError as e:
            self._skip_bad(e.kind, key, str(e))
            return None

    # ---- shard / skip
    def shard(self, rank: int, world_size: int) -> "BaseReader":
        """A new reader over entries ``g % world_size == rank`` of this reader's stream."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError("need 0 <= rank < world_size, got rank=%r world_size=%r" % (rank, world_size))
        if self._skip:
            raise ValueError("shard() must be applied before skip()")
        new = copy.copy(self)
        new._rank = self._rank + self._world * rank
        new._world = self._world * world_size
        new.position = 0
        new._reset_stats()
        return new

    def skip(self, n: int) -> "BaseReader":
        """A new reader without the first ``n`` entries of this reader's stream."""
        if n < 0:
            raise ValueError("skip(n) needs n >= 0")
        new = copy.copy(self)
        new._skip = self._skip + int(n)
        new.position = new._skip
        new._reset_stats()
        return new

    # ---- iteration
    def _entries(self) -> Iterator[Any]:  # raw entries in file order
        raise NotImplementedError

    def _convert(self, entry: Any, index: int) -> Optional[Dict[str, Any]]:
        raise NotImplementedError

    def _selected(self, entries: Iterable[Any]) -> Iterator[Tuple[int, Any]]:
        wid, nw = _worker_split() if self.split_workers else (0, 1)
        local = -1
        for g, entry in enumerate(entries):
            if g % self._world != self._rank:
                continue
            local += 1
            if local < self._skip:
                continue
            if (local - self._skip) % nw != wid:
                continue
            yield local, entry

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        self.position = self._skip
        for local, entry in self._selected(self._entries()):
            self.position = local + 1
            rec = self._convert(entry, local)
            if rec is not None:
                self.stats["ok"] += 1
                yield rec

    def _count_after_shard(self, n: int) -> int:
        per_rank = (n - self._rank + self._world - 1) // self._world if n > self._rank else 0
        return max(0, per_rank - self._skip)

    def __repr__(self) -> str:
        return "%s(source=%r, shard=%d/%d, skip=%d)" % (type(self).__name__, self.source, self._rank, self._world,
                                                         self._skip)


# --------------------------------------------------------------------------- JSON / JSONL
class _JsonRecordReader(BaseReader):
    """Base for readers of a JSON list or a JSONL file of records."""

    def __init__(self, path, image_root=None, source: Optional[str] = None, records: Optional[list] = None,
                 **kw):
        path = os.fspath(path)
        if records is None and not os.path.isfile(path):
            raise FileNotFoundError("dataset file not found: %s" % path)
        self.path = path
        self.image_root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
        self.is_jsonl = records is None and not path.endswith(".json")
        # shared (by reference) between shard()/skip() copies
        self._cache: Dict[str, Any] = {}
        if records is not None:
            self._cache["records"] = records
        super().__init__(source or Path(path).name.split(".")[0], **kw)

    def _records(self) -> list:
        if "records" not in self._cache:
            with open(self.path, "r", encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, dict):  # {"data": [...]} / {"annotations": [...]}
                for k in ("data", "annotations", "records"):
                    if isinstance(data.get(k), list):
                        data = data[k]
                        break
            if not isinstance(data, list):
                raise ValueError("%s: expected a JSON list of records" % self.path)
            self._cache["records"] = data
        return self._cache["records"]

    def _entries(self) -> Iterator[Any]:
        if not self.is_jsonl:
            yield from enumerate(self._records())
            return
        with open(self.path, "r", encoding="utf-8") as f:
            lineno = 0
            for line in f:
                lineno += 1
                if line.strip():
                    yield lineno, line

    def _parse(self, entry) -> Optional[dict]:
        pos, raw = entry
        if not self.is_jsonl:
            rec = raw
        else:
            try:
                rec = json.loads(raw)
            except ValueError as e:
                self._skip_bad("invalid", "%s:%d" % (self.path, pos), "bad JSON at %s:%d (%s)" % (self.path, pos, e))
                return None
        if not isinstance(rec, dict):
            self._skip_bad("invalid", "%s:%d" % (self.path, pos), "record %s:%d is not an object" % (self.path, pos))
            return None
        return rec

    def __len__(self) -> int:
        if "len" not in self._cache:
            if self.is_jsonl:
                n = 0
                with open(self.path, "rb") as f:
                    for line in f:
                        if line.strip():
                            n += 1
                self._cache["len"] = n
            else:
                self._cache["len"] = len(self._records())
        return self._count_after_shard(self._cache["len"])

    def _image_path(self, image: Any) -> Optional[str]:
        if isinstance(image, list):
            if len(image) != 1:
                return None
            image = image[0]
        if not isinstance(image, str) or not image:
            return None
        return image if os.path.isabs(image) else os.path.join(self.image_root, image)

    def _record_id(self, rec: dict, entry) -> str:
        """The record's ``id``, else ``<source>:<list index or JSONL line number>`` (unique across shards)."""
        rid = rec.get("id")
        return str(rid) if rid is not None else "%s:%s" % (self.source, entry[0])


class ConversationReader(_JsonRecordReader):
    """LLaVA-Instruct / ShareGPT conversation records (JSON list or JSONL)."""

    kind = "conversation"

    def _convert(self, entry, index):
        rec = self._parse(entry)
        if rec is None:
            return None
        where = "%s:%s" % (self.path, entry[0])
        turns = rec.get("conversations", rec.get("messages"))
        img_field = rec.get("image", rec.get("images"))
        if isinstance(img_field, list) and len(img_field) == 0:
            img_field = None
        has_image = img_field is not None
        if has_image and isinstance(img_field, list) and len(img_field) > 1:
            self._skip_bad("invalid", where, "%s: multi-image records are not supported" % where)
            return None
        conv, why = normalize_conversations(turns, has_image)
        if conv is None:
            self._skip_bad("invalid", where, "%s: %s" % (where, why))
            return None
        image = None
        if has_image:
            path = self._image_path(img_field)
            if path is None:
                self._skip_bad("invalid", where, "%s: bad image field %r" % (where, img_field))
                return None
            image = self._image(path, path)
            if image is None:
                return None
        meta = {k: v for k, v in rec.items() if k not in ("id", "image", "images", "conversations", "messages")}
        return {"image": image, "conversations": conv, "source": self.source, "id": self._record_id(rec, entry),
                "index": index, "meta": meta}


class CaptionReader(_JsonRecordReader):
    """``{"image": path, "caption": text}`` records (JSONL or JSON list) as 1-turn conversations."""

    kind = "caption"

    def __init__(self, path, image_root=None, source=None, prompts: Sequence[str] = CAPTION_PROMPTS, **kw):
        super().__init__(path, image_root=image_root, source=source, **kw)
        self.prompts = tuple(prompts)

    def _convert(self, entry, index):
        rec = self._parse(entry)
        if rec is None:
            return None
        where = "%s:%s" % (self.path, entry[0])
        caption = rec.get("caption", rec.get("text"))
        img = rec.get("image")
        if not isinstance(caption, str) or not caption.strip():
            self._skip_bad("invalid", where, "%s: no caption" % where)
            return None
        path = self._image_path(img)
        if path is None:
            self._skip_bad("invalid", where, "%s: bad image field %r" % (where, img))
            return None
        image = self._image(path, path)
        if image is None:
            return None
        key = str(rec.get("id", img))
        conv = [{"from": "human", "value": IMAGE_TOKEN + "\n" + caption_prompt(key, self.prompts)},
                {"from": "gpt", "value": caption.strip()}]
        meta = {k: v for k, v in rec.items() if k not in ("id", "image", "caption", "text")}
        return {"image": image, "conversations": conv, "source": self.source, "id": self._record_id(rec, entry),
                "index": index, "meta": meta}


class PreferenceReader(_JsonRecordReader):
    """MMPR-style preference records (``image``, ``question``, ``chosen``, ``rejected``).

    The chosen response is the gpt turn; ``record["rejected"]`` keeps the other.
    """

    kind = "preference"

    def _convert(self, entry, index):
        rec = self._parse(entry)
        if rec is None:
            return None
        where = "%s:%s" % (self.path, entry[0])
        q, chosen = rec.get("question", rec.get("prompt")), rec.get("chosen")
        if not isinstance(q, str) or not isinstance(chosen, str) or not chosen.strip():
            self._skip_bad("invalid", where, "%s: needs string question and chosen" % where)
            return None
        img = rec.get("image")
        has_image = img not in (None, "", [])
        conv, why = normalize_conversations([{"from": "human", "value": q}, {"from": "gpt", "value": chosen}],
                                            has_image)
        if conv is None:
            self._skip_bad("invalid", where, "%s: %s" % (where, why))
            return None
        image = None
        if has_image:
            path = self._image_path(img)
            if path is None:
                self._skip_bad("invalid", where, "%s: bad image field %r" % (where, img))
                return None
            image = self._image(path, path)
            if image is None:
                return None
        rejected = rec.get("rejected")
        meta = {k: v for k, v in rec.items() if k not in ("id", "image", "question", "prompt", "chosen", "rejected")}
        return {"image": image, "conversations": conv, "source": self.source, "id": self._record_id(rec, entry),
                "index": index, "meta": meta, "rejected": rejected if isinstance(rejected, str) else None}


# --------------------------------------------------------------------------- webdataset tar
def _split_key(name: str) -> Tuple[str, str]:
    """webdataset convention: key = path up to the first '.' of the basename."""
    d, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (d + "/" + stem if d else stem), ext.lower()


def _tar_tail_ok(path: str) -> bool:
    """An uncompressed tar ends with (at least) two zero 512-byte blocks."""
    size = os.path.getsize(path)
    if size % 512 or size < 1024:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) == b"\0" * 1024


class WebDatasetCaptionReader(BaseReader):
    """Image-caption pairs from webdataset tar shards (img2dataset layout), streamed."""

    kind = "webdataset"

    def __init__(self, urls, source: Optional[str] = None, prompts: Sequence[str] = CAPTION_PROMPTS, **kw):
        self.urls = _expand_urls(urls)
        if not self.urls:
            raise FileNotFoundError("no tar shards found for %r" % (urls,))
        for u in self.urls:
            if not os.path.isfile(u):
                raise FileNotFoundError("tar shard not found: %s" % u)
        self.prompts = tuple(prompts)
        if source is None:
            source = os.path.basename(os.path.dirname(os.path.abspath(self.urls[0]))) or "webdataset"
        super().__init__(source, **kw)

    def _reset_stats(self) -> None:
        super()._reset_stats()
        self.stats["corrupt_shards"] = 0

    def shard(self, rank: int, world_size: int, by: str = "sample") -> "WebDatasetCaptionReader":
        """``by="sample"``: every ``world_size``-th sample; ``by="file"``: tar files ``urls[rank::world_size]``."""
        if by == "sample":
            return super().shard(rank, world_size)  # type: ignore[return-value]
        if by != "file":
            raise ValueError("by must be 'sample' or 'file'")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError("need 0 <= rank < world_size")
        if self._skip:
            raise ValueError("shard() must be applied before skip()")
        if len(self.urls) < world_size:
            raise ValueError("%d shards cannot be split by file over %d ranks" % (len(self.urls), world_size))
        new = copy.copy(self)
        new.urls = self.urls[rank::world_size]
        new.position = 0
        new._reset_stats()
        return new

    def _entries(self) -> Iterator[Any]:
        for url in self.urls:
            cur_key: Optional[str] = None
            cur: Dict[str, bytes] = {}
            try:
                with open(url, "rb") as fobj:
                    compressed = fobj.read(6)[:3] in (b"\x1f\x8b\x08", b"BZh", b"\xfd7z")
                    fobj.seek(0)
                    with tarfile.open(fileobj=fobj, mode="r|*") as tf:
                        for m in tf:
                            if not m.isfile():
                                continue
                            key, ext = _split_key(m.name)
                            if key.startswith("__") or not ext:
                                continue
                            if key != cur_key:
                                if cur_key is not None:
                                    yield url, cur_key, cur
                                cur_key, cur = key, {}
                            f = tf.extractfile(m)
                            cur[ext] = f.read() if f is not None else b""
                if not compressed and not _tar_tail_ok(url):
                    # tarfile stops silently on a header cut short: the last sample may be incomplete
                    raise tarfile.ReadError("no end-of-archive marker (truncated file?)")
            except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                self.stats["corrupt_shards"] = self.stats.get("corrupt_shards", 0) + 1
                self._warn(url, "unreadable tar shard %s (%s: %s); dropping its unfinished sample and "
                                "continuing with the next shard" % (url, type(e).__name__, e))
                continue
            if cur_key is not None:
                yield url, cur_key, cur

    def _convert(self, entry, index):
        url, key, sample = entry
        where = "%s#%s" % (url, key)
        img_ext = next((e for e in IMAGE_EXTS if e in sample), None)
        caption = None
        if "txt" in sample:
            caption = sample["txt"].decode("utf-8", errors="replace").strip()
        if not caption and "json" in sample:
            try:
                caption = str(json.loads(sample["json"].decode("utf-8")).get("caption") or "").strip()
            except (ValueError, AttributeError):
                caption = None
        if img_ext is None:
            self._skip_bad("missing", where, "%s: sample has no image" % where)
            return None
        if not caption:
            self._skip_bad("invalid", where, "%s: sample has no caption" % where)
            return None
        image = self._image(sample[img_ext], "%s.%s" % (where, img_ext))
        if image is None:
            return None
        rid = "%s/%s" % (os.path.basename(url), key)
        conv = [{"from": "human", "value": IMAGE_TOKEN + "\n" + caption_prompt(rid, self.prompts)},
                {"from": "gpt", "value": caption}]
        return {"image": image, "conversations": conv, "source": self.source, "id": rid, "index": index,
                "meta": {"shard": url, "key": key}}


# --------------------------------------------------------------------------- open_dataset
_KIND_ALIASES = {
    "conversation": "conversation", "conversations": "conversation", "llava": "conversation",
    "sharegpt": "conversation", "json": "conversation", "jsonl": "conversation",
    "caption": "caption", "captions": "caption", "caption_jsonl": "caption",
    "webdataset": "webdataset", "wds": "webdataset", "tar": "webdataset",
    "preference": "preference", "mmpr": "preference",
}


def _kind_of_record(rec: Any, path: str) -> str:
    if isinstance(rec, dict):
        if "conversations" in rec or "messages" in rec:
            return "conversation"
        if "chosen" in rec and "rejected" in rec:
            return "preference"
        if "caption" in rec or ("text" in rec and "image" in rec):
            return "caption"
    raise ValueError("cannot detect the format of %s from its first record (keys: %s); pass kind=..."
                     % (path, sorted(rec) if isinstance(rec, dict) else type(rec).__name__))


def open_dataset(path_or_spec, kind: str = "auto", image_root=None, source: Optional[str] = None,
                 **kwargs) -> BaseReader:
    """Open a dataset and return a reader (iterable of uniform records).

    ``path_or_spec``: a ``.json``/``.jsonl`` file, a ``.tar`` file, a brace
    pattern of tar shards, a directory of ``*.tar`` shards, or a list of tar
    paths.  ``kind``: "auto" (by extension, then by the keys of the first
    record), "conversation" (llava/sharegpt), "caption", "webdataset"
    (wds/tar) or "preference" (mmpr).  Extra keyword arguments go to the
    reader (``split_workers``, ``max_warnings``, ``prompts``).
    Raises :class:`FileNotFoundError` naming a missing file/shard.
    """
    k = kind.lower()
    if k != "auto":
        if k not in _KIND_ALIASES:
            raise ValueError("unknown kind %r; choose from %s" % (kind, sorted(set(_KIND_ALIASES))))
        k = _KIND_ALIASES[k]

    if isinstance(path_or_spec, (list, tuple)):
        if k not in ("auto", "webdataset"):
            raise ValueError("a list of paths is only supported for webdataset tar shards")
        return WebDatasetCaptionReader(path_or_spec, source=source, **kwargs)

    spec = os.fspath(path_or_spec)
    is_tar_spec = spec.endswith(".tar") or ("{" in spec and ".tar" in spec) or os.path.isdir(spec)
    if k == "webdataset" or (k == "auto" and is_tar_spec):
        return WebDatasetCaptionReader(spec, source=source, **kwargs)

    if not os.path.isfile(spec):
        raise FileNotFoundError("dataset file not found: %s" % spec)

    records = None
    if k == "auto":
        if spec.endswith(".json"):
            with open(spec, "r", encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, dict):
                for key in ("data", "annotations", "records"):
                    if isinstance(data.get(key), list):
                        data = data[key]
                        break
            if not isinstance(data, list):
                raise ValueError("%s: expected a JSON list of records" % spec)
            records = data
            k = _kind_of_record(data[0], spec) if data else "conversation"
        else:
            first = None
            with open(spec, "r", encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        first = json.loads(line)
                        break
            k = _kind_of_record(first, spec) if first is not None else "conversation"
    cls = {"conversation": ConversationReader, "caption": CaptionReader, "preference": PreferenceReader}[k]
    reader = cls(spec, image_root=image_root, source=source, **kwargs)
    if records is not None:
        reader._cache["records"] = records
    return reader
