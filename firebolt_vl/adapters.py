"""LoRA adapters through `peft`: add them for training, save / load them as PEFT adapter directories, merge them.

The adapters are injected in place (`peft.inject_adapter_in_model`): the model stays a
FireboltForConditionalGeneration, so its cached O(1)-per-token decoding, the trainer's per-module parameter groups
and every caller keep working; each targeted nn.Linear becomes a `peft` LoRA layer (W x + B A x * alpha / r).

Adapter directory (a standard PEFT adapter: `PeftModel.from_pretrained(base, DIR)` reads it too):
    adapter_config.json          peft's LoraConfig (r, lora_alpha, lora_dropout, target_modules = exact module names,
                                 base_model_name_or_path = the base model directory)
    adapter_model.safetensors    the LoRA weights, PEFT key names (`base_model.model.<module>.lora_A.weight`)
    firebolt_adapter.json        {"base_model": absolute path of the base directory, "fingerprint": shapes and
                                 sha256 of every targeted base weight}: checked when the adapter is loaded

    add_lora(model, spec, modules)                      inject fresh adapters (modules: "vision" / "cmm" / "language")
    save_adapter(model, directory, base_dir)            write an adapter directory atomically
    load_model_with_adapter(base_dir, adapter_dir)      (model with adapters, processor), base checked
    merge_lora(model)                                   fold the adapters into the weights: a plain model again
    adapters_disabled(model)                            context: the base model (DPO's reference), no copy
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .train.recipe import LORA_TARGETS as DEFAULT_TARGETS

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "firebolt_adapter.json"
PEFT_PREFIX = "base_model.model."
MODULE_PREFIXES = {"vision": ("vision",), "cmm": ("cmm", "projector"), "language": ("language_model",)}


class AdapterError(ValueError):
    """An adapter that cannot be added or used; the message says which module, hash or shape is at fault."""


# ---------------------------------------------------------------------------------------------- targets
def resolve_targets(model: nn.Module, targets, modules) -> list[str]:
    """Exact names of the nn.Linear modules inside `modules` (vision / cmm / language) whose name is a target or ends
    with "." + target. Raises AdapterError naming every target that matches nothing."""
    prefixes = tuple(p for m in modules for p in MODULE_PREFIXES[m])
    linear = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear) and n.split(".")[0] in prefixes]
    names, unmatched = set(), []
    for t in targets:
        hit = [n for n in linear if n == t or n.endswith("." + t)]
        if not hit:
            unmatched.append(t)
        names.update(hit)
    if unmatched:
        raise AdapterError(f"LoRA target(s) {unmatched} match no nn.Linear module in {'/'.join(modules) or 'nothing'} "
                           f"(trained modules = lr > 0); linear layers there end with: "
                           f"{sorted({n.rsplit('.', 1)[-1] for n in linear})[:24]}")
    return sorted(names)


def lora_config(spec, names: list[str], base_dir=None):
    from peft import LoraConfig

    return LoraConfig(r=int(spec.r), lora_alpha=float(spec.alpha), lora_dropout=float(spec.dropout),
                      target_modules="^(?:" + "|".join(re.escape(n) for n in names) + ")$", bias="none",
                      base_model_name_or_path=str(base_dir) if base_dir else None)


def add_lora(model: nn.Module, spec, modules, base_dir=None, seed: int | None = None):
    """Inject fresh LoRA adapters (A: peft's Kaiming init, B: 0, so the model is unchanged) into the targeted linear
    layers of `modules`; freezes every other parameter. Returns the peft LoraConfig."""
    from peft import inject_adapter_in_model

    if getattr(model, "peft_config", None):
        raise AdapterError("the model already holds LoRA adapters; merge them first (firebolt-vl merge)")
    names = resolve_targets(model, spec.target_modules, modules)
    cfg = lora_config(spec, names, base_dir)
    if seed is not None:
        torch.manual_seed(seed)  # the adapters' init depends on the stage seed only
    inject_adapter_in_model(cfg, model)
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    return cfg


def has_lora(model: nn.Module) -> bool:
    return bool(getattr(model, "peft_config", None))


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if ".lora_" in n]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base model: every LoRA layer passes its input through the frozen base layer only."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(m, m.disable_adapters) for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m, _ in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m, was_disabled in layers:  # nested uses restore the state they found
            m.enable_adapters(not was_disabled)


# ---------------------------------------------------------------------------------------------- base fingerprint
def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise AdapterError(f"{model_dir}: no *.safetensors weights to check the adapter's base against")
    return files


def base_fingerprint(model_dir, names: list[str]) -> dict:
    """{"modules": {name: {"shape", "sha256"}}} of the base weights (`<name>.weight`) the adapters sit on, read from
    the base directory's files (so the dtype a model is later loaded in does not matter)."""
    from safetensors import safe_open

    want = {f"{n}.weight": n for n in names}
    out: dict = {}
    for f in _weight_files(Path(model_dir)):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key in want:
                    t = st.get_tensor(key).contiguous()
                    digest = hashlib.sha256(t.view(torch.uint8).reshape(-1).numpy().tobytes()).hexdigest()
                    out[want[key]] = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                                      "sha256": digest[:16]}
    missing = [n for n in names if n not in out]
    if missing:
        raise AdapterError(f"{model_dir}: the adapter's target modules are missing from the model: {missing[:5]}")
    return {"modules": out}


