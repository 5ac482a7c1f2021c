"""`firebolt-vl demo`: the offline end-to-end demo (synthetic benchmark -> tiny pretrained components -> two training
stages -> per-family evaluation next to a blind and a prepend control -> report folder)."""

from __future__ import annotations


def add_demo_arguments(p):
    p.add_argument("--output", default="runs/demo", help="report folder (default: runs/demo)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true",
                      help="the full demo: 3000 training images, long enough training for Firebolt-VL to use the image "
                           "(+23 points over the blind control; 14-31 min on 2 cores). Default: the small demo "
                           "(500 images, within 10 min; the pipeline and its table, no gain yet at that size)")
    size.add_argument("--quick", action="store_true",
                      help="smoke run of the whole pipeline on a few images in well under a minute (no accuracy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None,
                   help="processes side by side, one per model (default 3; quick 1)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per model process (default 1)")
    p.add_argument("--pretrain-threads", type=int, default=None,
                   help="torch CPU threads of the two pretraining jobs, run one after the other (default 2; use 1 "
                        "on a machine that is busy with other work)")
    p.add_argument("--n-train", type=int, default=None, help="training images (default 500; full 3000; quick 48)")
    p.add_argument("--n-val", type=int, default=None, help="validation images (default 100; full 200)")
    p.add_argument("--n-test", type=int, default=None, help="test images (default 200; full 400)")
    p.add_argument("--vision-epochs", type=float, default=None, help="SigLIP pretraining epochs over the view pairs")
    p.add_argument("--stage1-epochs", type=float, default=None, help="stage 1 (caption warm-up) epochs")
    p.add_argument("--stage2-epochs", type=float, default=None, help="stage 2 (instruction tuning) epochs")
    p.add_argument("--models", default=None,
                   help="comma-separated subset of firebolt,blind,prepend (default: all three)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def demo(
    output: str = "runs/demo",
    quick: bool = False,
    full: bool = False,
    seed: int = 0,
    workers: int | None = None,
    threads: int = 1,
    pretrain_threads: int | None = None,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    vision_epochs: float | None = None,
    stage1_epochs: float | None = None,
    stage2_epochs: float | None = None,
    models: str | None = None,
    no_progress: bool = False,
) -> int:
    """Run the demo into `output`; prints progress, the per-family table and the timings. Returns 0."""
    import os
    from dataclasses import replace

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from .pipeline import MODELS, DemoConfig, run_demo

    if quick and full:
        raise ValueError("--quick and --full exclude each other")
    cfg = DemoConfig.quick(seed=seed) if quick else DemoConfig(seed=seed) if full else DemoConfig.small(seed=seed)
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    overrides = {"threads": threads}
    for key, value in (("workers", workers), ("pretrain_threads", pretrain_threads), ("n_train", n_train),
                       ("n_val", n_val), ("n_test", n_test)):
        if value is not None:
            if value < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
            overrides[key] = value
    if vision_epochs is not None:
        if vision_epochs <= 0:
            raise ValueError(f"--vision-epochs must be > 0, got {vision_epochs}")
        overrides["vision"] = replace(cfg.vision, epochs=vision_epochs, max_steps=None)
    for key, value in (("stage1", stage1_epochs), ("stage2", stage2_epochs)):
        if value is not None:
            if value <= 0:
                raise ValueError(f"--{key}-epochs must be > 0, got {value}")
            overrides[key] = replace(getattr(cfg, key), epochs=value)
    if models is not None:
        chosen = tuple(m.strip() for m in models.split(",") if m.strip())
        unknown = sorted(set(chosen) - set(MODELS))
        if unknown or not chosen:
            raise ValueError(f"--models: choose from {', '.join(MODELS)}, got {models!r}")
        overrides["models"] = tuple(m for m in MODELS if m in chosen)
    cfg = replace(cfg, **overrides)
    run_demo(output, cfg, progress=not no_progress)
    return 0
