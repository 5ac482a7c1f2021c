"""`firebolt <command>`: one CLI whose commands are plain functions.

Each command's arguments mirror its function's signature. Errors a user can fix (missing files, bad images, bad
model directories, wrong settings) end with a one-line message and exit status 2; set FIREBOLT_VL_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command -> (module, function, help). The module defines `function(**kwargs)` and `add_<function>_arguments(parser)`;
# heavy imports live inside the functions, so building the parser stays cheap.
COMMANDS = {
    "demo": ("firebolt_vl.demo.cli", "demo", "offline end-to-end demo: synthetic data, tiny pretraining, two stages, evaluation"),
    "build": ("firebolt_vl.commands", "build", "assemble a Firebolt-VL model from a vision and a language checkpoint"),
    "generate": ("firebolt_vl.commands", "generate", "answer a prompt about an image"),
    "bench": ("firebolt_vl.bench", "bench", "benchmark Firebolt-VL against its peers (TTFT, decode tok/s, memory, bandwidth bound)"),
    "train": ("firebolt_vl.train.cli", "train", "train through the stages of a recipe (single process, torchrun or accelerate)"),
    "serve": ("firebolt_vl.serve.cli", "serve", "serve the model over an OpenAI-compatible HTTP API"),
    "chat": ("firebolt_vl.serve.cli", "chat", "chat with the model about an image in the terminal"),
    "explain": ("firebolt_vl.serve.cli", "explain", "draw which image grids each prompt word drew on (CMM weights)"),
    "eval": ("firebolt_vl.eval.cli", "eval_command", "evaluate a model on a benchmark (resumable; predictions + scores)"),
    "score": ("firebolt_vl.eval.cli", "score_command", "score a predictions file against a benchmark"),
    "merge": ("firebolt_vl.adapters", "merge", "merge a LoRA adapter into its base model (an ordinary model directory)"),
    "convert-release": ("firebolt_vl.release", "convert_release_command",
                        "convert the authors' released checkpoint (huyquoctrinh/FireboltVL) into a firebolt-vl model"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="firebolt-vl", description="Firebolt-VL: run, train, evaluate, measure and serve.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, function, help_text) in COMMANDS.items():
        add_arguments = getattr(importlib.import_module(module), f"add_{function}_arguments")
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars are noise on the command line
    module, function, _ = COMMANDS[args.pop("command")]
    fn = getattr(importlib.import_module(module), function)
    try:
        result = fn(**args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # user-facing errors: one line, no traceback
        from .errors import is_user_error

        if os.environ.get("FIREBOLT_VL_DEBUG") or not is_user_error(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
