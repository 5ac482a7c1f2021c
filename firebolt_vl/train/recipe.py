"""Training recipes: typed dataclasses that mirror the YAML files in `firebolt_vl/recipes/`.

    Recipe
      name, seed, data_root
      model     ModelSpec      how to build the starting model when none is given (preset, or vision + language ids)
      runtime   RuntimeConfig  device, precision, DDP/FSDP, data-loader workers, progress bars
      stages    [StageConfig]  run in order; each one declares
        data      StageData    train / val sources (DataSource: path, kind, image_root, weight, num_samples)
        lr        ModuleLR     learning rate per module: vision / cmm / language (0 = frozen, requires_grad False)
        optim     OptimConfig  AdamW betas/eps/weight decay, grad clip, schedule (cosine/linear/constant), warmup
        epochs / max_steps, batch_size (global, per optimizer step), micro_batch_size / grad_accum, max_length,
        loss_on (assistant|all), eval/save/log cadence, shuffle window, gradient checkpointing
        lora      LoraSpec     optional: train LoRA adapters (peft) in the modules with lr > 0 instead of the weights
        objective sft (next-token cross-entropy) | dpo (preference pairs, `beta`, `rpo_alpha`; reference = the
                  stage's start)

Every dataclass validates itself in `__post_init__`; `from_dict` names the exact key of any unknown or mistyped
entry (for example `stages[1].optim.lrr: unknown key`). YAML 1.1 reads `5e-4` as a string: float fields accept
numeric strings, so recipes may write either `5e-4` or `5.0e-4`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

MODULES = ("vision", "cmm", "language")
LOSS_ON = ("assistant", "all")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("bf16", "fp32")
STRATEGIES = ("auto", "ddp", "fsdp")
OBJECTIVES = ("sft", "dpo")
# LFM2: attention q/k/v/out_proj, short-conv in_proj/out_proj, SwiGLU MLP w1/w2/w3; CMM: q/k/v_proj, FiLM in/out
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3", "film_in", "film_out")
RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the offending key."""


# ---------------------------------------------------------------------------------------------- dataclasses
@dataclass
class DataSource:
    """One dataset file / shard set, read with `firebolt_vl.data.open_dataset`.

    path: a .json/.jsonl file, a .tar shard, a brace pattern of shards (`cc3m/{00000..00331}.tar`), a directory of
        shards, or a list of shard paths. Relative paths are resolved against the data root (--data-root).
    kind: auto | conversation (llava/sharegpt) | caption | webdataset | preference (mmpr).
    image_root: folder the records' image paths are relative to (default: the file's folder; relative to data root).
    weight: mixing weight against the stage's other sources (default: the source's size, i.e. uniform over samples).
    num_samples: size hint for sources without a length (webdataset shards), used for the LR schedule only.
    """

    path: Union[str, list[str]]
    kind: str = "auto"
    image_root: Optional[str] = None
    weight: Optional[float] = None
    num_samples: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.path, list) and not self.path or self.path == "":
            raise RecipeError("path: empty")
        if self.weight is not None and not self.weight > 0:
            raise RecipeError(f"weight: must be > 0, got {self.weight}")
        if self.num_samples is not None and self.num_samples < 1:
            raise RecipeError(f"num_samples: must be >= 1, got {self.num_samples}")

    def resolved(self, data_root: Optional[str]) -> "DataSource":
        """A copy with relative paths joined to data_root."""

        def join(p):
            return p if data_root is None or os.path.isabs(p) else os.path.join(data_root, p)

        path = [join(p) for p in self.path] if isinstance(self.path, list) else join(self.path)
        root = join(self.image_root) if self.image_root else None
        return dataclasses.replace(self, path=path, image_root=root)


@dataclass
class StageData:
    train: list[DataSource] = field(default_factory=list)
    val: list[DataSource] = field(default_factory=list)


@dataclass
class ModuleLR:
    """Peak learning rate per module; 0 freezes the module (requires_grad False, not in the optimizer).
    `cmm` is the fusion module: model.cmm (CMM) or model.projector (prepend / cross-attention baselines)."""

    vision: float = 0.0
    cmm: float = 0.0
    language: float = 0.0

    def __post_init__(self):
        for name in MODULES:
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise RecipeError(f"{name}: learning rate must be a finite number >= 0, got {v}")

    def as_dict(self) -> dict[str, float]:
        return {m: float(getattr(self, m)) for m in MODULES}


