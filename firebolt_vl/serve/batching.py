"""The running batch of continuous batching: fixed-capacity per-slot state written in place, and row-wise sampling.

Glossary
    C slots (capacity, the engine's max_batch_size)   B rows running now (slots 0..B-1)   n rows joining at once
    W columns of the running window   T_cap columns allocated   T' a joining group's padded prompt length
    H KV heads   Dh head size   D decoder width   L conv window   G grids   H_c, Dh_c CMM heads and head size

`SlotBatch` keeps every row of the running batch in a slot of buffers allocated once for C rows and reused (the way
vLLM's and llama.cpp's servers keep a fixed pool of sequence slots), and hands `model.decode_step` a `FireboltCache`
whose tensors are views of the first B slots:

    decoder attention layer   keys, values (C, H, T_cap, Dh): the rows are right-aligned at column `end`; a step writes
                              its key/value at column `end` in place (`_SlotKV.update`) and attends over the window
                              [start, end], W = end - start + 1 columns, the left padding of shorter rows hidden by the
                              attention mask. Compared with `DynamicLayer`, no (B, H, T, Dh) copy per step and layer.
    decoder conv layer        conv_states (C, D, L): LFM2's decoding kernel updates the view (B, D, L) in place.
    CMM grid memory           keys (C, H_c, G, Dh_c), values (C, G, D), present (C,) and the FiLM tables (C, G, 2D) x2
                              (`CrossModalModulator.film_tables`, computed for the joining rows only); a row without an
                              image has zeros and present False, what a batched prefill gives such a row.
    per step (model-made)     attention_mask (B, W), positions (B,), the CMM's SSM state (a tuple of (B, ...)) and
                              the last tokens (B,): `decode_step` returns them anew every step, so joining rows are
                              concatenated to them once per joining group and leaving rows are dropped by one
                              `index_select`.

Rows join in groups: the engine prefills every waiting request that fits in one left-padded forward (exactly what
`generate` does with a padded batch) and `admit` copies the group's cache rows into free slots. A row that leaves frees
its slot by moving the last running row into it (one row copy per buffer; no reallocation). When `end` reaches T_cap,
or a joining prompt is longer than `end`, the window is moved (and T_cap doubled when the window fills half of it):
amortised O(1) per step. Columns that are padding in every remaining row are dropped when rows leave.

A row's answer does not depend on its batch-mates: every operation is per row, padding is masked, a row's FiLM tables
and memory are its own, and each row chooses its token with its own `RowSampler` (own penalty history, own generator).

Decoder cache layers other than `DynamicLayer` (KV) and `LinearAttentionLayer` (conv state), e.g. sliding-window,
static or quantized ones, are refused with a TypeError: serve such decoders with `--scheduler static`.
"""

from __future__ import annotations

import random

import torch
from transformers.cache_utils import Cache, DynamicLayer, LinearAttentionLayer

from ..cmm import GridMemory
from ..modeling import FireboltCache
from ..sampling import check_repetition_penalty, penalise_repeats, sampling_warpers

_MIN_COLUMNS = 64  # smallest T_cap allocated


def _check_layer(layer) -> None:
    if type(layer) not in (DynamicLayer, LinearAttentionLayer):  # exact types: sliding-window layers subclass these
        raise TypeError(
            f"continuous batching keeps only DynamicLayer (KV) and LinearAttentionLayer (conv state) caches in slots, "
            f"got {type(layer).__name__}: serve this decoder with --scheduler static"
        )


class _SlotKV(DynamicLayer):
    """One attention layer's keys/values for every slot, (C, H, T_cap, Dh) each, written in place at `batch.end`."""

    def __init__(self, batch: "SlotBatch", like: torch.Tensor, columns: int):
        super().__init__()
        self.batch = batch
        C, (_, H, _, Dh) = batch.capacity, like.shape
        # zeros, not empty: masked columns are multiplied by a zero weight, so they must hold finite numbers
        self.k_buf = like.new_zeros(C, H, columns, Dh)
        self.v_buf = like.new_zeros(C, H, columns, Dh)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key/value_states (B, H, t, Dh) of the new tokens -> keys, values (B, H, W, Dh) over the window."""
        b, t = self.batch, key_states.shape[-2]
        self.k_buf[: b.rows, :, b.end : b.end + t] = key_states
        self.v_buf[: b.rows, :, b.end : b.end + t] = value_states
        self.keys = self.k_buf[: b.rows, :, b.start : b.end + t]
        self.values = self.v_buf[: b.rows, :, b.start : b.end + t]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.batch.end - self.batch.start

    def place(self, rows: slice, columns: slice, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.k_buf[rows, :, columns] = keys
        self.v_buf[rows, :, columns] = values

    def move_window(self, source: slice, target: slice, columns: int) -> None:
        """The running rows' columns `source` -> `target`, in buffers of `columns` columns (reallocated if that grew)."""
        B = self.batch.rows
        for name in ("k_buf", "v_buf"):
            buf = getattr(self, name)
            window = buf[:B, :, source].clone()
            if columns != buf.shape[2]:
                buf = buf.new_zeros(buf.shape[0], buf.shape[1], columns, buf.shape[3])
                setattr(self, name, buf)
            buf[:B, :, target] = window

    def move_row(self, src: int, dst: int) -> None:
        window = slice(self.batch.start, self.batch.end)
        self.k_buf[dst, :, window] = self.k_buf[src, :, window]
        self.v_buf[dst, :, window] = self.v_buf[src, :, window]


