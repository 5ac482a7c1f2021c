"""`firebolt-vl train`: run a recipe's stages, single-process or under torchrun / accelerate launch.

    firebolt-vl train --recipe demo --model tiny --data-root data/synth --output runs/demo
    torchrun --nproc-per-node 2 -m firebolt_vl.cli train --recipe paper --data-root /data --output runs/paper --stage align
    firebolt-vl train --recipe paper --stage instruct --model runs/paper/align/final \\
        --data /data/llava-cot/train.jsonl /data/mmpr/mmpr_cot.jsonl --output runs/paper
    firebolt-vl train ... --resume                       # continue after a crash (finished stages are skipped)
    firebolt-vl train ... --set stages.align.lr.cmm=1e-3 --set runtime.num_workers=8
"""

from __future__ import annotations


def add_train_arguments(p):
    p.add_argument("--recipe", default="demo", help="packaged recipe (demo, paper) or a recipe .yaml file")
    p.add_argument("--output", required=True, help="run directory: <stage>/checkpoints, best, final, metrics.jsonl")
    p.add_argument("--model", default=None,
                   help="starting model: a Firebolt-VL directory or `tiny`; default: the recipe's model section (or "
                        "the final model of the previous stage found in --output)")
    p.add_argument("--stage", action="append", default=None,
                   help="run only this stage (repeat or comma-separate for several); default: all, in order")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --output from its last checkpoint; finished stages are skipped")
    p.add_argument("--data", nargs="+", action="extend", default=None, metavar="PATH",
                   help="training data of the selected stage, replacing the recipe's (json/jsonl/tar/brace pattern)")
    p.add_argument("--val-data", nargs="+", action="extend", default=None, metavar="PATH",
                   help="validation data of the selected stage, replacing the recipe's")
    p.add_argument("--data-root", default=None, help="folder that relative data paths are resolved against")
    p.add_argument("--image-root", default=None, help="folder of the images, for sources that do not set image_root")
    p.add_argument("--set", dest="overrides", action="append", default=None, metavar="KEY=VALUE",
                   help="override any recipe field, e.g. stages.align.epochs=1, runtime.precision=fp32")
    p.add_argument("--max-steps", type=int, default=None, help="cap every selected stage at N optimizer steps")
    p.add_argument("--device", default=None, help="auto | cpu | cuda (default: the recipe's runtime.device)")
    p.add_argument("--num-workers", type=int, default=None, help="data-loader workers per source")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe as YAML and exit")


def build_recipe(recipe: str, overrides=None, stage=None, data=None, val_data=None, max_steps=None, device=None,
                 num_workers=None, seed=None, no_progress=False):
    """The recipe after --set overrides and the command line's shortcuts; returns (Recipe, selected stage names)."""
    import yaml

    from .recipe import RecipeError, apply_override, recipe_from_dict, recipe_path

    path = recipe_path(recipe)
    raw = yaml.safe_load(path.read_text()) or {}
    for assignment in overrides or []:
        apply_override(raw, assignment)
    names = [s.get("name") for s in raw.get("stages") or [] if isinstance(s, dict)]
    selected = None
    if stage:
        selected = [n.strip() for item in stage for n in item.split(",") if n.strip()]
        unknown = [n for n in selected if n not in names]
        if unknown:
            raise RecipeError(f"--stage {unknown[0]}: no such stage in {path.name} (stages: {names})")
    targets = selected or names
    for flag, key, value in (("--data", "train", data), ("--val-data", "val", val_data)):
        if value is None:
            continue
        if len(targets) != 1:
            raise RecipeError(f"{flag} applies to one stage, but {len(targets)} are selected ({targets}); add --stage "
                              f"NAME, or use --set stages.NAME.data.{key}=[...]")
        apply_override(raw, f"stages.{targets[0]}.data.{key}=[]")
        stage_raw = next(s for s in raw["stages"] if s.get("name") == targets[0])
        stage_raw["data"][key] = list(value)
    for name in targets:
        if max_steps is not None:
            apply_override(raw, f"stages.{name}.max_steps={int(max_steps)}")
    runtime = raw.setdefault("runtime", {}) or {}
    raw["runtime"] = runtime
    if device is not None:
        runtime["device"] = device
    if num_workers is not None:
        runtime["num_workers"] = num_workers
    if no_progress:
        runtime["progress"] = False
    if seed is not None:
        raw["seed"] = seed
    return recipe_from_dict(raw, where=str(path)), selected


def train(
    output: str,
    recipe: str = "demo",
    model: str | None = None,
    stage: list[str] | None = None,
    resume: bool = False,
    data: list[str] | None = None,
    val_data: list[str] | None = None,
    data_root: str | None = None,
    image_root: str | None = None,
    overrides: list[str] | None = None,
    max_steps: int | None = None,
    device: str | None = None,
    num_workers: int | None = None,
    seed: int | None = None,
    no_progress: bool = False,
    print_recipe: bool = False,
) -> int:
    """Train a Firebolt-VL model through the stages of a recipe (see `firebolt-vl train --help`)."""
    import json

    cfg, selected = build_recipe(recipe, overrides, stage, data, val_data, max_steps, device, num_workers, seed,
                                 no_progress)
    if print_recipe:
        print(cfg.to_yaml(), end="")
        return 0
    from .trainer import run_recipe

    results = run_recipe(cfg, output, model=model, stages=selected, resume=resume, data_root=data_root,
                         image_root=image_root)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else int(__import__("os").environ.get(
        "RANK", 0))
    if rank == 0:
        keys = ("steps", "samples", "train_loss", "best_val_ppl", "samples_per_s", "peak_memory_mb", "final_dir")
        print(json.dumps({name: {k: r.get(k) for k in keys} for name, r in results.items()}, default=str))
    return 0
