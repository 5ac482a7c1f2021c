"""Deterministic, resumable training streams over the `firebolt_vl.data` readers.

Every process (rank) reads its own shard of each source (`reader.shard(rank, world)`: entries g % world == rank).
Within a shard, entries are cut into windows of W = shuffle_buffer consecutive entries; each epoch visits the windows
in a seeded order (when the source has a length) and yields each window's records in a seeded permutation. The
order depends only on (seed, epoch, source, rank, W), never on timing or on the number of data-loader workers, and a
position is just (window slot, offset): resuming re-reads one window, skipping the entries before it without decoding
their images. Several sources are mixed by a seeded draw per example (counter-based, so its state is an integer).

Records are decoded, tokenised and resized in data-loader workers when `num_workers` > 0 (each worker takes every
nw-th entry of a window; the main process reassembles the window in entry order before permuting it).

    ListSource          in-memory records with the reader protocol (tests, notebooks)
    open_source(...)    DataSource / path / reader / list -> reader
    SourceStream        one source, one rank, one epoch: yields (Encoded, (slot, offset) after it)
    MixedStream         several SourceStreams mixed: yields (Encoded, state dict after it)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .collate import Encoded, SkipExample, encode_conversation
from .recipe import DataSource

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(*keys: int) -> float:
    """A reproducible number in [0, 1) from integer keys (counter-based: no state to save)."""
    h = 0x1234567
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return (h >> 11) / float(1 << 53)


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])


# ---------------------------------------------------------------------------------------------- sources
class ListSource(IterableDataset):
    """In-memory records `{"image": PIL|path|None, "conversations": [...]}` with the readers' protocol: shard(rank,
    world), skip(n), len(), records carrying "index", entries dealt to data-loader workers round-robin."""

    def __init__(self, records: list[dict], source: str = "list", _rank: int = 0, _world: int = 1, _skip: int = 0):
        self.records, self.source = list(records), source
        self._rank, self._world, self._skip = _rank, _world, _skip
        self.stats = Counter()

    def shard(self, rank: int, world_size: int) -> "ListSource":
        if self._skip:
            raise ValueError("shard() must be applied before skip()")
        return ListSource(self.records, self.source, self._rank + self._world * rank, self._world * world_size)

    def skip(self, n: int) -> "ListSource":
        return ListSource(self.records, self.source, self._rank, self._world, self._skip + int(n))

    def __len__(self) -> int:
        return max(0, len(range(self._rank, len(self.records), self._world)) - self._skip)

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.records[self._rank :: self._world]
        for local in range(self._skip, len(mine)):
            if (local - self._skip) % nw != wid:
                continue
            rec = dict(mine[local])
            rec.setdefault("image", None)
            rec["index"] = local
            self.stats["ok"] += 1
            yield rec


def open_source(spec, data_root: Optional[str] = None, image_root: Optional[str] = None):
    """A DataSource, a path, a list of records, or a reader (returned as is) -> reader with shard/skip."""
    if isinstance(spec, list) and spec and isinstance(spec[0], dict):
        return ListSource(spec)
    if hasattr(spec, "shard") and hasattr(spec, "skip"):
        return spec
    from ..data import open_dataset

    if not isinstance(spec, DataSource):
        spec = DataSource(path=spec if isinstance(spec, list) else str(spec))
    spec = spec.resolved(data_root)
    return open_dataset(spec.path, kind=spec.kind, image_root=spec.image_root or image_root)


def source_length(reader, spec=None) -> Optional[int]:
    """Entries in the reader (an upper bound on its records), the DataSource's num_samples hint, or None."""
    try:
        return len(reader)
    except TypeError:
        return getattr(spec, "num_samples", None)


def source_name(reader) -> str:
    return str(getattr(reader, "source", None) or getattr(reader, "path", None) or type(reader).__name__)


# ---------------------------------------------------------------------------------------------- one source
class _EncodeFn:
    """Picklable record -> Encoded (runs in data-loader workers)."""

    def __init__(self, processor, max_length: int, loss_on: str):
        self.processor, self.max_length, self.loss_on = processor, max_length, loss_on

    def __call__(self, rec: dict) -> Encoded:
        ex = encode_conversation(self.processor, rec["conversations"], rec.get("image"), self.max_length, self.loss_on)
        ex.index = int(rec["index"])
        return ex


