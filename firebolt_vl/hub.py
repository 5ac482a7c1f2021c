"""Saving and loading a whole Firebolt-VL directory: config.json + model.safetensors + tokenizer + processor files.

Saving is atomic: everything is written into a temporary sibling directory that then replaces the target, so an
interrupted save never leaves a half-written model where a good one was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .configuration import MODEL_TYPES
from .processing import PROCESSOR_FILE, FireboltProcessor


class ModelDirError(ValueError):
    """A directory that does not hold a usable Firebolt-VL model; the message says what is missing or wrong."""


def save_model_dir(model, processor: FireboltProcessor | None, directory, extra_files: dict[str, str] | None = None,
                   quantize: str | None = None) -> Path:
    """Write model (+ processor) into `directory` atomically; returns the path. `quantize` ('int8' | 'int4'):
    record that the model is to be quantized at load (quantization.json; the weights stay in floating point)."""
    from .quantize import QUANT_FILE, check_mode, is_quantized, record

    if is_quantized(model):
        raise ModelDirError("a quantized model is saved as its floating-point weights + the mode: save the model "
                            "before quantize_model, with save_model_dir(..., quantize=MODE)")
    if check_mode(quantize) != "none":
        extra_files = {**(extra_files or {}), QUANT_FILE: record(quantize)}
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def check_model_dir(directory) -> Path:
    """Raise ModelDirError naming what a model directory lacks."""
    directory = Path(directory)
    if not directory.exists():
        raise ModelDirError(f"model directory not found: {directory}")
    if not directory.is_dir():
        raise ModelDirError(f"not a directory: {directory}")
    if (directory / "adapter_config.json").is_file() and not (directory / "config.json").is_file():
        from .adapters import read_meta  # a LoRA adapter directory: its recorded base must be a model directory

        base = read_meta(directory).get("base_model")
        if not base:
            raise ModelDirError(f"{directory} is a LoRA adapter without a recorded base: pass --model BASE "
                                f"--adapter {directory}")
        check_model_dir(base)
        return directory
    config = directory / "config.json"
    if not config.is_file():
        raise ModelDirError(f"{directory} is not a Firebolt-VL model: config.json is missing")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{config} is not valid JSON: {e}") from None
    if model_type == "fireboltlm":  # the authors' release
        from .release import refusal

        raise ModelDirError(refusal(directory))
    if model_type not in MODEL_TYPES:
        raise ModelDirError(f"{directory} holds a {model_type!r} model, not a Firebolt-VL ('firebolt_vl') model")
    if not any(directory.glob("*.safetensors")):
        raise ModelDirError(f"{directory} has no weights (model.safetensors is missing)")
    if not (directory / PROCESSOR_FILE).is_file():
        raise ModelDirError(f"{directory} has no {PROCESSOR_FILE}: save the processor with the model")
    return directory


def load_model_dir(directory, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, adapter=None,
                   quantize: str | None = None):
    """(model in eval mode on device, processor) from a saved directory, with clear errors for bad directories.
    `adapter`: a LoRA adapter directory (firebolt_vl.adapters) applied on top, checked against the base weights;
    directory may then be None (the adapter's recorded base).
    `quantize`: 'none' | 'int8' | 'int4' weight-only quantization of the decoder and the CMM (firebolt_vl.quantize);
    None: as the directory records (quantization.json), else none."""
    from .quantize import check_mode, quantize_model, read_mode

    mode = check_mode(quantize) if quantize is not None else None
    model, processor = _load_model_dir(directory, device, dtype, adapter)
    if mode is None:
        mode = read_mode(directory) if directory is not None and Path(directory).is_dir() else "none"
    return quantize_model(model, mode), processor


def _load_model_dir(directory, device, dtype, adapter):
    from .modeling import FireboltForConditionalGeneration

    if adapter is None and directory is not None and (Path(directory) / "adapter_config.json").is_file() and not (
            Path(directory) / "config.json").is_file():
        directory, adapter = None, directory  # an adapter directory given as the model: its base + the adapter
    if adapter is not None:
        from .adapters import load_model_with_adapter

        return load_model_with_adapter(directory, adapter, device, dtype)
    directory = check_model_dir(directory)
    try:
        model = FireboltForConditionalGeneration.from_pretrained(directory, dtype=dtype)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelDirError(f"cannot load the model in {directory}: {str(e).splitlines()[0]}") from None
    processor = FireboltProcessor.from_pretrained(directory)
    return model.to(device).eval(), processor


def resolve_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


THREADS_HELP = ("torch CPU threads (default on CPU: the cores not busy with other work, measured at start; on 2 cores "
                "2 threads collapse beside one busy core: docs/bench/README.md, 'Threads under load')")


def set_threads(device: torch.device, threads: int | None, cpu_default=None) -> None:
    """A command's torch intra-op threads: `threads` if given, else on CPU `cpu_default()` (default: the cores other
    work leaves free, `bench.load.default_threads`)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    elif device.type == "cpu":
        if cpu_default is None:
            from .bench.load import default_threads as cpu_default

        torch.set_num_threads(cpu_default())


def parse_dtype(name: str | None) -> torch.dtype | None:
    table = {None: None, "auto": None, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}: use fp32, bf16 or fp16")
    return table[name]