def check_base(adapter_dir, base_dir) -> None:
    """Raise AdapterError when the base directory's targeted weights differ from those the adapter was trained on:
    shapes first (names the modules and both shapes), then content hashes (names the modules and both hashes)."""
    meta = read_meta(adapter_dir)
    saved = meta.get("fingerprint", {}).get("modules", {})
    if not saved:
        return  # a PEFT adapter from elsewhere: no fingerprint to compare
    now = base_fingerprint(base_dir, sorted(saved))["modules"]
    shapes = [f"{n}: adapter base {saved[n]['shape']}, model {now[n]['shape']}" for n in sorted(saved)
              if saved[n]["shape"] != now[n]["shape"]]
    if shapes:
        raise AdapterError(f"adapter {adapter_dir} was trained on a different base model than {base_dir}: "
                           f"{len(shapes)} module shape(s) differ, e.g. {'; '.join(shapes[:3])}")
    hashes = [f"{n}: sha256 {saved[n]['sha256']} (adapter base) vs {now[n]['sha256']} (model)" for n in sorted(saved)
              if saved[n]["sha256"] != now[n]["sha256"]]
    if hashes:
        raise AdapterError(f"adapter {adapter_dir} was trained on different base weights than {base_dir} (adapter "
                           f"base: {meta.get('base_model')}): {len(hashes)} of {len(saved)} targeted weights differ, "
                           f"e.g. {'; '.join(hashes[:2])}")


# ---------------------------------------------------------------------------------------------- save / load
def is_adapter_dir(path) -> bool:
    return path is not None and (Path(path) / ADAPTER_CONFIG).is_file()


def read_meta(adapter_dir) -> dict:
    path = Path(adapter_dir) / ADAPTER_META
    return json.loads(path.read_text()) if path.is_file() else {}