class _WindowReader(IterableDataset):
    """Reads the given windows [(slot, start, end)] of a (sharded) reader; in worker `wid` of `nw` only every nw-th
    entry. Yields ("ex", slot, Encoded) and, after each window, ("done", slot, counts) with the skip counters."""

    def __init__(self, reader, windows, encode: Callable[[dict], Encoded], unbounded: bool = False):
        self.reader, self.windows, self.encode = reader, windows, encode
        self.unbounded = unbounded  # windows go on until the reader runs out (sources without a length)

    def __iter__(self):
        it, pending, exhausted, next_start = None, None, False, None
        counts: Counter = Counter()
        stats_before: dict = {}
        for slot, start, end in self.windows:
            if it is None or start != next_start:  # windows out of order: restart the reader at this window
                reader = self.reader.skip(start)
                it, pending, exhausted = iter(reader), None, False
                stats_before = dict(getattr(reader, "stats", {}))
            while not exhausted:
                rec = pending if pending is not None else next(it, None)
                pending = None
                if rec is None:
                    exhausted = True
                    break
                if rec["index"] >= end:
                    pending = rec
                    break
                try:
                    ex = self.encode(rec)
                except SkipExample as e:
                    counts[f"skipped_{e.reason}"] += 1
                    continue
                counts["truncated"] += int(ex.truncated)
                yield "ex", slot, ex
            stats = dict(getattr(reader, "stats", {}))
            for k, v in stats.items():
                if k != "ok" and isinstance(v, int):
                    counts[k] += v - stats_before.get(k, 0)
            stats_before = stats
            yield "done", slot, dict(counts)
            counts.clear()
            next_start = end
            if exhausted and self.unbounded:
                return


class _Unbounded:
    """Windows 0, 1, 2, ... of size W for sources without a length (stops when the reader runs out)."""

    def __init__(self, first: int, size: int):
        self.first, self.size = first, size

    def __iter__(self):
        s = self.first
        while True:
            yield s, s * self.size, (s + 1) * self.size
            s += 1


def _identity(x):
    return x


class SourceStream:
    """One rank's pass over one source in one epoch: yields (Encoded, (slot, offset)) where (slot, offset) is the
    position just after that example; `start=(slot, offset)` resumes there."""

    def __init__(self, reader, *, rank: int, world: int, epoch: int, seed: int, source_id: int, window: int,
                 shuffle: bool, encode: Callable[[dict], Encoded], num_workers: int = 0,
                 start: tuple[int, int] = (0, 0), on_counts=None, prefetch: int = 64):
        self.base = reader.shard(rank, world) if world > 1 else reader
        self.prefetch = int(prefetch)  # examples decoded ahead by the workers (about two optimizer steps' worth)
        self.keys = (seed, epoch, source_id, rank)
        self.window, self.shuffle, self.encode = int(window), bool(shuffle), encode
        self.num_workers, self.start = int(num_workers), (int(start[0]), int(start[1]))
        self.on_counts = on_counts
        try:
            n = len(self.base)
        except TypeError:
            n = None
        self.n_windows = None if n is None else math.ceil(n / self.window)
        self._loader = None

    def _windows(self, first_slot: int):
        W = self.window
        if self.n_windows is None:
            return _Unbounded(first_slot, W)
        order = np.arange(self.n_windows)
        if self.shuffle:
            order = _rng(*self.keys, 1).permutation(self.n_windows)
        return [(s, int(order[s]) * W, int(order[s] + 1) * W) for s in range(first_slot, self.n_windows)]

    def __iter__(self) -> Iterator[tuple[Encoded, tuple[int, int]]]:
        first_slot, skip = self.start
        windows = self._windows(first_slot)
        ds = _WindowReader(self.base, windows, self.encode, unbounded=isinstance(windows, _Unbounded))
        nw = max(1, self.num_workers)
        if self.num_workers > 0:
            # an explicit generator: creating a loader iterator must not draw from the global RNG (resume exactness)
            per_worker = max(2, math.ceil(self.prefetch / self.num_workers))
            self._loader = DataLoader(ds, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                                      generator=torch.Generator().manual_seed(0), prefetch_factor=per_worker)
            source = iter(self._loader)
        else:
            source = iter(ds)
        pending: dict[int, list[Encoded]] = {}
        done: Counter = Counter()
        next_slot = first_slot
        for kind, slot, payload in source:
            if kind == "ex":
                pending.setdefault(slot, []).append(payload)
                continue
            done[slot] += 1
            if self.on_counts is not None and payload:
                self.on_counts(payload)
            while done[next_slot] >= nw:  # every worker finished this window: emit it
                yield from self._emit(next_slot, pending.pop(next_slot, []), skip)
                skip, next_slot = 0, next_slot + 1
        for slot in sorted(pending):  # sources without a length: workers stop at different windows
            if slot >= next_slot:
                yield from self._emit(slot, pending.pop(slot), skip if slot == first_slot else 0)
        self.close()

    def _emit(self, slot: int, examples: list[Encoded], skip: int):
        examples.sort(key=lambda e: e.index)
        if self.shuffle and len(examples) > 1:
            order = _rng(*self.keys, 2, slot).permutation(len(examples))
            examples = [examples[i] for i in order]
        n = len(examples)
        for off in range(skip, n):
            yield examples[off], ((slot, off + 1) if off + 1 < n else (slot + 1, 0))

    def close(self):
        self._loader = None