class _SlotConv:
    """One conv layer's states for every slot, (C, D, L) each; the transformers layer reads and updates views (B, D, L)."""

    def __init__(self, batch: "SlotBatch", source: LinearAttentionLayer):
        self.layer = LinearAttentionLayer(number_of_states=source.number_of_states)
        self.bufs: dict[int, torch.Tensor] = {}
        for i in range(source.number_of_states):
            if source.is_recurrent_states_initialized[i]:
                raise TypeError("continuous batching keeps conv states only; this decoder also has recurrent states: "
                                "serve it with --scheduler static")
            if source.is_conv_states_initialized[i]:
                state = source.conv_states[i]  # (n, D, L)
                self.bufs[i] = state.new_zeros(batch.capacity, *state.shape[1:])
                self.layer.conv_kernel_size[i] = source.conv_kernel_size[i]
                self.layer.is_conv_states_initialized[i] = True
                self.layer.has_previous_state[i] = True
                self.layer.dtype, self.layer.device = state.dtype, state.device

    def place(self, rows: slice, source: LinearAttentionLayer) -> None:
        for i, buf in self.bufs.items():
            buf[rows] = source.conv_states[i]

    def view(self, B: int) -> None:
        for i, buf in self.bufs.items():
            self.layer.conv_states[i] = buf[:B]  # contiguous: in-place updates land in the buffer

    def move_row(self, src: int, dst: int) -> None:
        for buf in self.bufs.values():
            buf[dst] = buf[src]


class _SlotMemory:
    """The CMM's grid memory for every slot (see the module docstring), with the FiLM tables of each row."""

    def __init__(self, like: GridMemory, capacity: int):
        self.keys = like.keys.new_zeros(capacity, *like.keys.shape[1:])  # (C, H_c, G, Dh_c)
        self.values = like.values.new_zeros(capacity, *like.values.shape[1:])  # (C, G, D)
        self.present = torch.zeros(capacity, dtype=torch.bool, device=like.present.device)  # (C,)
        self.tables: tuple[torch.Tensor, torch.Tensor] | None = None  # (C, G, 2D) x2, made with the first tables
        self.film_key: tuple | None = None  # the FiLM weights' versions the tables hold

    def place(self, rows: slice, memory: GridMemory | None) -> None:
        if memory is None:  # text rows: no image
            self.keys[rows], self.values[rows], self.present[rows] = 0, 0, False
        else:
            self.keys[rows], self.values[rows], self.present[rows] = memory.keys, memory.values, memory.present

    def fill_tables(self, cmm, rows: slice) -> None:
        """FiLM tables of `rows` (of every row up to rows.stop if the FiLM weights changed since the others')."""
        if cmm is None:
            return
        part = self._view(rows, None)
        made = cmm.film_tables(part)  # (n, G, 2D) x2
        if self.film_key is not None and part.film_key != self.film_key and rows.start > 0:
            rows = slice(0, rows.stop)
            part = self._view(rows, None)
            made = cmm.film_tables(part)
        if self.tables is None:
            self.tables = tuple(t.new_zeros(self.keys.shape[0], *t.shape[1:]) for t in made)
        self.tables[0][rows], self.tables[1][rows] = made
        self.film_key = part.film_key

    def _view(self, rows: slice, tables) -> GridMemory:
        return GridMemory(self.keys[rows], self.values[rows], self.present[rows], tables,
                          self.film_key if tables is not None else None)

    def view(self, B: int) -> GridMemory:
        tables = None if self.tables is None else (self.tables[0][:B], self.tables[1][:B])
        return self._view(slice(0, B), tables)

    def move_row(self, src: int, dst: int) -> None:
        for buf in (self.keys, self.values, self.present, *(self.tables or ())):
            buf[dst] = buf[src]