@dataclass
class OptimConfig:
    """AdamW + schedule. Parameters tagged by the SSM code (`p._optim`) use the tag's weight_decay / lr; biases,
    norms and every 1-D parameter get no weight decay."""

    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    schedule: str = "cosine"
    warmup_steps: Optional[int] = None  # overrides warmup_ratio
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0  # final LR of the cosine / linear decay, as a fraction of the peak

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise RecipeError(f"betas: need two numbers in [0, 1), got {list(self.betas)}")
        if self.schedule not in SCHEDULES:
            raise RecipeError(f"schedule: must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise RecipeError("weight_decay and grad_clip must be >= 0 and eps > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise RecipeError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise RecipeError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise RecipeError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class LoraSpec:
    """LoRA adapters (peft) for a stage: every nn.Linear whose name ends with one of target_modules, inside the
    modules whose learning rate is > 0 (the vision tower stays frozen unless lr.vision > 0), gets W + B A * alpha / r;
    only A and B train (at that module's lr). A target that matches no layer is an error."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def __post_init__(self):
        if self.r < 1:
            raise RecipeError(f"r: must be >= 1, got {self.r}")
        if not self.alpha > 0:
            raise RecipeError(f"alpha: must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise RecipeError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise RecipeError(f"target_modules: need a list of module names, got {self.target_modules!r}")


@dataclass
class StageConfig:
    """One training stage.

    batch_size is global: samples per optimizer step over all processes. Each process runs micro-batches of
    micro_batch_size and accumulates grad_accum of them: batch_size = micro_batch_size * grad_accum * world_size.
    Give either (or neither: no accumulation, micro = batch_size / world_size).
    """

    name: str
    data: StageData = field(default_factory=StageData)
    lr: ModuleLR = field(default_factory=ModuleLR)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: float = 1.0
    max_steps: Optional[int] = None  # stop after this many optimizer steps (and size the schedule by it)
    batch_size: int = 8
    micro_batch_size: Optional[int] = None
    grad_accum: Optional[int] = None
    max_length: int = 2048  # tokens per sequence; longer ones are truncated (counted warning)
    loss_on: str = "assistant"  # assistant: answer tokens + their end token; all: every token (the released code)
    eval_every: int = 0  # validation perplexity every N steps (0 = only at the end of each epoch)
    save_every: int = 0  # checkpoint every N steps (0 = only at the end of each epoch)
    keep_last: int = 2  # step checkpoints kept (the best-by-validation model is kept separately)
    log_every: int = 10  # metrics.jsonl / progress-bar cadence in steps
    val_batch_size: Optional[int] = None  # default: micro batch size
    val_max_samples: Optional[int] = None  # cap on validation records (default: all)
    shuffle: bool = True
    shuffle_buffer: int = 1024  # records per shuffle window (entries are shuffled within windows, windows in turn)
    gradient_checkpointing: bool = False
    lora: Optional[LoraSpec] = None  # train LoRA adapters instead of the weights (`lora: {}` for the defaults)
    objective: str = "sft"  # sft | dpo (needs preference pairs: a rejected answer per record)
    beta: float = 0.1  # DPO: strength of the pull towards the reference (the stage's starting model)
    rpo_alpha: float = 0.0  # DPO: + rpo_alpha x the chosen answer's mean token NLL per pair (RPO; 0 = plain DPO)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.replace("-", "").replace("_", "").isalnum():
            raise RecipeError(f"name: use letters, digits, '-' and '_' only, got {self.name!r}")
        if not self.epochs > 0:
            raise RecipeError(f"epochs: must be > 0, got {self.epochs}")
        checks = {
            "max_steps": (self.max_steps, 1), "batch_size": (self.batch_size, 1),
            "micro_batch_size": (self.micro_batch_size, 1), "grad_accum": (self.grad_accum, 1),
            "max_length": (self.max_length, 8), "eval_every": (self.eval_every, 0), "save_every": (self.save_every, 0),
            "keep_last": (self.keep_last, 1), "log_every": (self.log_every, 1),
            "val_batch_size": (self.val_batch_size, 1), "val_max_samples": (self.val_max_samples, 1),
            "shuffle_buffer": (self.shuffle_buffer, 1),
        }
        for key, (value, low) in checks.items():
            if value is not None and value < low:
                raise RecipeError(f"{key}: must be >= {low}, got {value}")
        if self.loss_on not in LOSS_ON:
            raise RecipeError(f"loss_on: must be one of {LOSS_ON}, got {self.loss_on!r}")
        if self.objective not in OBJECTIVES:
            raise RecipeError(f"objective: must be one of {OBJECTIVES}, got {self.objective!r}")
        if not self.beta > 0:
            raise RecipeError(f"beta: must be > 0, got {self.beta}")
        if not self.rpo_alpha >= 0:
            raise RecipeError(f"rpo_alpha: must be >= 0, got {self.rpo_alpha}")
        if not any(v > 0 for v in self.lr.as_dict().values()):
            raise RecipeError("lr: every module has learning rate 0, the stage would train nothing")

    def batch_layout(self, world_size: int) -> tuple[int, int]:
        """(micro_batch_size, grad_accum) per process for `world_size` processes; raises if the batch does not split."""
        per_rank, rest = divmod(self.batch_size, world_size)
        if rest or per_rank == 0:
            raise RecipeError(f"stage {self.name}: batch_size {self.batch_size} is not a multiple of the "
                              f"{world_size} processes")
        micro, accum = self.micro_batch_size, self.grad_accum
        if micro is None and accum is None:
            micro, accum = per_rank, 1
        elif micro is None:
            micro = per_rank // accum
        elif accum is None:
            accum = per_rank // micro
        if micro < 1 or accum < 1 or micro * accum != per_rank:
            raise RecipeError(
                f"stage {self.name}: batch_size {self.batch_size} != micro_batch_size {self.micro_batch_size} x "
                f"grad_accum {self.grad_accum} x {world_size} processes"
            )
        return micro, accum


@dataclass
class ModelSpec:
    """The starting model when the command line gives none: `preset: tiny` (random tiny checkpoints), or `vision` +
    `language` checkpoints (local dirs or hub ids) assembled with a fresh fusion module. `config` holds
    FireboltConfig settings (fusion_type, ssm_type, cmm_*, grid ...)."""

    preset: Optional[str] = None
    vision: Optional[str] = None
    language: Optional[str] = None
    config: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.preset is not None and self.preset != "tiny":
            raise RecipeError(f"preset: only 'tiny' is known, got {self.preset!r}")
        if self.preset and (self.vision or self.language):
            raise RecipeError("give either preset or vision + language, not both")
        if bool(self.vision) != bool(self.language):
            raise RecipeError("vision and language go together")


@dataclass
class RuntimeConfig:
    """Where and how the stages run. `strategy`: auto (DDP when launched with several processes), ddp, or fsdp (full
    sharding of the model, FSDP2). bf16 autocasts on CUDA (weights and optimizer state stay fp32); on CPU it runs
    fp32."""

    device: str = "auto"
    precision: str = "bf16"
    strategy: str = "auto"
    num_workers: int = 0  # data-loader worker processes per source (decoding, tokenising); 0 = in the main process
    find_unused_parameters: bool = True  # DDP: batches without images leave the CMM's image projections unused
    progress: bool = True

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise RecipeError(f"precision: must be one of {PRECISIONS}, got {self.precision!r}")
        if self.strategy not in STRATEGIES:
            raise RecipeError(f"strategy: must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.num_workers < 0:
            raise RecipeError(f"num_workers: must be >= 0, got {self.num_workers}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise RecipeError(f"device: auto, cpu or cuda[:N], got {self.device!r}")


@dataclass
class Recipe:
    name: str
    stages: list[StageConfig]
    seed: int = 0
    data_root: Optional[str] = None  # base folder of relative data paths (the command line's --data-root wins)
    model: ModelSpec = field(default_factory=ModelSpec)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self):
        if not self.stages:
            raise RecipeError("stages: a recipe needs at least one stage")
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise RecipeError(f"stages: duplicate stage names {dupes}")

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise RecipeError(f"no stage named {name!r} in recipe {self.name!r}; stages: {[s.name for s in self.stages]}")

    def to_dict(self) -> dict:
        return to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------- dict <-> dataclass
def to_dict(obj) -> Any:
    """Dataclass tree -> plain YAML-safe data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(value, tp, where: str):
    """Check / convert `value` to type `tp` (the subset of typing used by the recipe dataclasses)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise RecipeError(f"{where}: must not be empty")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except RecipeError as e:
                errors.append(str(e).split(": ", 1)[-1])
        raise RecipeError(f"{where}: {'; '.join(errors)}")
    if dataclasses.is_dataclass(tp):
        if tp is DataSource and isinstance(value, (str, os.PathLike)):
            value = {"path": os.fspath(value)}
        return from_dict(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if item is DataSource and not isinstance(value, list):
            value = [value]  # a single source may be written without a list
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise RecipeError(f"{where}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 as a string
            try:
                value = float(value.replace("_", ""))
            except ValueError:
                raise RecipeError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        if tp is int:
            if float(value) != int(value):
                raise RecipeError(f"{where}: expected a whole number, got {value!r}")
            return int(value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"{where}: unsupported recipe field type {_type_name(tp)}")  # a bug in the dataclasses


def from_dict(cls, data, where: str = ""):
    """Build dataclass `cls` from a mapping, recursively; unknown keys and wrong types raise RecipeError naming the
    key path, e.g. `stages[0].optim.lrr`."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise RecipeError(f"{prefix}{unknown[0]}: unknown key (valid keys: {', '.join(fields)})")
    kwargs = {k: _convert(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecipeError(f"{prefix}{missing[0]}: required key is missing")
    try:
        return cls(**kwargs)
    except RecipeError as e:
        raise RecipeError(f"{where or cls.__name__}: {e}" if where else str(e)) from None


# ---------------------------------------------------------------------------------------------- loading
def packaged_recipes() -> list[str]:
    """Names of the recipes shipped in firebolt_vl/recipes/."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path:
    """A packaged recipe name (`paper`, `demo`) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or os.sep in str(name_or_path):
        if not path.is_file():
            raise FileNotFoundError(f"recipe file not found: {path}")
        return path
    packaged = RECIPE_DIR / f"{name_or_path}.yaml"
    if not packaged.is_file():
        raise RecipeError(f"unknown recipe {name_or_path!r}: use one of {packaged_recipes()} or a path to a .yaml file")
    return packaged


def apply_override(data: dict, assignment: str) -> None:
    """Apply `dotted.key=value` (value parsed as YAML) to the raw recipe dict in place. Stages are addressed by
    name or index: `stages.align.lr.cmm=1e-3`, `stages.0.epochs=1`, `runtime.num_workers=4`."""
    if "=" not in assignment:
        raise RecipeError(f"override {assignment!r}: expected KEY=VALUE")
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            idx = next((j for j, s in enumerate(node) if isinstance(s, dict) and s.get("name") == part), None)
            if idx is None and part.isdigit() and int(part) < len(node):
                idx = int(part)
            if idx is None:
                names = [s.get("name") for s in node if isinstance(s, dict)]
                raise RecipeError(f"override {key}: no element {part!r} in {'.'.join(parts[:i])} (names: {names})")
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise RecipeError(f"override {key}: {where} is not a mapping or list")


def recipe_from_dict(data: dict, overrides: Optional[list[str]] = None, where: str = "recipe") -> Recipe:
    data = copy.deepcopy(data)
    for assignment in overrides or []:
        apply_override(data, assignment)
    try:
        return from_dict(Recipe, data)
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None


def load_recipe(name_or_path: str, overrides: Optional[list[str]] = None) -> Recipe:
    """Load a packaged recipe (`paper`, `demo`) or a YAML file, apply `KEY=VALUE` overrides, validate."""
    path = recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    return recipe_from_dict(data or {}, overrides, where=str(path))


__all__ = [
    "DataSource", "StageData", "ModuleLR", "OptimConfig", "LoraSpec", "StageConfig", "ModelSpec", "RuntimeConfig",
    "Recipe",
    "RecipeError", "load_recipe", "recipe_from_dict", "apply_override", "from_dict", "to_dict", "packaged_recipes",
    "MODULES",
]
