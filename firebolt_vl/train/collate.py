"""Conversation records -> training tensors: token ids through the processor's chat template, labels, pixels.

Glossary
    B rows in a batch   T tokens (after right padding)   S processor image side   N_img rows that hold an image

A record is `{"image": PIL | path | None, "conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}`
(the `firebolt_vl.data` readers' layout). The conversation is rendered with the processor's chat template (ChatML for
LFM2: `<|startoftext|><|im_start|>user\\n<image>\\nQ<|im_end|>\\n<|im_start|>assistant\\nA<|im_end|>\\n`), the
`<image>` slot expanded to the model's image_seq_length tokens, exactly as at inference.

Labels (loss_on="assistant"): IGNORE_INDEX (-100) everywhere except each assistant turn's content and its end token
(`<|im_end|>`); the newline after it, the role headers, the prompt and the padding are ignored. Multi-turn
conversations supervise every assistant turn. loss_on="all" supervises every real token, prompt included (the
authors' released code; it also trained on padding, which we do not).

Boundaries are found in character space: the template is rendered for each prefix of the conversation (with and
without the generation prompt) and tokens are assigned by their character offsets, so any prefix-stable template
works and BPE merges across a boundary cannot shift the labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ..processing import IMAGE_TOKEN, ImageLoadError, load_image

IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class SkipExample(ValueError):
    """A record that yields no usable training example (the reason is counted, the record is skipped)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Encoded:
    """One training sequence (numpy so that data-loader workers hand it over cheaply)."""

    input_ids: np.ndarray  # (T,) int64
    labels: np.ndarray  # (T,) int64, IGNORE_INDEX where no loss is taken
    prompt_len: int  # tokens before the first assistant answer (the prompt the "pooled" output mode averages)
    pixels: Optional[np.ndarray]  # (3, S, S) uint8, resized, not normalised; None for text-only records
    truncated: bool = False
    index: int = -1  # entry position in the source's (sharded) stream

    @property
    def n_targets(self) -> int:
        """Supervised next-token targets: labels[1:] that are not ignored."""
        return int((self.labels[1:] != IGNORE_INDEX).sum())