class SlotBatch:
    """The running rows of the continuous engine in C fixed slots (see the module docstring).

    `slots[i]` is the caller's object for row i (it needs a `.sampler`, a `RowSampler`). `admit` adds prefilled rows,
    `decode` runs one step of every row and returns their tokens, `remove` frees slots. `cmm` (the model's
    CrossModalModulator or None) makes the FiLM tables of joining rows."""

    def __init__(self, capacity: int, cmm=None):
        if capacity < 1:
            raise ValueError("a SlotBatch needs at least one slot")
        self.capacity = capacity
        self.cmm = cmm
        self.slots: list = []
        self.start = self.end = 0  # the rows' tokens lie in columns [start, end) of the KV buffers, right-aligned
        self.columns = _MIN_COLUMNS  # T_cap
        self.cache: FireboltCache | None = None  # views of slots [0, B), handed to decode_step
        self.last: torch.Tensor | None = None  # (B,) the token each row feeds next
        self._kv: list[_SlotKV] = []
        self._conv: list[_SlotConv] = []
        self._layers: list | None = None  # the decoder cache's layers, in model order
        self._lm: Cache | None = None  # the decoder cache over them
        self._samplers: list[RowSampler] = []
        self._memory: _SlotMemory | None = None
        self._special: list[int] = []  # rows whose sampler is not a plain argmax

    @property
    def rows(self) -> int:
        return len(self.slots)

    def free(self) -> int:
        return self.capacity - self.rows

    # ---- joining ----
    def admit(self, prefill: FireboltCache, slots: list, first: torch.Tensor) -> None:
        """Rows of a prefilled group (`prefill`, n rows left-padded to T') join, with their first tokens (n,)."""
        n, T_new = prefill.attention_mask.shape
        if n != len(slots) or n > self.free():
            raise ValueError(f"{n} joining rows for {self.free()} free slots")
        if self._layers is None:
            self._build(prefill.lm, T_new)
        elif len(prefill.lm.layers) != len(self._layers):
            raise TypeError("the joining rows' decoder cache has another layer layout than the running batch")
        B = self.rows
        if B == 0:
            self.start = self.end = 0
        if self.end < T_new or self.end >= self.columns:  # no room left of `end`, or none for the next token
            self._move_window(max(self.end - self.start, T_new))
        rows, cols = slice(B, B + n), slice(self.end - T_new, self.end)
        kv, conv = iter(self._kv), iter(self._conv)
        for layer in prefill.lm.layers:
            _check_layer(layer)
            if isinstance(layer, LinearAttentionLayer):
                next(conv).place(rows, layer)
            else:
                next(kv).place(rows, cols, layer.keys, layer.values)  # (n, H, T', Dh) into columns [end-T', end)
        self._admit_memory(prefill.memory, rows)
        W = max(self.end - self.start, T_new)
        mask = prefill.attention_mask.new_zeros(B + n, W)  # (B + n, W)
        if B:
            mask[:B, W - (self.end - self.start) :] = self.cache.attention_mask
        mask[B:, W - T_new :] = prefill.attention_mask
        self.start = self.end - W
        old = self.cache
        positions = prefill.positions if not B else torch.cat([old.positions, prefill.positions])  # (B + n,)
        state = prefill.ssm_state
        if B and (old.ssm_state is None) != (state is None):
            raise TypeError("the joining rows and the running batch disagree on having a CMM state")
        if B and state is not None:
            state = tuple(torch.cat([x, y]) for x, y in zip(old.ssm_state, state, strict=True))
        self.last = first if not B else torch.cat([self.last, first])
        self.slots.extend(slots)
        self.cache = FireboltCache(self._lm, mask, positions, None, state)
        self._views()

    def _build(self, lm, columns: int) -> None:
        """The slot buffers, shaped after the first joining group's decoder cache."""
        self.columns = max(_MIN_COLUMNS, 2 * columns)
        self._layers = []
        for layer in lm.layers:
            _check_layer(layer)
            if isinstance(layer, LinearAttentionLayer):
                self._conv.append(_SlotConv(self, layer))
                self._layers.append(self._conv[-1].layer)
            else:
                self._kv.append(_SlotKV(self, layer.keys, self.columns))
                self._layers.append(self._kv[-1])
        self._lm = Cache(layers=self._layers)

    def _admit_memory(self, memory: GridMemory | None, rows: slice) -> None:
        """The joining rows' grid memory (None: no image among them) and FiLM tables into their slots."""
        if memory is None and self._memory is None:
            return
        tables = rows
        if self._memory is None:  # the first image: the running (text) rows keep the zeros, "no image"
            self._memory = _SlotMemory(memory, self.capacity)
            tables = slice(0, rows.stop)
        self._memory.place(rows, memory)
        self._memory.fill_tables(self.cmm, tables)

    def _move_window(self, end: int) -> None:
        """Right-align the running rows' columns at `end` (W <= end), doubling T_cap when the window fills half."""
        W = self.end - self.start
        columns = self.columns
        while 2 * (end + 1) > columns:
            columns *= 2
        if self.rows or columns != self.columns:  # no rows: start = end = 0, only the reallocation is left
            for layer in self._kv:
                layer.move_window(slice(self.start, self.end), slice(end - W, end), columns)
        self.columns, self.start, self.end = columns, end - W, end

    # ---- leaving ----
    def remove(self, rows: list[int]) -> None:
        """Rows `rows` leave; the last running rows move into their slots (the order of `slots` changes)."""
        if not rows:
            return
        gone = set(rows)
        B = self.rows - len(gone)
        order = list(range(self.rows))  # order[i]: the old row that ends up in slot i
        tail = [i for i in range(B, self.rows) if i not in gone]
        for dst, src in zip(sorted(i for i in gone if i < B), tail):
            order[dst] = src
            for layer in self._kv:
                layer.move_row(src, dst)
            for layer in self._conv:
                layer.move_row(src, dst)
            if self._memory is not None:
                self._memory.move_row(src, dst)
        order = order[:B]
        self.slots = [self.slots[i] for i in order]
        if not B:
            self.cache, self.last, self._memory = None, None, None
            self.start = self.end = 0
            return
        idx = torch.tensor(order, dtype=torch.long, device=self.last.device)
        c = self.cache
        mask = c.attention_mask.index_select(0, idx)  # (B, W)
        cut = int(mask.any(0).long().argmax())  # columns that are padding in every remaining row
        self.start += cut
        self.cache.attention_mask = mask[:, cut:]
        c.positions = c.positions.index_select(0, idx)
        if c.ssm_state is not None:
            c.ssm_state = tuple(t.index_select(0, idx) for t in c.ssm_state)
        self.last = self.last.index_select(0, idx)
        self._views()

    def _views(self) -> None:
        B = self.rows
        for layer in self._conv:
            layer.view(B)
        self.cache.memory = None if self._memory is None else self._memory.view(B)
        self._samplers = [s.sampler for s in self.slots]
        self._special = [i for i, s in enumerate(self._samplers) if not s.plain_greedy]

    # ---- decoding ----
    def decode(self, model) -> list[int]:
        """One step of every running row: feeds `last`, returns each row's next token (and keeps them in `last`)."""
        if self.end >= self.columns:
            self._move_window(self.end - self.start)
        logits = model.decode_step(self.last.unsqueeze(1), self.cache, logits_to_keep=1).logits[:, -1]  # (B, V)
        self.end += 1
        self.last = choose_tokens(self._samplers, logits, self._special)
        return self.last.tolist()


