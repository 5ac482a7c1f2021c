"""The batching engine: one thread owns the model and runs queued requests in small batches, streaming tokens out.

Glossary
    B rows in a batch (one request per row)   T longest prompt in the batch (rows are left padded to it)
    S processor image side

Requests (`Job`s) wait in a bounded queue. The engine thread takes the oldest one and every other waiting job with the
same *batch key*, up to `max_batch_size`, and runs them as one left-padded `model.generate` call (rows with and without
an image mix freely: the model fills image memory per row).

Batch keys, and why:
    greedy (temperature 0)        -> one key per repetition_penalty: greedy rows are independent, so a batched greedy
                                     row equals the same request run alone (the model's left padding is exact).
    sampled, no seed              -> (temperature, top_p, min_p, repetition_penalty): same warpers, one shared
                                     generator seeded at random.
    sampled with a seed           -> a key of its own: the request runs alone with
                                     `torch.Generator().manual_seed(seed)`, exactly the draws that
                                     `model.generate(..., generator=...)` makes for that prompt, so the server's
                                     answer equals `generate` for the same seed. (`generate` draws every row from one
                                     generator, so a row's draws depend on its batch-mates; per-row generators would
                                     need a second sampling loop beside `generate`'s. A batch of one keeps a single
                                     sampling path and costs only the batching of seeded sampled requests.)

Stopping is per row: the engine calls `generate(..., ignore_eos=True)` and watches every row itself (EOS, `stop`
strings, the row's own `max_tokens`); a finished row gets its final event at once, and when every row is finished
(or cancelled) the batch ends early. Tokens reach the requests through the model's streamer protocol (`put`/`end`),
as `Event`s handed to each job's `sink` (the server wraps an asyncio queue; the sink must be thread-safe and quick).
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .batching import RowSampler, SlotBatch, choose_tokens

log = logging.getLogger("firebolt_vl.serve")


SCHEDULERS = ("continuous", "static")


def check_serve_compile(scheduler: str, compile: str | None) -> None:
    """A compiled decoding step needs fixed batch shapes: the static scheduler's (one compile per batch size and
    length bucket), never continuous batching's, whose running batch changes shape every step."""
    if compile is None:
        return
    from ..static_decoding import check_compile_mode

    check_compile_mode(compile)
    if scheduler != "static":
        raise ValueError(f"--compile {compile} needs --scheduler static: continuous batching changes its batch shape "
                         "every step, and a compiled step is specialised to one shape")


class QueueFullError(RuntimeError):
    """The engine's queue holds `max_queue` waiting requests already (HTTP 429)."""


class EngineStoppedError(RuntimeError):
    """The engine is not running (shutting down or never started)."""


class _BatchFinished(Exception):
    """Raised from the streamer to end `generate` once every row of the batch is finished."""


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request. temperature 0 = greedy (top_p and seed are then irrelevant)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def batch_key(self, job_id: int) -> tuple:
        if self.greedy:
            return ("greedy", float(self.repetition_penalty))
        if self.seed is not None:
            return ("seeded", job_id)
        return ("sample", float(self.temperature), float(self.top_p), float(self.min_p),
                float(self.repetition_penalty))


@dataclass
class Event:
    """What a job's sink receives: "delta" (new text), then one "done" (finish_reason + token counts) or "error"."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: BaseException | None = None


_ids = itertools.count(1)


@dataclass(eq=False)
class Job:
    """One request: prompt token ids (unpadded), its image's pixels (3, S, S) or None, settings, and an event sink."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None
    params: SamplingParams
    sink: Callable[[Event], None]
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    submitted_at: float = 0.0  # time.monotonic() when queued (time to first token counts from here)
    emitted: bool = False  # has any text left for the client (then a failed batch cannot retry it)
    finished: bool = False

    def cancel(self) -> None:
        """Stop working on this job (client gone); harmless after it finished."""
        self.cancelled = True

    def send(self, event: Event) -> None:
        if self.finished:
            return
        if event.kind == "delta":
            self.emitted = True
        else:
            self.finished = True
        try:
            self.sink(event)
        except Exception:  # a closed event loop or a broken client must never stop the engine
            log.debug("job %s: sink failed", self.id, exc_info=True)


