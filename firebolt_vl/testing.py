"""Helpers for tests and fuzzing: crafted image files, the train command in a subprocess (and killed mid-run)."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

from PIL import Image


SQUARE_COLORS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def write_vqav2_official(root: Path, questions: list[dict], annotations: list[dict]) -> None:
    """VQAv2's official val2014 question and annotation files in `root` (images are the caller's)."""
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(
        {"data_subtype": "val2014", "questions": questions}))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))


def vqa_annotation(qid: int, answers: list[str], atype: str = "other") -> dict:
    """One VQAv2 annotation: the ten human `answers` of question (and image) `qid`."""
    return {"question_id": qid, "image_id": qid, "answer_type": atype, "question_type": "what",
            "multiple_choice_answer": answers[0],
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}


def square_image(folder: Path, color: str) -> str:
    """`img/<color>.png` under `folder` (a 40 x 32 image of one of SQUARE_COLORS, written once); the relative path."""
    path = folder / "img" / f"{color}.png"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 32), SQUARE_COLORS[color]).save(path)
    return f"img/{color}.png"


def write_color_squares(folder: Path, n: int, name: str = "train.jsonl") -> Path:
    """n LLaVA-JSONL records with small PNG images: 'What color is the square?' -> 'The square is <colour>.'"""
    names = list(SQUARE_COLORS)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "w") as f:
        for i in range(n):
            color = names[i % len(names)]
            rec = {"id": f"r{i}", "image": square_image(folder, color),
                   "conversations": [{"from": "human", "value": "<image>\nWhat color is the square?"},
                                     {"from": "gpt", "value": f"The square is {color}."}]}
            f.write(json.dumps(rec) + "\n")
    return folder / name


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_with_header_size(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (with a valid CRC) but holds a 1x1 image: a decompression-bomb probe."""
    data = bytearray(png_bytes(Image.new("RGB", (1, 1))))
    ihdr = data.index(b"IHDR")
    struct.pack_into(">II", data, ihdr + 4, width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    struct.pack_into(">I", data, ihdr + 17, crc)
    return bytes(data)


def truncated_jpeg(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="JPEG")
    data = buf.getvalue()
    return data[: len(data) // 2]


def run_train_cli(args: list[str], env_extra: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m firebolt_vl.cli train ARGS` in a subprocess (one thread, tracebacks on): what a SIGKILL can stop."""
    repo = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": repo, "OMP_NUM_THREADS": "1", "FIREBOLT_VL_DEBUG": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "firebolt_vl.cli", "train", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def train_killed_and_resumed(workdir, recipe: dict, model_dir, data_root, kill_after_step: int, after_kill=None):
    """The train command on `recipe` three times: uninterrupted into workdir/ref, SIGKILLed after `kill_after_step`
    optimizer steps into workdir/run (`after_kill(run_dir)` may inspect what it left), then `--resume` into
    workdir/run. Asserts each exit status; returns the three CompletedProcess (ref, killed, resumed)."""
    workdir = Path(workdir)
    path = workdir / "kill.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    common = ["--recipe", str(path), "--model", str(model_dir), "--data-root", str(data_root)]
    ref = run_train_cli(common + ["--output", str(workdir / "ref")])
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = run_train_cli(common + ["--output", str(workdir / "run")],
                           {"FIREBOLT_TRAIN_FAULT": f"kill_after_step={kill_after_step}"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    if after_kill is not None:
        after_kill(workdir / "run")
    resumed = run_train_cli(common + ["--output", str(workdir / "run"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    return ref, killed, resumed