# ---------------------------------------------------------------------------------------------- mixing
@dataclasses.dataclass
class StreamState:
    """Position of one rank in one epoch: draws made, which sources ran out, each source's (slot, offset)."""

    draws: int = 0
    exhausted: list = dataclasses.field(default_factory=list)
    positions: list = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return {"draws": self.draws, "exhausted": list(self.exhausted), "positions": [list(p) for p in self.positions]}

    @classmethod
    def from_dict(cls, d: dict) -> "StreamState":
        return cls(int(d["draws"]), [bool(x) for x in d["exhausted"]], [tuple(p) for p in d["positions"]])


class MixedStream:
    """Mix the stage's sources for one rank and epoch. Draw k picks source s with probability weight_s / sum of the
    weights of the sources not yet exhausted, from uniform(seed, epoch, rank, k). Yields (Encoded, StreamState dict)."""

    def __init__(self, readers: list, weights: list[float], *, rank: int, world: int, epoch: int, seed: int,
                 window: int, shuffle: bool, encode, num_workers: int = 0, state: Optional[dict] = None,
                 on_counts=None, prefetch: int = 64):
        n = len(readers)
        st = StreamState.from_dict(state) if state else StreamState(0, [False] * n, [(0, 0)] * n)
        if len(st.positions) != n:
            raise ValueError(f"checkpoint has a data position for {len(st.positions)} sources, the stage has {n}")
        self.state, self.weights = st, [float(w) for w in weights]
        self.keys = (seed, epoch, rank)
        self.streams = [
            SourceStream(r, rank=rank, world=world, epoch=epoch, seed=seed, source_id=i, window=window,
                         shuffle=shuffle, encode=encode, num_workers=num_workers, start=st.positions[i],
                         on_counts=on_counts, prefetch=prefetch)
            for i, r in enumerate(readers)
        ]
        self._iters: list = [None] * n

    def _pick(self, k: int) -> Optional[int]:
        live = [i for i, ex in enumerate(self.state.exhausted) if not ex]
        if not live:
            return None
        if len(live) == 1:
            return live[0]
        total = sum(self.weights[i] for i in live)
        u = uniform(*self.keys, k) * total
        for i in live:
            u -= self.weights[i]
            if u < 0:
                return i
        return live[-1]

    def __iter__(self):
        st = self.state
        while True:
            i = self._pick(st.draws)
            if i is None:
                return
            if self._iters[i] is None:
                self._iters[i] = iter(self.streams[i])
            item = next(self._iters[i], None)
            if item is None:
                st.exhausted[i] = True
                self._iters[i] = None
                continue
            example, position = item
            st.positions[i] = position
            st.draws += 1
            yield example, st.to_dict()

    def close(self):
        for s in self.streams:
            s.close()
        self._iters = [None] * len(self.streams)


__all__ = ["ListSource", "open_source", "source_length", "SourceStream", "MixedStream", "StreamState", "uniform"]
