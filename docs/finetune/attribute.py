"""LoRA SFT and LoRA DPO on one question family of the demo's synthetic data (issue 18's measurement).

    python docs/finetune/attribute.py --demo runs/demo-full --work runs/finetune-attribute

`--demo` is a finished `firebolt-vl demo` run (its `model/` and `data/`; `--full` trains a model that reads the
image). The script
  1. writes the family's records (`attr_<split>.jsonl`) and preference pairs (`pairs_<split>.jsonl`: the
     chosen answer is the record's, the rejected one a wrong answer of the same kind, colour for colour, shape for
     shape),
  2. trains through the real CLI (`firebolt-vl train`, `firebolt-vl merge`): LoRA SFT on the family; LoRA DPO with an
     RPO term on the pairs, from the demo model and from the SFT result; plain DPO as the ablation,
  3. measures every model on held-out records, the validation split (100 records, the one training validates on)
     and the test split (200, used for nothing else): the family's loss, greedy exact-match accuracy, and the
     policy's own preference (share of pairs with log p(chosen) > log p(rejected), answer tokens only),
and prints one JSON line per model plus the table (also written to `<work>/results.json`).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

FAMILY = "attribute"
COLORS = {"blue", "green", "orange", "purple", "red", "yellow"}
COMMON = {"seed": 0, "runtime": {"device": "cpu", "precision": "fp32", "num_workers": 0, "progress": False}}
OPTIM = {"weight_decay": 0.0, "grad_clip": 1.0, "schedule": "cosine", "warmup_ratio": 0.05}


def write_subsets(data: Path, work: Path) -> None:
    for split in ("train", "val", "test"):
        recs = [json.loads(line) for line in (data / f"{split}.jsonl").read_text().splitlines() if line.strip()]
        fam = [r for r in recs if r.get("family") == FAMILY]
        answers = sorted({r["conversations"][-1]["value"] for r in fam})
        rng = random.Random(0)
        with open(work / f"attr_{split}.jsonl", "w") as fa, open(work / f"pairs_{split}.jsonl", "w") as fp:
            for r in fam:
                fa.write(json.dumps(r) + "\n")
                good = r["conversations"][-1]["value"]
                wrong = [a for a in answers if a != good and (a in COLORS) == (good in COLORS)]
                fp.write(json.dumps({"id": r["id"], "image": r["image"], "question": r["conversations"][0]["value"],
                                     "chosen": good, "rejected": rng.choice(wrong)}) + "\n")


def stage(name: str, data_name: str, data: Path, work: Path, lr: float, steps: int, **extra) -> dict:
    src = lambda split: [{"path": str(work / f"{data_name}_{split}.jsonl"), "image_root": str(data)}]  # noqa: E731
    return {"name": name, "data": {"train": src("train"), "val": src("val")},
            "lr": {"vision": 0.0, "cmm": lr, "language": lr}, "max_steps": steps, "batch_size": 16,
            "max_length": 128, "optim": OPTIM, "eval_every": steps // 2, "save_every": steps // 2,
            "log_every": 10, **extra}


def train(work: Path, run: str, model: Path, st: dict) -> tuple[Path, float]:
    recipe = work / f"{run}.json"
    recipe.write_text(json.dumps({"name": run, **COMMON, "stages": [st]}, indent=1))  # JSON is valid YAML
    t = time.perf_counter()
    with open(work / f"{run}.log", "w") as log:
        subprocess.run(["firebolt-vl", "train", "--recipe", str(recipe), "--model", str(model), "--output",
                        str(work / run), "--no-progress"], check=True, stdout=log, stderr=subprocess.STDOUT)
    return work / run / st["name"] / "final", time.perf_counter() - t


@torch.no_grad()
def measure(model, proc, data: Path, work: Path, split: str) -> dict:
    from firebolt_vl.processing import load_image
    from firebolt_vl.train.data import open_source
    from firebolt_vl.train.dpo import PairEncodeFn, collate_pairs, sequence_logps
    from firebolt_vl.train.recipe import DataSource
    from firebolt_vl.train.trainer import evaluate

    val = DataSource(str(work / f"attr_{split}.jsonl"), image_root=str(data))
    loss = evaluate(model, proc, [val], max_length=128, batch_size=16)["val_loss"]
    recs = [json.loads(line) for line in (work / f"attr_{split}.jsonl").read_text().splitlines() if line.strip()]
    correct = 0
    for i in range(0, len(recs), 16):
        chunk = recs[i:i + 16]
        prompts = [proc.build_prompt(r["conversations"][0]["value"].replace("<image>", "").strip(), True)
                   for r in chunk]
        inputs = proc(prompts, images=[load_image(data / r["image"]) for r in chunk])
        out = model.generate(**inputs, max_new_tokens=6)[:, inputs["input_ids"].shape[1]:]
        correct += sum(proc.decode(o, skip_special_tokens=True).strip().lower().rstrip(".")
                       == r["conversations"][-1]["value"].lower() for r, o in zip(chunk, out))
    enc = PairEncodeFn(proc, 128)
    pairs = [enc(r) for r in open_source(DataSource(str(work / f"pairs_{split}.jsonl"), image_root=str(data)))]
    wins = 0
    for i in range(0, len(pairs), 16):
        batch = collate_pairs(pairs[i:i + 16], proc)
        lp = sequence_logps(model, batch)
        wins += int((lp[: batch["n_pairs"]] > lp[batch["n_pairs"]:]).sum())
    return {f"{split}_loss": round(loss, 4), f"{split}_accuracy": round(100 * correct / len(recs), 1),
            f"{split}_preference": round(100 * wins / len(pairs), 1), f"{split}_n": len(recs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", required=True, help="a finished demo run (model/ and data/)")
    ap.add_argument("--work", required=True, help="folder for the subsets, recipes, runs and results.json")
    ap.add_argument("--sft-steps", type=int, default=80)
    ap.add_argument("--dpo-steps", type=int, default=80)
    ap.add_argument("--dpo-lr", type=float, default=2e-3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    demo, work = Path(args.demo), Path(args.work)
    base, data = demo / "model", demo / "data"
    work.mkdir(parents=True, exist_ok=True)
    write_subsets(data, work)
    lora = {"r": 8, "alpha": 16, "dropout": 0.0}
    dpo = dict(objective="dpo", beta=0.1, lora=lora)
    rows = []

    def record(name, model_dir, adapter=None, seconds=None):
        from firebolt_vl.hub import load_model_dir

        model, proc = load_model_dir(model_dir, dtype=torch.float32, adapter=adapter)  # once for both splits
        row = {"model": name, **measure(model, proc, data, work, "val"),
               **measure(model, proc, data, work, "test"), "train_s": seconds and round(seconds)}
        print(json.dumps(row), flush=True)
        rows.append(row)

    record("demo model", base)
    sft, t = train(work, "sft", base, stage("sft", "attr", data, work, 3e-3, args.sft_steps,
                                             lora={**lora, "dropout": 0.05}))
    record("+ LoRA SFT", base, sft, t)
    dpo_stage = lambda **kw: stage("dpo", "pairs", data, work, args.dpo_lr, args.dpo_steps, **dpo, **kw)  # noqa: E731
    rpo, t = train(work, "rpo", base, dpo_stage(rpo_alpha=1.0))
    record("+ LoRA DPO (rpo_alpha 1)", base, rpo, t)
    merged = work / "sft_merged"
    subprocess.run(["firebolt-vl", "merge", "--model", str(base), "--adapter", str(sft), "--output", str(merged),
                    "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    rpo_sft, t = train(work, "rpo_sft", merged, dpo_stage(rpo_alpha=1.0))
    record("+ LoRA SFT, then LoRA DPO (rpo_alpha 1)", merged, rpo_sft, t)
    plain, t = train(work, "dpo_plain", base, dpo_stage())
    record("+ LoRA DPO (plain, ablation)", base, plain, t)
    (work / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n| model | loss val / test | accuracy % val / test | own preference % val / test | train s |\n"
          "|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r['val_' + k]} / {r['test_' + k]}" for k in ("loss", "accuracy", "preference")]
        print(f"| {r['model']} | {' | '.join(cells)} | {r['train_s'] or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