class IncrementalText:
    """Token ids -> text pieces that are safe to show: incomplete UTF-8 at the end and a tail that may still become a
    stop string are held back; the text is cut at the first stop string (which is not shown)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of self.text already handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append one token; returns the newly showable text ('' when nothing new can be shown yet)."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            start = max(0, self.sent - max(len(s) for s in self.stop))
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = text[: min(hits)]
                self.stopped = True
                return self.flush()
        self.text = text
        safe = len(text)
        while safe > self.sent and text[safe - 1] == "\ufffd":  # a multi-byte character not complete yet
            safe -= 1
        hold = 0
        for s in self.stop:  # a suffix that is the start of a stop string may still turn into it
            for k in range(min(len(s) - 1, safe - self.sent), hold, -1):
                if text[safe - k : safe] == s[:k]:
                    hold = k
                    break
        safe -= hold
        if safe <= self.sent:
            return ""
        piece, self.sent = text[self.sent : safe], safe
        return piece

    def flush(self) -> str:
        """Everything not handed out yet (at the end of the row)."""
        piece, self.sent = self.text[self.sent :], len(self.text)
        return piece


class _Row:
    def __init__(self, job: Job, tokenizer, eos: set[int], timing: "TokenTiming | None" = None):
        self.job = job
        self.text = IncrementalText(tokenizer, job.params.stop)
        self.eos = set() if job.params.ignore_eos else eos
        self.n = 0
        self.done = False
        self.timing = timing
        self.last = job.submitted_at

    def finish(self, reason: str) -> None:
        rest = self.text.flush()
        if rest:
            self.job.send(Event("delta", rest))
        self.job.send(Event("done", finish_reason=reason, prompt_tokens=len(self.job.input_ids),
                            completion_tokens=self.n))
        self.done = True

    def step(self, token: int) -> None:
        if self.done:
            return
        if self.job.cancelled:
            self.done = True
            return
        self.n += 1
        if self.timing is not None:
            now = time.monotonic()
            (self.timing.first_token if self.n == 1 else self.timing.next_token)(now - self.last)
            self.last = now
        if token in self.eos:
            self.finish("stop")
            return
        piece = self.text.add(token)
        if piece:
            self.job.send(Event("delta", piece))
        if self.text.stopped:
            self.finish("stop")
        elif self.n >= self.job.params.max_tokens:
            self.finish("length")


@dataclass
class TokenTiming:
    """Where the engine reports latencies (seconds): first_token(time from queueing to a row's first token) and
    next_token(time between two tokens of a row). The server's metrics plug in here."""

    first_token: Callable[[float], None]
    next_token: Callable[[float], None]


class _BatchStreamer:
    """The model's streamer protocol for a batch: put(prompt ids) first, then put(new ids (B,)) per step, end()."""

    def __init__(self, rows: list[_Row]):
        self.rows = rows
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.tolist()):
            row.step(token)
        if all(r.done for r in self.rows):
            raise _BatchFinished

    def end(self) -> None:
        pass