class RowSampler:
    """One row's token choice, the same operations `model.generate` applies to a batch of one: logits in fp32,
    repetition penalty over the row's own tokens (prompt, then answer), then argmax, or the warpers (temperature,
    top_p, min_p) and one `torch.multinomial` draw from the row's own generator. A row seeded with s therefore draws
    what `generate(..., generator=torch.Generator().manual_seed(s))` draws for that prompt alone."""

    def __init__(self, params, prompt_ids: list[int], device: torch.device):
        self.greedy = params.greedy
        self.penalty = check_repetition_penalty(params.repetition_penalty)
        self.prompt_ids = prompt_ids
        self.seen: torch.Tensor | None = None  # (1, V) bool, made on the first call
        self.warpers = None
        self.generator = None
        if not self.greedy:
            self.warpers = sampling_warpers(params.temperature, None, params.top_p, params.min_p or None)
            seed = params.seed if params.seed is not None else random.getrandbits(63)
            self.generator = torch.Generator(device=device).manual_seed(seed)

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: such rows are chosen together in one batched argmax."""
        return self.greedy and self.penalty == 1.0

    def __call__(self, logits: torch.Tensor) -> int:
        """logits (1, V) of this row -> the chosen token id."""
        logits = logits.float()
        if self.penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
                self.seen[0, torch.tensor(self.prompt_ids, device=logits.device)] = True
            logits = penalise_repeats(logits, self.seen, self.penalty)
        if self.greedy:
            token = int(logits.argmax(-1))
        else:
            probs = self.warpers(None, logits).softmax(-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        if self.seen is not None:
            self.seen[0, token] = True
        return token


def choose_tokens(samplers: list[RowSampler], logits: torch.Tensor, special: list[int] | None = None) -> torch.Tensor:
    """logits (B, V) -> one token per row (B,): one argmax over the batch (exact for plain greedy rows: fp32 is an
    exact upcast), then the `special` rows (default: every row that is not plain greedy) row by row with their own
    penalty history and generator."""
    if special is None:
        special = [i for i, s in enumerate(samplers) if not s.plain_greedy]
    tokens = logits.argmax(-1)  # (B,)
    for i in special:
        tokens[i] = samplers[i](logits[i : i + 1])
    return tokens