def to_messages(conversations: list[dict]) -> list[dict]:
    """Reader turns {"from", "value"} (or {"role", "content"}) -> chat-template messages {"role", "content"}."""
    messages = []
    for turn in conversations:
        role = turn.get("from", turn.get("role"))
        if role not in ROLES:
            raise SkipExample("bad_turn", f"unknown role {role!r}")
        content = turn.get("value", turn.get("content"))
        if not isinstance(content, str):
            raise SkipExample("bad_turn", "turn content is not text")
        messages.append({"role": ROLES[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise SkipExample("no_answer", "conversation has no assistant turn")
    return messages


def _end_token_ids(tokenizer) -> set[int]:
    ids = set()
    for tok in (tokenizer.eos_token, "<|im_end|>", "<|endoftext|>"):
        if tok is not None:
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                ids.add(tid)
    return ids


def encode_conversation(
    processor,
    conversations: list[dict],
    image=None,
    max_length: Optional[int] = None,
    loss_on: str = "assistant",
) -> Encoded:
    """Tokenise one conversation for training. Raises SkipExample (with a `.reason`) when nothing can be learned
    from it: no assistant turn, image placeholder mismatch, or no target token left after truncation."""
    tokenizer = processor.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("training needs a fast tokenizer (character offsets locate the assistant turns)")
    messages = to_messages(conversations)
    n_slots = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if image is not None and n_slots != 1:
        raise SkipExample("image_slots", f"a record with an image needs exactly one {IMAGE_TOKEN}, found {n_slots}")
    if image is None and n_slots:
        raise SkipExample("image_slots", f"{IMAGE_TOKEN} in a record without an image")
    expanded = IMAGE_TOKEN * processor.image_seq_length
    messages = [{"role": m["role"], "content": m["content"].replace(IMAGE_TOKEN, expanded)} for m in messages]

    text = processor.chat_prompt(messages, add_generation_prompt=False)
    spans = []  # (start, end) character span of each assistant answer + its end marker
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(processor.chat_prompt(messages[:i], add_generation_prompt=True))
        upto = processor.chat_prompt(messages[: i + 1], add_generation_prompt=False)
        if not text.startswith(upto) or start > len(upto):
            raise ValueError("the tokenizer's chat template is not prefix-stable; cannot locate the assistant turns")
        spans.append((start, len(upto)))

    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)  # (T,)
    starts = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64)  # (T,) first character of each token
    if loss_on == "all":
        labels = ids.copy()
    elif loss_on == "assistant":
        labels = np.full_like(ids, IGNORE_INDEX)
        end_ids = _end_token_ids(tokenizer)
        for a, b in spans:
            inside = np.nonzero((starts >= a) & (starts < b))[0]  # token positions of this answer turn
            if inside.size == 0:
                continue
            ends = [k for k in inside if ids[k] in end_ids]
            last = ends[-1] if ends else inside[-1]  # keep the end token, drop what follows it (the newline)
            keep = inside[inside <= last]
            labels[keep] = ids[keep]
    else:
        raise ValueError(f"loss_on must be 'assistant' or 'all', got {loss_on!r}")
    prompt_len = int((starts < spans[0][0]).sum())

    truncated = max_length is not None and ids.shape[0] > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
        if image is not None:
            image_id = processor.image_token_id
            if int((ids == image_id).sum()) != processor.image_seq_length:
                raise SkipExample("too_long", f"max_length {max_length} cuts through the image tokens")
    if not (labels[1:] != IGNORE_INDEX).any():
        raise SkipExample("too_long" if truncated else "no_target", "no answer token within max_length")
    pixels = None
    if image is not None:
        try:
            pixels = image_to_uint8(processor, image)
        except ImageLoadError as e:  # missing / corrupt / too large: counted and skipped, never fatal
            raise SkipExample("bad_image", str(e)) from None
    return Encoded(ids, labels, min(prompt_len, ids.shape[0]), pixels, truncated)


def image_to_uint8(processor, image) -> np.ndarray:
    """PIL / path / bytes -> (3, S, S) uint8, resized like `processor.preprocess_image` (normalised at collate)."""
    image = load_image(image, processor.max_image_pixels)
    image = image.resize((processor.image_size, processor.image_size), Image.BICUBIC)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))  # (3, S, S)


def normalize_pixels(processor, pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) uint8 -> float32 normalised, bit-identical to `processor.preprocess_image`."""
    mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels.to(torch.float32) / 255.0 - mean) / std


def collate(examples: list[Encoded], processor) -> dict:
    """Right-pad a list of Encoded into a batch.

    Returns input_ids (B, T), attention_mask (B, T), labels (B, T) (IGNORE_INDEX on padding), pool_mask (B, T)
    (1 on each row's prompt: the "pooled" output mode averages over it), pixel_values (N_img, 3, S, S) float in row
    order when any row has an image, and the counts n_targets / n_tokens / n_rows.
    """
    pad = processor.tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    B, T = len(examples), max(e.input_ids.shape[0] for e in examples)
    input_ids = torch.full((B, T), pad, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    pool_mask = torch.zeros((B, T), dtype=torch.long)
    for b, e in enumerate(examples):
        n = e.input_ids.shape[0]
        input_ids[b, :n] = torch.from_numpy(e.input_ids)
        labels[b, :n] = torch.from_numpy(e.labels)
        attention_mask[b, :n] = 1
        pool_mask[b, : e.prompt_len] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "pool_mask": pool_mask}
    images = [e.pixels for e in examples if e.pixels is not None]
    if images:
        batch["pixel_values"] = normalize_pixels(processor, torch.from_numpy(np.stack(images)))
    batch["n_targets"] = int((labels[:, 1:] != IGNORE_INDEX).sum())
    batch["n_tokens"] = int(attention_mask.sum())
    batch["n_rows"] = B
    return batch


__all__ = ["IGNORE_INDEX", "Encoded", "SkipExample", "encode_conversation", "collate", "image_to_uint8",
           "normalize_pixels", "to_messages"]
