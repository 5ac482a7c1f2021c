"""Training: recipes (YAML -> dataclasses), conversation collation, parameter groups, the trainer.

Public API (imported lazily, so `firebolt-vl --help` stays fast):

    load_recipe(name_or_path, overrides=None) -> Recipe          packaged `paper` / `demo`, or a YAML file
    run_recipe(recipe, output_dir, model=None, stages=None, resume=False) -> {stage: metrics}
    run_stage(model, processor, stage_cfg, output_dir, train_data=None, val_data=None, runtime=None, seed=0,
              resume=False, metrics_path=None) -> metrics dict
    evaluate(model, processor, sources, ...) -> {"val_loss", "val_ppl", "val_tokens", "val_samples"}
    read_metrics(path) -> [rows of metrics.jsonl]
    encode_conversation(processor, conversations, image, max_length, loss_on) -> Encoded;  collate(examples, processor)
    param_groups(model, lrs, weight_decay) / apply_trainable(model, lrs)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Recipe": "recipe", "StageConfig": "recipe", "StageData": "recipe", "DataSource": "recipe", "ModuleLR": "recipe",
    "OptimConfig": "recipe", "RuntimeConfig": "recipe", "ModelSpec": "recipe", "RecipeError": "recipe",
    "load_recipe": "recipe", "recipe_from_dict": "recipe", "packaged_recipes": "recipe",
    "encode_conversation": "collate", "collate": "collate", "Encoded": "collate", "SkipExample": "collate",
    "IGNORE_INDEX": "collate",
    "param_groups": "optim", "apply_trainable": "optim", "build_optimizer": "optim", "build_scheduler": "optim",
    "lr_factor": "optim",
    "ListSource": "data", "open_source": "data",
    "run_stage": "trainer", "run_recipe": "trainer", "evaluate": "trainer", "read_metrics": "trainer",
    "load_start_model": "trainer", "stage_done": "trainer",
    "latest_checkpoint": "checkpoint", "load_model_weights": "checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