def adapter_state_dict(model: nn.Module) -> dict:
    """The LoRA weights under PEFT's saved key names."""
    from peft import get_peft_model_state_dict

    return {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def write_adapter_files(model: nn.Module, directory, base_dir, fingerprint: dict | None = None,
                        extra: dict | None = None, state_dict: dict | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors + firebolt_adapter.json (+ extra JSON files) into directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    cfg = model.peft_config["default"]
    cfg.base_model_name_or_path = str(Path(base_dir).resolve())
    cfg.save_pretrained(str(directory))
    save_file(state_dict if state_dict is not None else adapter_state_dict(model), str(directory / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    if fingerprint is None:
        fingerprint = base_fingerprint(base_dir, adapter_names(cfg))
    meta = {"base_model": str(Path(base_dir).resolve()), "fingerprint": fingerprint}
    (directory / ADAPTER_META).write_text(json.dumps(meta, indent=2))
    for name, obj in (extra or {}).items():
        (directory / name).write_text(json.dumps(obj, indent=2, default=str))


def save_adapter(model: nn.Module, directory, base_dir, fingerprint: dict | None = None,
                 extra: dict | None = None) -> Path:
    """Write an adapter directory atomically (temp sibling + rename); returns its path."""
    from .train.checkpoint import replace_dir

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".tmp-{directory.name}-"))
    try:
        write_adapter_files(model, tmp, base_dir, fingerprint, extra)
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def adapter_names(cfg) -> list[str]:
    """Module names of a LoraConfig written by add_lora (an anchored alternation), or its list of names."""
    t = cfg.target_modules
    if isinstance(t, str):
        m = re.fullmatch(r"\^\(\?:(.*)\)\$", t)
        if m is None:
            return []
        return [re.sub(r"\\(.)", r"\1", n) for n in m.group(1).split("|")]
    return sorted(t)


def load_adapter_config(adapter_dir):
    from peft import LoraConfig

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterError(f"adapter directory not found: {adapter_dir}")
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise AdapterError(f"{adapter_dir} is not a PEFT adapter directory: {ADAPTER_CONFIG} is missing")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{adapter_dir} has no adapter weights ({ADAPTER_WEIGHTS} is missing)")
    cfg = LoraConfig.from_pretrained(str(adapter_dir))
    if cfg.peft_type.value != "LORA":
        raise AdapterError(f"{adapter_dir} holds a {cfg.peft_type.value} adapter; only LoRA is supported")
    return cfg


def load_adapter_weights(model: nn.Module, adapter_dir) -> None:
    """Copy an adapter directory's LoRA weights into a model that already has the same adapters (exact copy)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    sd = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    sd = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in sd.items()}
    result = set_peft_model_state_dict(model, sd)
    own = {n for n, _ in lora_parameters(model)}
    missing = [k for k in result.missing_keys if k in own]
    if result.unexpected_keys or missing:
        raise AdapterError(f"{adapter_dir}: adapter weights do not fit the model (unexpected "
                           f"{list(result.unexpected_keys)[:3]}, missing {missing[:3]})")


def attach_adapter(model: nn.Module, adapter_dir) -> nn.Module:
    """Inject the adapters of `adapter_dir` into `model` (in place) and load their weights."""
    from peft import inject_adapter_in_model

    cfg = load_adapter_config(adapter_dir)
    names = {n for n, _ in model.named_modules()}
    wanted = adapter_names(cfg)
    absent = [n for n in wanted if n not in names]
    if absent:
        raise AdapterError(f"adapter {adapter_dir} targets modules this model does not have: {absent[:3]}")
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    cfg.inference_mode = not model.training
    inject_adapter_in_model(cfg, model)
    try:
        load_adapter_weights(model, adapter_dir)
    except RuntimeError as e:  # size mismatch between the adapter's and the model's layers
        raise AdapterError(f"adapter {adapter_dir} does not fit the model: {str(e).splitlines()[-1].strip()}") from None
    for _, p in lora_parameters(model):
        p.data = p.data.to(device=device, dtype=dtype)
    return model


def load_model_with_adapter(base_dir, adapter_dir=None, device="cpu", dtype=None, check: bool = True):
    """(model in eval mode with the adapter's LoRA layers, processor). base_dir None: the adapter's recorded base.
    The base's targeted weights are checked against the adapter's fingerprint (AdapterError names the differences)."""
    from .hub import load_model_dir

    if adapter_dir is None:
        return load_model_dir(base_dir, device, dtype)
    load_adapter_config(adapter_dir)
    if base_dir is None:
        base_dir = read_meta(adapter_dir).get("base_model")
        if not base_dir:
            raise AdapterError(f"{adapter_dir} records no base model; pass --model BASE")
    if check:
        check_base(adapter_dir, base_dir)
    model, processor = load_model_dir(base_dir, "cpu", dtype)
    attach_adapter(model, adapter_dir)
    return model.to(device).eval(), processor


# ---------------------------------------------------------------------------------------------- merge
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its base weight (W += B A * alpha / r) and put the plain layer back: an ordinary
    model with the same outputs (in place; returns it)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in targets:
        layer.merge()
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], layer.get_base_layer())
    model.__dict__.pop("peft_config", None)
    return model


def add_merge_arguments(p):
    p.add_argument("--model", default=None, help="base Firebolt-VL model directory (default: the adapter's recorded base)")
    p.add_argument("--adapter", required=True, help="LoRA adapter directory (a stage's final/ or a checkpoint)")
    p.add_argument("--output", required=True, help="directory to write the merged model into")
    p.add_argument("--no-check", action="store_true", help="skip the base-weights check (hashes of targeted weights)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")


def merge(adapter: str, output: str, model: str | None = None, no_check: bool = False, overwrite: bool = False) -> int:
    """Merge a LoRA adapter into its base model and write an ordinary model directory (atomically; an existing
    --output is replaced only with overwrite=True)."""
    from .hub import save_model_dir

    if Path(output).exists() and not overwrite:
        raise FileExistsError(f"{output} exists: pass --overwrite to replace it")
    net, processor = load_model_with_adapter(model, adapter, "cpu", torch.float32, check=not no_check)
    merge_lora(net)
    save_model_dir(net, processor, output)
    print(f"merged {adapter} into {model or read_meta(adapter).get('base_model')} -> {output}")
    return 0


__all__ = ["AdapterError", "DEFAULT_TARGETS", "add_lora", "resolve_targets", "save_adapter", "write_adapter_files",
           "load_adapter_weights", "attach_adapter", "load_model_with_adapter", "merge_lora", "adapters_disabled",
           "check_base", "base_fingerprint", "is_adapter_dir", "read_meta", "adapter_state_dict", "has_lora",
           "lora_parameters", "merge"]