class Engine:
    """Owns the model in one thread; `submit` jobs from any thread. Start with `start()`, stop with `stop()`."""

    def __init__(self, model, processor, max_batch_size: int = 8, max_queue: int = 64, batch_wait_s: float = 0.005,
                 scheduler: str = "continuous", prefill_tokens: int = 4096, max_join_wait_s: float = 0.5,
                 compile: str | None = None):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        check_serve_compile(scheduler, compile)
        self.scheduler = scheduler
        self.compile = compile  # static scheduler: generate(compile=...) (static cache + compiled step)
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_batch_size = int(max_batch_size)
        self.max_queue = int(max_queue)
        self.batch_wait_s = float(batch_wait_s)
        self.prefill_tokens = int(prefill_tokens)  # continuous: padded prompt tokens per prefill forward
        self.max_join_wait_s = float(max_join_wait_s)  # continuous: the longest a job waits to join (_JoinClock)
        tc = model.config.text_config
        eos = tc.eos_token_id if tc.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids: set[int] = set([eos] if isinstance(eos, int) else (eos or []))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.device = next(model.parameters()).device
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._draining = False
        self.timing: TokenTiming | None = None
        self.running = 0  # rows in the batch being decoded now
        self._current: list[Job] = []
        # batches: static batches run / continuous admissions (a group of rows joining between two steps);
        # steps: decoding steps of the running batch (continuous)
        self.stats = {"requests": 0, "batches": 0, "rows": 0, "tokens": 0, "errors": 0, "rejected": 0, "steps": 0}

    # ---- lifecycle ----
    def start(self) -> "Engine":
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            loop = self._loop if self.scheduler == "static" else self._loop_continuous
            self._thread = threading.Thread(target=loop, name="firebolt-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Fail the waiting jobs and the batch in flight (it ends at its next token), end the thread."""
        with self._cond:
            self._stopping = True
            dropped = list(self._pending) + list(self._current)
            self._pending.clear()
            self._cond.notify_all()
        for job in dropped:
            job.send(Event("error", error=EngineStoppedError("the server is shutting down")))
            job.cancel()
        if self._thread is not None:
            self._thread.join(timeout)

    def drain(self, timeout: float) -> bool:
        """Refuse new jobs (EngineStoppedError) and wait up to `timeout` s for the queued and running ones to finish;
        True if they all did. `stop()` afterwards fails whatever is left."""
        with self._cond:
            self._draining = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cond:
                if not self._pending and not self._current:
                    return True
            time.sleep(0.02)
        return False

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def queue_length(self) -> int:
        return len(self._pending)

    # ---- submitting ----
    def submit(self, job: Job) -> None:
        """Queue a job; raises QueueFullError when max_queue jobs are waiting, EngineStoppedError when stopped."""
        if job.params.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        with self._cond:
            if not self.alive:
                raise EngineStoppedError("the engine is not running")
            if self._draining:
                raise EngineStoppedError("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFullError(f"the server is busy: {len(self._pending)} requests are already waiting")
            job.submitted_at = time.monotonic()
            self._pending.append(job)
            self.stats["requests"] += 1
            self._cond.notify()

    # ---- the engine thread ----
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
            if self.batch_wait_s > 0 and len(self._pending) < self.max_batch_size:
                time.sleep(self.batch_wait_s)  # let a burst of requests arrive to share the batch
            batch = self._take_batch()
            if batch:
                self.running = len(batch)
                try:
                    self._run(batch)
                finally:
                    self.running = 0
                    self._current = []

    def _take_batch(self) -> list[Job]:
        with self._cond:
            while self._pending and self._pending[0].cancelled:
                self._pending.popleft()
            if not self._pending:
                return []
            head = self._pending[0]
            key = head.params.batch_key(head.id)
            batch = [j for j in self._pending if not j.cancelled and j.params.batch_key(j.id) == key]
            batch = batch[: self.max_batch_size]
            taken = {j.id for j in batch}
            self._pending = deque(j for j in self._pending if j.id not in taken and not j.cancelled)
            self._current = batch
            return batch

    def _run(self, batch: list[Job]) -> None:
        try:
            self._generate(batch)
        except Exception as e:  # never let one batch take the engine down
            log.exception("batch of %d failed", len(batch))
            retry = [j for j in batch if not j.finished and not j.emitted and not j.cancelled]
            if len(batch) > 1 and retry:  # one bad row must not sink the others: run each alone
                for job in retry:
                    self._run([job])
            for job in batch:
                if not job.finished:
                    self.stats["errors"] += 1
                    job.send(Event("error", error=e))

    def _padded(self, jobs: list[Job]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The prompts left-padded into input_ids, attention_mask (B, T) and the images stacked in row order
        (N_img, 3, S, S) or None, on the model's device."""
        B, T = len(jobs), max(len(j.input_ids) for j in jobs)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        for i, job in enumerate(jobs):
            n = len(job.input_ids)
            input_ids[i, T - n :] = torch.tensor(job.input_ids, dtype=torch.long)
            attention_mask[i, T - n :] = 1
        images = [j.pixel_values for j in jobs if j.pixel_values is not None]
        pixel_values = torch.stack(images).to(self.device, self.model.dtype) if images else None
        return input_ids.to(self.device), attention_mask.to(self.device), pixel_values

    def _generate(self, batch: list[Job]) -> None:
        """Left-padded prompts and the images in row order, decoded with per-row stopping."""
        B = len(batch)
        input_ids, attention_mask, pixel_values = self._padded(batch)
        params = batch[0].params
        generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else random.getrandbits(63)
            generator = torch.Generator(device=self.device).manual_seed(seed)
        rows = [_Row(j, self.tokenizer, self.eos_ids, self.timing) for j in batch]
        self.stats["batches"] += 1
        self.stats["rows"] += B
        try:
            self.model.generate(
                input_ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values,
                max_new_tokens=max(j.params.max_tokens for j in batch),
                do_sample=not params.greedy,
                temperature=params.temperature if not params.greedy else 1.0,
                top_p=params.top_p,
                min_p=params.min_p or None,
                repetition_penalty=params.repetition_penalty,
                ignore_eos=True,  # each row stops on its own (EOS / stop / max_tokens), see _Row
                generator=generator,
                streamer=_BatchStreamer(rows),
                compile=self.compile,
            )
        except _BatchFinished:
            pass
        for row in rows:
            self.stats["tokens"] += row.n
            if not row.done and not row.job.cancelled:
                row.finish("length")

    # ---- continuous batching (iteration-level scheduling) ----
    def _loop_continuous(self) -> None:
        """Between two decoding steps, waiting jobs that fit in free slots are prefilled, in groups of one left-padded
        forward each (`generate`'s prefill of a padded batch; their first tokens come from it), and join the running
        batch (`SlotBatch.admit`) when `_JoinClock` says it is time; finished or cancelled rows leave before the next
        step (`SlotBatch.remove`), freeing their slot."""
        torch.set_grad_enabled(False)
        batch = SlotBatch(self.max_batch_size, self.model.cmm)
        clock = _JoinClock(self.max_join_wait_s)
        while True:
            joining: list[Job] = []
            with self._cond:
                while not self._pending and not batch.rows and not self._stopping:
                    self._cond.wait()
                if self._stopping:  # stop() has sent the running and waiting jobs their error already
                    return
                if self._pending and clock.due(batch.rows, batch.free(), self._pending[0]):
                    while self._pending and len(joining) < batch.free():
                        job = self._pending.popleft()
                        if not job.cancelled:
                            joining.append(job)
                    self._current = [s.job for s in batch.slots] + joining
            if joining:
                self.stats["batches"] += 1
                for group in self._prefill_groups(joining):
                    t0 = time.perf_counter()
                    self._join(batch, group)
                    clock.joined(time.perf_counter() - t0)
            changed = self._release(batch) or bool(joining)
            if batch.rows:
                t0 = time.perf_counter()
                try:
                    tokens = batch.decode(self.model)
                except Exception as e:  # the whole running batch is lost; the engine goes on with the next jobs
                    log.exception("decoding step of %d rows failed", batch.rows)
                    self._fail(batch.slots, e)
                    batch = SlotBatch(self.max_batch_size, self.model.cmm)
                    tokens, changed = [], True
                if tokens:
                    self.stats["steps"] += 1
                    clock.stepped(time.perf_counter() - t0, min(len(self._pending), batch.free()))
                for slot, token in zip(batch.slots, tokens):
                    slot.row.step(token)
                changed = self._release(batch) or changed
            self.running = batch.rows
            if changed:
                with self._cond:
                    self._current = [s.job for s in batch.slots]

    def _prefill_groups(self, jobs: list[Job]) -> list[list[Job]]:
        """Consecutive jobs in groups whose padded prompt tokens (rows x longest prompt) stay within
        `prefill_tokens` (a longer prompt forms a group of its own), so short prompts are not padded to a long one."""
        groups: list[list[Job]] = []
        longest = 0
        for job in jobs:
            n = len(job.input_ids)
            if groups and (len(groups[-1]) + 1) * max(longest, n) <= self.prefill_tokens:
                groups[-1].append(job)
                longest = max(longest, n)
            else:
                groups.append([job])
                longest = n
        return groups

    def _join(self, batch: SlotBatch, jobs: list[Job]) -> None:
        """Prefill `jobs` in one forward, choose their first tokens and admit them to the running batch. When the
        group's prefill fails, each job is prefilled alone, so one bad request does not sink the others."""
        try:
            input_ids, attention_mask, pixel_values = self._padded(jobs)
            out = self.model(input_ids, attention_mask, pixel_values, use_cache=True, logits_to_keep=1)
            slots = [_Slot(j, _Row(j, self.tokenizer, self.eos_ids, self.timing),
                           RowSampler(j.params, j.input_ids, self.device)) for j in jobs]
            first = choose_tokens([s.sampler for s in slots], out.logits[:, -1])  # (n,)
        except Exception as e:
            if len(jobs) > 1:
                log.warning("prefill of %d jobs failed (%s); prefilling them one by one", len(jobs), e)
                for job in jobs:
                    self._join(batch, [job])
                return
            log.exception("job %s: prefill failed", jobs[0].id)
            self.stats["errors"] += 1
            jobs[0].send(Event("error", error=e))
            return
        self.stats["rows"] += len(jobs)
        for slot, token in zip(slots, first.tolist()):
            slot.row.step(token)
        try:
            batch.admit(out.cache, slots, first)
        except Exception as e:  # e.g. a decoder cache layer that has no slot form: these rows only
            log.exception("%d jobs could not join the running batch", len(jobs))
            self._fail(slots, e)

    def _release(self, batch: SlotBatch) -> bool:
        """Rows that finished or whose client left leave the batch (their slot is free for the next job)."""
        gone = [i for i, s in enumerate(batch.slots) if s.row.done or s.job.cancelled]
        for i in gone:
            self.stats["tokens"] += batch.slots[i].row.n
        batch.remove(gone)
        return bool(gone)

    def _fail(self, slots: list["_Slot"], error: BaseException) -> None:
        for s in slots:
            self.stats["tokens"] += s.row.n
            if not s.job.finished:
                self.stats["errors"] += 1
                s.job.send(Event("error", error=error))


class _JoinClock:
    """When waiting jobs join the running batch. A join stalls every running row for one prefill (J seconds, measured:
    a moving average per prefill group), and a waiting job that could run leaves its slot idle; joining at every step
    pays J for each arrival, so arrivals are gathered while the idle time they have accumulated (row-seconds, summed
    over the steps they waited) is below the stall a join costs (running rows x J), the rent-or-buy rule: never more
    than twice the cost of the best schedule in hindsight, and one prefill for many arrivals under load (rows finish
    one at a time, so joining whenever a slot frees would prefill one row per join). They join at once when the batch
    is empty or when the oldest has waited `max_wait_s`."""

    def __init__(self, max_wait_s: float):
        self.max_wait_s = max_wait_s
        self.join_s: float | None = None  # moving average of one prefill group's time
        self.idle = 0.0  # row-seconds the waiting jobs have spent waiting for a slot they could use

    def due(self, running: int, free: int, oldest: Job) -> bool:
        if free == 0:
            return False
        if running == 0 or self.join_s is None:
            return True
        if time.monotonic() - oldest.submitted_at >= self.max_wait_s:
            return True
        return self.idle >= running * self.join_s

    def joined(self, seconds: float) -> None:
        self.join_s = seconds if self.join_s is None else 0.8 * self.join_s + 0.2 * seconds
        self.idle = 0.0

    def stepped(self, seconds: float, waiting: int) -> None:
        self.idle += waiting * seconds


@dataclass(eq=False)
class _Slot:
    """A row of the running batch: its job, its stopping/streaming state, its sampler."""

    job: Job
    row: _Row
    sampler: RowSampler
