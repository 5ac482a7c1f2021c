"""Image loading and the FireboltProcessor (image processor + tokenizer + chat template).

Images of any PIL mode (1, L, LA, P, RGBA, CMYK, I;16, I, F) become RGB after EXIF orientation; transparency is
composited on white. Images above `max_image_pixels` are refused from the header alone, before decoding; truncated or
corrupt files are refused with the reason. The processor resizes to image_size x image_size and normalises; the
model cuts the views (global + tiles) on the device.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_TOKEN = "<image>"
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
PROCESSOR_FILE = "processor_config.json"
CHATML_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageLoadError(ValueError):
    """An image that cannot be used: missing, unreadable, corrupt or too large. The message names the problem."""


def load_image(source, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Path, bytes, file object or PIL image -> RGB PIL image, EXIF-oriented, checked against max_pixels."""
    name = str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
            raise ImageLoadError(f"image file not found: {source}")
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        try:
            image = Image.open(fp)
        except UnidentifiedImageError:
            raise ImageLoadError(f"not a readable image: {name}") from None
        except Image.DecompressionBombError as e:
            raise ImageLoadError(f"image {name} is too large: {e}") from None
        except OSError as e:
            raise ImageLoadError(f"corrupt or truncated image {name}: {e}") from None
    w, h = image.size
    if w < 1 or h < 1:
        raise ImageLoadError(f"image {name} has no pixels ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageLoadError(f"image {name} is too large: {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"image {name} refused: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"corrupt or truncated image {name}: {e}") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. High bit-depth images are scaled to 8 bits; alpha is composited on white."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or (mode == "I" and arr.max() > 255) else 255.0
        if mode == "F" and arr.max() <= 1.0:
            top = 1.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        image = Image.fromarray(arr, mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, rgba)
    return image.convert("RGB")


def ensure_image_token(tokenizer) -> int:
    """Add `<image>` as a special token when the tokenizer lacks it; returns its id."""
    vocab = tokenizer.get_vocab()
    if IMAGE_TOKEN not in vocab:
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


class FireboltProcessor:
    """Turns (prompt, image) pairs into model inputs: ChatML prompt with `<image>`, left-padded ids, pixel values.

    Saved as `processor_config.json` plus the tokenizer files, next to the model in one directory.
    """

    def __init__(
        self,
        tokenizer,
        image_size: int = 256,
        image_seq_length: int = 1,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        max_prompt_tokens: int | None = None,
        padding_side: str = "left",
        resample: int = 3,
    ):
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.image_seq_length = int(image_seq_length)
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        self.max_image_pixels = max_image_pixels
        self.max_prompt_tokens = max_prompt_tokens
        self.padding_side = padding_side
        self.resample = int(resample)  # PIL filter of the resize (3 = BICUBIC, SigLIP's); from the checkpoint
        self.image_token_id = ensure_image_token(tokenizer)

    @classmethod
    def from_config(cls, config, tokenizer, **kwargs) -> "FireboltProcessor":
        return cls(tokenizer, image_size=config.image_size, image_seq_length=config.image_seq_length, **kwargs)

    # ---- persistence ----
    def to_dict(self) -> dict:
        keys = ("image_size", "image_seq_length", "image_mean", "image_std", "max_image_pixels", "max_prompt_tokens", "padding_side",
                "resample")
        return {"processor_class": type(self).__name__, **{k: getattr(self, k) for k in keys}}

    def save_pretrained(self, save_directory) -> None:
        os.makedirs(save_directory, exist_ok=True)
        self.tokenizer.save_pretrained(save_directory)
        atomic_write_text(Path(save_directory) / PROCESSOR_FILE, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_pretrained(cls, directory, **overrides) -> "FireboltProcessor":
        from transformers import AutoTokenizer

        path = Path(directory) / PROCESSOR_FILE
        if not path.is_file():
            raise FileNotFoundError(f"not a Firebolt-VL directory: {path} is missing")
        settings = json.loads(path.read_text())
        settings.pop("processor_class", None)
        settings.update(overrides)
        return cls(AutoTokenizer.from_pretrained(directory), **settings)

    # ---- images ----
    def preprocess_image(self, image) -> torch.Tensor:
        """PIL image / path / bytes -> (3, S, S) float tensor, normalised."""
        image = load_image(image, self.max_image_pixels)
        image = image.resize((self.image_size, self.image_size), Image.Resampling(self.resample))
        arr = np.asarray(image, dtype=np.float32) / 255.0  # (S, S, 3)
        arr = (arr - np.array(self.image_mean, dtype=np.float32)) / np.array(self.image_std, dtype=np.float32)
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (3, S, S)

    # ---- text ----
    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """OpenAI/HF style messages (content a string or a list of {"type": "text"|"image"...} parts) -> prompt text."""
        flat = []
        for m in messages:
            content = m.get("content", "")
            if isinstance(content, list):
                parts = []
                for part in content:
                    kind = part.get("type")
                    if kind in ("image", "image_url"):
                        parts.append(IMAGE_TOKEN + "\n")
                    elif kind == "text":
                        parts.append(part.get("text", ""))
                content = "".join(parts)
            flat.append({"role": m["role"], "content": content})
        return self.tokenizer.apply_chat_template(flat, tokenize=False, add_generation_prompt=add_generation_prompt)

    def build_prompt(self, prompt: str, with_image: bool) -> str:
        """One user turn (the image first when present) in the chat template, ready for generation."""
        if not prompt or not prompt.strip():
            raise ValueError("empty prompt")
        content = (IMAGE_TOKEN + "\n" if with_image and IMAGE_TOKEN not in prompt else "") + prompt
        return self.chat_prompt([{"role": "user", "content": content}])

    def __call__(self, text, images=None, padding_side: str | None = None, return_tensors: str = "pt") -> dict:
        """text: str or list of prompt strings (already templated, `<image>` marking the image slot);
        images: None, one image, or a list aligned with text (None for text-only rows).
        Returns input_ids (B, T), attention_mask (B, T) and pixel_values (N_img, 3, S, S) when any image is given."""
        texts = [text] if isinstance(text, str) else list(text)
        if images is None:
            images = [None] * len(texts)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) != len(texts):
            raise ValueError("images must be a list aligned with the prompts (None for text-only prompts)")
        expanded, pixels = [], []
        for t, img in zip(texts, images):
            n = t.count(IMAGE_TOKEN)
            if n > 1:
                raise ValueError(f"a prompt may hold at most one {IMAGE_TOKEN}, found {n}")
            if n == 1 and img is None:
                raise ValueError(f"the prompt has an {IMAGE_TOKEN} slot but no image was given")
            if img is not None:
                if n == 0:
                    raise ValueError(f"an image was given but the prompt has no {IMAGE_TOKEN} slot")
                pixels.append(self.preprocess_image(img))
            expanded.append(t.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.image_seq_length))
        enc = self.tokenizer(
            expanded,
            padding=True,
            padding_side=padding_side or self.padding_side,
            return_tensors=return_tensors,
            add_special_tokens=False,
        )
        lengths = enc["attention_mask"].sum(-1)
        if int(lengths.min()) == 0:
            raise ValueError("empty prompt: it has no tokens")
        if self.max_prompt_tokens is not None and int(lengths.max()) > self.max_prompt_tokens:
            raise ValueError(f"prompt has {int(lengths.max())} tokens, over the limit of {self.max_prompt_tokens}")
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if pixels:
            out["pixel_values"] = torch.stack(pixels)
        return out

    def batch_decode(self, ids, **kwargs) -> list[str]:
        kwargs.setdefault("skip_special_tokens", True)
        return self.tokenizer.batch_decode(ids, **kwargs)

    def decode(self, ids, **kwargs) -> str:
        kwargs.setdefault("skip_special_tokens", True)
        return self.tokenizer.decode(ids, **kwargs)


def atomic_write_text(path, text: str) -> None:
    """Write a file via a temp file in the same folder and os.replace: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
