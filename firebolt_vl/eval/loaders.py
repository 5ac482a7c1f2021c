"""Benchmark data loaders: every benchmark becomes a list of :class:`EvalItem`.

Supported layouts (``data_path`` is a folder, or a single file where noted):

=========== ===================================================================================================
benchmark   layouts
=========== ===================================================================================================
vqav2       ``lmms-lab/VQAv2`` parquet (splits ``validation``, ``testdev``, ``test``); official JSON:
            ``v2_OpenEnded_mscoco_<subtype>_questions.json`` + ``v2_mscoco_<subtype>_annotations.json`` with
            images ``<subtype>/COCO_<subtype>_%012d.jpg`` (splits ``val2014`` (default), ``test-dev2015``, ...)
pope        ``lmms-lab/POPE`` parquet (default config ``test`` split with a ``category`` column, or the ``Full``
            config files ``adversarial-*.parquet`` ...); official JSONL ``coco_pope_<split>.json`` lines
            ``{"question_id", "image", "text", "label"}`` + an image folder. ``split``: random / popular /
            adversarial, None = all three
mme         ``lmms-lab/MME`` parquet; official folders (``<subtask>/questions_answers_YN/*.txt`` +
            ``<subtask>/images/``, or ``<subtask>/<name>.txt`` beside ``<name>.jpg``; lines ``question\\tanswer``),
            or eval-tool files ``<subtask>.txt`` with ``image\\tquestion\\tanswer`` lines (images in ``<subtask>/``)
ai2d        ``lmms-lab/ai2d`` parquet (``test``); ``question_id`` ``"row-<n>"`` (n = lmms-eval's 0-based ``doc_id``)
mmmu        ``lmms-lab/MMMU`` parquet (``validation`` default, ``dev``, ``test``)
scienceqa   official ``problems.json`` + ``pid_splits.json`` (ids: the pids); ``lmms-lab/ScienceQA`` parquet (ids
            ``"row-<n>"``); the ``ScienceQA-IMG`` config folder is preferred when present, and rows
            without an image are dropped (ScienceQA-IMG is the image subset)
mmbench     ``lmms-lab/MMBench`` parquet (``en`` config preferred; ``dev`` default); VLMEvalKit TSV (``index``,
            ``question``, ``hint``, ``A``..``D``, ``answer``, ``category``, ``l2-category``, base64 ``image``) as a
            file or the one ``.tsv`` in the folder (a folder with several: the one whose name holds the split)
synthetic   ``<data>/<split>.jsonl`` LLaVA-style records ``{"id", "image", "conversations", "family", "scorer",
            "pope_split"}``, or the ``.jsonl`` file itself
=========== ===================================================================================================

A parquet split is chosen by file name (``<split>-00000-of-00001.parquet``, ``<split>.parquet``) or folder
(``<split>/*.parquet``). Images are never decoded at load time: ``EvalItem.image`` is a picklable callable (see
:class:`ImageRef`) that returns an RGB PIL image; parquet images are read one row group at a time with a small cache.

MMMU: a question with several images uses the lowest-numbered ``<image N>`` it references (normally
``<image 1>``); the ``<image N>`` tags are stripped from the prompt (``meta["num_images"]`` keeps the count).

Missing files or columns raise :class:`BenchmarkDataError` (a ValueError) naming the benchmark and the file/column.
"""

from __future__ import annotations

import ast
import base64
import csv
import io
import json
import logging
import os
import re
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from . import prompts as P

logger = logging.getLogger(__name__)

BENCHMARK_NAMES = ("vqav2", "pope", "mme", "ai2d", "mmmu", "scienceqa", "mmbench", "synthetic")


class BenchmarkDataError(ValueError):
    """Benchmark data is missing or malformed (names the benchmark and the file / column)."""

    def __init__(self, benchmark: str, message: str):
        self.benchmark = benchmark
        super().__init__(f"[{benchmark}] {message}")


@dataclass
class EvalItem:
    """One evaluation question.

    ``image``: None (no image), a PIL image, or a zero-argument callable returning one (lazy; see :class:`ImageRef`).
    ``prompt``: the benchmark's standard prompt text (no image placeholder). ``meta``: what the scorer needs.
    """

    question_id: Union[str, int]
    image: Any
    prompt: str
    meta: Dict[str, Any] = field(default_factory=dict)

    def load_image(self):
        """The PIL image (RGB), or None."""
        img = self.image
        if img is None:
            return None
        if callable(img) and not hasattr(img, "size"):
            return img()
        return img


# ======================================================================================================
# lazy images
# ======================================================================================================


def _open_pil(source) -> Any:
    from PIL import Image

    img = Image.open(source)
    img.load()
    return img.convert("RGB")


class ImageRef:
    """A lazy, picklable image reference: ``ref()`` returns an RGB PIL image (or None)."""

    benchmark = "eval"

    def __call__(self):  # pragma: no cover - abstract
        raise NotImplementedError


class FileImage(ImageRef):
    """An image file; ``path`` may be a list of candidate paths (the first existing one is used)."""

    def __init__(self, path, benchmark: str = "eval"):
        self.paths = [str(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
        self.benchmark = benchmark

    @property
    def path(self) -> str:
        for p in self.paths:
            if os.path.exists(p):
                return p
        return self.paths[0]

    def __call__(self):
        p = self.path
        if not os.path.exists(p):
            raise BenchmarkDataError(self.benchmark, f"missing image file {p}"
                                     + (f" (also tried {', '.join(self.paths[1:])})" if len(self.paths) > 1 else ""))
        return _open_pil(p)

    def __repr__(self):
        return f"FileImage({self.paths[0]!r})"


class BytesImage(ImageRef):
    """Encoded image bytes (or a base64 string, decoded on call)."""

    def __init__(self, data: Union[bytes, str], benchmark: str = "eval"):
        self.data = data
        self.benchmark = benchmark

    def __call__(self):
        data = self.data
        if isinstance(data, str):
            data = base64.b64decode(data)
        return _open_pil(io.BytesIO(data))

    def __repr__(self):
        return f"BytesImage({len(self.data)} {'chars' if isinstance(self.data, str) else 'bytes'})"


_RG_CACHE: "OrderedDict[Tuple[str, int, str], Any]" = OrderedDict()
_RG_CACHE_SIZE = 4
_RG_LOCK = threading.Lock()


def _row_group_column(path: str, row_group: int, column: str):
    key = (path, row_group, column)
    with _RG_LOCK:
        if key in _RG_CACHE:
            _RG_CACHE.move_to_end(key)
            return _RG_CACHE[key]
    import pyarrow.parquet as pq

    col = pq.ParquetFile(path).read_row_group(row_group, columns=[column]).column(0)
    with _RG_LOCK:
        _RG_CACHE[key] = col
        while len(_RG_CACHE) > _RG_CACHE_SIZE:
            _RG_CACHE.popitem(last=False)
    return col


def _decode_image_value(value, base_dir: str, benchmark: str):
    """A parquet image cell ({"bytes", "path"} struct, raw bytes, or a path string) -> PIL image or None."""
    if value is None:
        return None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return _open_pil(io.BytesIO(data))
        if path:
            return FileImage([path, os.path.join(base_dir, path)], benchmark)()
        return None
    if isinstance(value, (bytes, bytearray)):
        return _open_pil(io.BytesIO(bytes(value)))
    if isinstance(value, str) and value:
        return FileImage([value, os.path.join(base_dir, value)], benchmark)()
    return None


class ParquetImage(ImageRef):
    """The image cell at (row group, row) of ``column`` in a parquet file, read on call."""

    def __init__(self, path: str, row_group: int, row: int, column: str, benchmark: str = "eval"):
        self.file, self.row_group, self.row, self.column = str(path), int(row_group), int(row), column
        self.benchmark = benchmark

    def value(self):
        return _row_group_column(self.file, self.row_group, self.column)[self.row].as_py()

    def __call__(self):
        return _decode_image_value(self.value(), os.path.dirname(self.file), self.benchmark)

    def __repr__(self):
        return f"ParquetImage({os.path.basename(self.file)!r}, rg={self.row_group}, row={self.row}, {self.column!r})"


class FirstImage(ImageRef):
    """The first of several references that gives an image."""

    def __init__(self, refs: Sequence[ImageRef]):
        self.refs = list(refs)

    def __call__(self):
        for r in self.refs:
            img = r()
            if img is not None:
                return img
        return None

    def __repr__(self):
        return f"FirstImage({self.refs!r})"


# ======================================================================================================
# helpers
# ======================================================================================================


def _is_missing(v) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and v != v:
        return True
    if isinstance(v, str) and v.strip() in ("", "nan", "NaN"):
        return True
    return False


def _as_list(v, bench: str, what: str) -> list:
    if isinstance(v, (list, tuple)):
        return list(v)
    if hasattr(v, "tolist"):
        return list(v.tolist())
    if isinstance(v, str):
        try:
            out = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            raise BenchmarkDataError(bench, f"{what} is not a list: {v[:80]!r}") from None
        if isinstance(out, (list, tuple)):
            return list(out)
    raise BenchmarkDataError(bench, f"{what} is not a list: {v!r}")


def _path(data_path) -> Path:
    return Path(os.path.expanduser(os.fspath(data_path)))


def _require_exists(bench: str, p: Path) -> None:
    if not p.exists():
        raise BenchmarkDataError(bench, f"data path does not exist: {p}")


def _file_split_names(root: Path, f: Path) -> List[str]:
    """Split names a parquet file may stand for: its name's leading word, and its folder names."""
    names = []
    m = re.match(r"^([A-Za-z][A-Za-z0-9_]*?)(?:[-.]|$)", f.name)
    if m:
        names.append(m.group(1))
    try:
        rel = f.relative_to(root)
        names.extend(rel.parts[:-1])
    except ValueError:
        pass
    return names


def _file_matches_split(root: Path, f: Path, split: str) -> bool:
    if f.name == f"{split}.parquet" or f.name.startswith(f"{split}-") or f.name.startswith(f"{split}."):
        return True
    try:
        return split in f.relative_to(root).parts[:-1]
    except ValueError:
        return False


def _find_parquet(bench: str, root: Path, split: Optional[str], defaults: Sequence[str],
                  prefer_dirs: Sequence[str] = ()) -> Tuple[List[Path], Optional[str]]:
    """(files, split used). ``root`` may be a parquet file."""
    if root.is_file():
        return [root], split
    files = sorted(root.rglob("*.parquet"))
    if not files:
        raise BenchmarkDataError(bench, f"no .parquet files under {root}")
    for d in prefer_dirs:
        sub = [f for f in files if d in f.relative_to(root).parts[:-1]]
        if sub:
            files = sub
            break
    if split is not None:
        chosen = [f for f in files if _file_matches_split(root, f, split)]
        if not chosen:
            raise BenchmarkDataError(bench, f"no parquet file for split {split!r} under {root} "
                                            f"(found splits: {', '.join(_available_splits(root, files))})")
        return chosen, split
    for s in defaults:
        chosen = [f for f in files if _file_matches_split(root, f, s)]
        if chosen:
            return chosen, s
    avail = _available_splits(root, files)
    if len(avail) <= 1:
        return files, (avail[0] if avail else None)
    raise BenchmarkDataError(bench, f"several splits under {root} ({', '.join(avail)}); pass split=")


def _available_splits(root: Path, files: Sequence[Path]) -> List[str]:
    out = []
    for f in files:
        n = _file_split_names(root, f)
        if n and n[0] not in out:
            out.append(n[0])
    return out


def _parquet_rows(bench: str, files: Sequence[Path], required: Sequence[str], image_columns: Sequence[str],
                  optional_image_columns: Sequence[str] = ()) -> Iterator[Tuple[Dict[str, Any], Dict[str, ImageRef]]]:
    """Yield (row without image columns, {image column: ParquetImage}) for every row of ``files`` in order."""
    import pyarrow.parquet as pq

    for f in files:
        try:
            pf = pq.ParquetFile(str(f))
        except Exception as e:  # noqa: BLE001 - a corrupt file is a data error
            raise BenchmarkDataError(bench, f"cannot read parquet file {f}: {e}") from e
        names = pf.schema_arrow.names
        for c in list(required) + list(image_columns):
            if c not in names:
                raise BenchmarkDataError(bench, f"missing column {c!r} in {f} (columns: {', '.join(names)})")
        img_cols = list(image_columns) + [c for c in optional_image_columns if c in names]
        other = [c for c in names if c not in img_cols]
        for rg in range(pf.num_row_groups):
            rows = pf.read_row_group(rg, columns=other).to_pylist()
            for i, r in enumerate(rows):
                yield r, {c: ParquetImage(str(f), rg, i, c, bench) for c in img_cols}


def _limited(it: Iterable, limit: Optional[int]):
    return it if limit is None else islice(it, max(0, int(limit)))


# ======================================================================================================
# VQAv2
# ======================================================================================================

_VQA_SPLIT_ALIASES = {
    None: "val2014", "val": "val2014", "val2014": "val2014", "validation": "val2014",
    "testdev": "test-dev2015", "test-dev": "test-dev2015", "test-dev2015": "test-dev2015",
    "test": "test2015", "test2015": "test2015", "train": "train2014", "train2014": "train2014",
}
_VQA_LMMS_ALIASES = {None: "validation", "val": "validation", "val2014": "validation",
                     "test-dev": "testdev", "test-dev2015": "testdev", "test2015": "test"}


def _vqa_item(bench, qid, question, image, answers, meta_extra) -> EvalItem:
    meta = {"answers": answers}
    meta.update(meta_extra)
    return EvalItem(question_id=qid, image=image, prompt=P.short_answer_prompt(question), meta=meta)


def load_vqav2(data_path, split=None, limit=None) -> List[EvalItem]:
    bench = "vqav2"
    root = _path(data_path)
    _require_exists(bench, root)
    has_parquet = root.suffix == ".parquet" or (root.is_dir() and any(root.rglob("*.parquet")))
    if has_parquet:
        s = _VQA_LMMS_ALIASES.get(split, split)
        files, _ = _find_parquet(bench, root, s, ["validation"])
        items = []
        for r, imgs in _limited(_parquet_rows(bench, files, ["question_id", "question"], ["image"]), limit):
            answers = r.get("answers")
            if answers:
                answers = [a["answer"] if isinstance(a, dict) else str(a) for a in answers]
            else:
                answers = None
            items.append(_vqa_item(bench, int(r["question_id"]), r["question"], imgs["image"], answers, {
                "answer_type": r.get("answer_type"), "question_type": r.get("question_type"),
                "image_id": r.get("image_id"), "multiple_choice_answer": r.get("multiple_choice_answer")}))
        return items
    return _load_vqav2_official(root, split, limit)


def _load_vqav2_official(root: Path, split, limit) -> List[EvalItem]:
    bench = "vqav2"
    subtype = _VQA_SPLIT_ALIASES.get(split, split)
    if root.is_file():
        qfile, folder = root, root.parent
    else:
        folder = root
        cands = sorted(root.rglob(f"*{subtype}_questions.json"))
        if not cands:
            raise BenchmarkDataError(bench, f"missing questions file *{subtype}_questions.json under {root} "
                                            f"(e.g. v2_OpenEnded_mscoco_{subtype}_questions.json)")
        qfile = cands[0]
    try:
        qdata = json.loads(qfile.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BenchmarkDataError(bench, f"cannot parse {qfile}: {e}") from e
    if "questions" not in qdata:
        raise BenchmarkDataError(bench, f"missing key 'questions' in {qfile}")
    subtype = qdata.get("data_subtype", subtype) or subtype
    anns = {}
    if not subtype.startswith("test"):
        acands = sorted(folder.rglob(f"*{subtype}_annotations.json"))
        if not acands:
            raise BenchmarkDataError(bench, f"missing annotations file *{subtype}_annotations.json under {folder} "
                                            f"(e.g. v2_mscoco_{subtype}_annotations.json)")
        adata = json.loads(acands[0].read_text(encoding="utf-8"))
        if "annotations" not in adata:
            raise BenchmarkDataError(bench, f"missing key 'annotations' in {acands[0]}")
        for a in adata["annotations"]:
            if "answers" not in a:
                raise BenchmarkDataError(bench, f"missing key 'answers' in an annotation of {acands[0]}")
            anns[a["question_id"]] = a
    img_sub = "test2015" if subtype.startswith("test") else subtype
    img_dirs = [folder / img_sub, folder / "images" / img_sub, folder / "Images" / img_sub, folder / "images",
                folder]
    items = []
    for q in _limited(qdata["questions"], limit):
        for k in ("question_id", "image_id", "question"):
            if k not in q:
                raise BenchmarkDataError(bench, f"missing key {k!r} in a question of {qfile}")
        qid = int(q["question_id"])
        name = f"COCO_{img_sub}_{int(q['image_id']):012d}.jpg"
        a = anns.get(qid)
        if anns and a is None:
            raise BenchmarkDataError(bench, f"question {qid} has no annotation in the annotations file")
        answers = [x["answer"] for x in a["answers"]] if a else None
        items.append(_vqa_item(bench, qid, q["question"], FileImage([d / name for d in img_dirs], bench), answers, {
            "answer_type": a.get("answer_type") if a else None, "question_type": a.get("question_type") if a else None,
            "image_id": int(q["image_id"]), "multiple_choice_answer": a.get("multiple_choice_answer") if a else None}))
    return items


# ======================================================================================================
# POPE
# ======================================================================================================

_POPE_SPLITS = ("random", "popular", "adversarial")


def _pope_item(split, qid, question, label, image, extra=None) -> EvalItem:
    meta = {"label": str(label).strip().lower(), "split": split, "source_question_id": qid}
    if extra:
        meta.update(extra)
    return EvalItem(question_id=f"{split}-{qid}", image=image, prompt=P.short_answer_prompt(question), meta=meta)


def load_pope(data_path, split=None, limit=None) -> List[EvalItem]:
    """POPE items; ``question_id`` is ``"<split>-<original question id>"`` (unique across splits)."""
    bench = "pope"
    root = _path(data_path)
    _require_exists(bench, root)
    if split is not None and split not in _POPE_SPLITS:
        raise BenchmarkDataError(bench, f"unknown POPE split {split!r} (random, popular, adversarial)")
    wanted = [split] if split else list(_POPE_SPLITS)
    has_parquet = root.suffix == ".parquet" or (root.is_dir() and any(root.rglob("*.parquet")))
    items: List[EvalItem] = []
    if has_parquet:
        if root.is_file():
            groups = [(None, [root])]
        else:
            files = sorted(root.rglob("*.parquet"))
            per_split = [(s, [f for f in files if _file_matches_split(root, f, s)]) for s in wanted]
            per_split = [(s, fs) for s, fs in per_split if fs]
            if per_split:
                groups = per_split
            else:
                test = [f for f in files if _file_matches_split(root, f, "test")]
                groups = [(None, test or files)]
        for file_split, files in groups:
            required = ["question_id", "question", "answer"] + ([] if file_split else ["category"])
            for r, imgs in _parquet_rows(bench, files, required, ["image"]):
                s = file_split or str(r["category"]).strip().lower()
                if s not in wanted:
                    continue
                items.append(_pope_item(s, r["question_id"], r["question"], r["answer"], imgs["image"],
                                        {"image_source": r.get("image_source")}))
                if limit is not None and len(items) >= limit:
                    return items
        return items
    # official JSONL files
    if root.is_file():
        m = re.search(r"pope_(random|popular|adversarial)", root.name)
        file_groups = [(m.group(1) if m else (split or "random"), root)]
        folder = root.parent
    else:
        folder = root
        file_groups = []
        for s in wanted:
            cands = sorted(list(root.rglob(f"*pope_{s}.json")) + list(root.rglob(f"*pope_{s}.jsonl")))
            if len(cands) > 1:
                coco = [c for c in cands if c.name.startswith("coco_")]
                cands = coco[:1] if coco else cands
                if len(cands) > 1:
                    raise BenchmarkDataError(bench, f"several POPE files for split {s}: "
                                                    f"{', '.join(str(c) for c in cands)}")
            if cands:
                file_groups.append((s, cands[0]))
            elif split is not None:
                raise BenchmarkDataError(bench, f"missing file *pope_{s}.json under {root}")
        if not file_groups:
            raise BenchmarkDataError(bench, f"no POPE data under {root} (expected parquet files or "
                                            f"coco_pope_<random|popular|adversarial>.json)")
    img_dirs = [folder / "val2014", folder / "images" / "val2014", folder / "images", folder]
    for s, f in file_groups:
        for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkDataError(bench, f"{f}:{lineno}: not JSON ({e})") from e
            for k in ("question_id", "image", "text", "label"):
                if k not in rec:
                    raise BenchmarkDataError(bench, f"missing key {k!r} in {f}:{lineno}")
            img = FileImage([d / rec["image"] for d in img_dirs], bench)
            items.append(_pope_item(s, rec["question_id"], rec["text"], rec["label"], img, {"image": rec["image"]}))
            if limit is not None and len(items) >= limit:
                return items
    return items


# ======================================================================================================
# MME
# ======================================================================================================

MME_SUBTASKS = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                "OCR", "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_IMG_EXTS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


def _mme_items(rows: Iterable[Tuple[str, str, str, str, Any]]) -> List[EvalItem]:
    """rows: (category, image key, question, answer, image) -> items with ids ``<image key>#<k>``."""
    seen: Dict[str, int] = {}
    items = []
    for cat, key, question, answer, image in rows:
        k = seen.get(key, 0)
        seen[key] = k + 1
        items.append(EvalItem(question_id=f"{key}#{k}", image=image, prompt=P.mme_prompt(question),
                              meta={"category": cat, "image_key": key, "answer": str(answer).strip(),
                                    "question": str(question)}))
    return items


def _mme_image(bench: str, dirs: Sequence[Path], name: str) -> FileImage:
    cands = [d / name for d in dirs]
    if not Path(name).suffix:
        cands = [d / (name + e) for d in dirs for e in _IMG_EXTS]
    return FileImage(cands, bench)


def load_mme(data_path, split=None, limit=None) -> List[EvalItem]:
    bench = "mme"
    root = _path(data_path)
    _require_exists(bench, root)
    has_parquet = root.suffix == ".parquet" or (root.is_dir() and any(root.rglob("*.parquet")))
    if has_parquet:
        files, _ = _find_parquet(bench, root, split, ["test"])

        def gen():
            for r, imgs in _parquet_rows(bench, files, ["question_id", "question", "answer", "category"], ["image"]):
                cat, qid = str(r["category"]), str(r["question_id"])
                key = qid if qid.startswith(cat + "/") else f"{cat}/{qid}"
                yield cat, key, r["question"], r["answer"], imgs["image"]

        return _mme_items(_limited(gen(), limit))
    if not root.is_dir():
        raise BenchmarkDataError(bench, f"expected a folder or parquet files: {root}")
    return _mme_items(_limited(_mme_official_rows(root), limit))


def _read_tsv_lines(bench: str, f: Path, ncols: int) -> List[List[str]]:
    out = []
    for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.rstrip("\r\n").split("\t")]
        if len(parts) < ncols:
            raise BenchmarkDataError(bench, f"{f}:{lineno}: expected {ncols} tab-separated fields, got {len(parts)}")
        out.append(parts[:ncols])
    return out


def _mme_official_rows(root: Path):
    bench = "mme"
    order = {s: i for i, s in enumerate(MME_SUBTASKS)}
    # eval_tool style: <root>/<subtask>.txt with image \t question \t answer
    txts = sorted((f for f in root.glob("*.txt") if f.stem in order or (root / f.stem).is_dir()),
                  key=lambda f: (order.get(f.stem, len(order)), f.stem))
    if txts:
        for f in txts:
            sub = f.stem
            dirs = [root / sub / "images", root / sub, root / "images" / sub]
            for img, question, answer in _read_tsv_lines(bench, f, 3):
                yield sub, f"{sub}/{img}", question, answer, _mme_image(bench, dirs, img)
        return
    subdirs = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: (order.get(d.name, len(order)), d.name))
    found = False
    for d in subdirs:
        if (d / "questions_answers_YN").is_dir():
            qa_files, img_dirs = sorted((d / "questions_answers_YN").glob("*.txt")), [d / "images", d]
        else:
            qa_files, img_dirs = sorted(d.glob("*.txt")), [d, d / "images"]
        if not qa_files:
            continue
        found = True
        for f in qa_files:
            stem = f.stem
            img = None
            for e in _IMG_EXTS:
                for idir in img_dirs:
                    if (idir / (stem + e)).exists():
                        img = FileImage(idir / (stem + e), bench)
                        break
                if img is not None:
                    break
            if img is None:
                img = _mme_image(bench, img_dirs, stem)
            name = Path(img.path).name
            for question, answer in _read_tsv_lines(bench, f, 2):
                yield d.name, f"{d.name}/{name}", question, answer, img
    if not found:
        raise BenchmarkDataError(bench, f"no MME data under {root}: expected parquet files, <subtask>.txt files, or "
                                        f"<subtask>/questions_answers_YN/*.txt folders")


# ======================================================================================================
# AI2D, ScienceQA
# ======================================================================================================


def load_ai2d(data_path, split=None, limit=None) -> List[EvalItem]:
    bench = "ai2d"
    root = _path(data_path)
    _require_exists(bench, root)
    files, _ = _find_parquet(bench, root, split, ["test"])
    items = []
    for i, (r, imgs) in enumerate(_limited(_parquet_rows(bench, files, ["question", "options", "answer"], ["image"]),
                                           limit)):
        options = [str(o) for o in _as_list(r["options"], bench, "options")]
        ans = int(str(r["answer"]).strip())
        if not 0 <= ans < len(options):
            raise BenchmarkDataError(bench, f"row {i}: answer index {ans} outside {len(options)} options")
        letters = P.option_letters(len(options))
        items.append(EvalItem(question_id=f"row-{i}", image=imgs["image"], prompt=P.ai2d_prompt(r["question"], options),
                              meta={"answer": letters[ans], "options": options, "index": i}))
    return items


def load_scienceqa(data_path, split=None, limit=None) -> List[EvalItem]:
    """ScienceQA-IMG (only questions with an image).

    * official layout (lupantech/ScienceQA ``data/scienceqa``: ``problems.json`` + ``pid_splits.json``, images
      ``images/<split>/<pid>/image.png`` or ``<split>/<pid>/image.png``): ``question_id`` is the problem id (pid, a
      string), the id LLaVA's answer files use; split ``test`` (default), ``val``, ``minival``, ``train``...
    * ``lmms-lab/ScienceQA`` parquet (the ``ScienceQA-IMG`` config folder preferred): the rows carry no pid, so
      ``question_id`` is ``"row-<n>"`` (n = the row in the split file, lmms-eval's ``doc_id``); rows without an image
      are dropped.
    """
    bench = "scienceqa"
    root = _path(data_path)
    _require_exists(bench, root)
    official = root if root.is_dir() and (root / "problems.json").is_file() else None
    if official is None and root.is_file() and root.name == "problems.json":
        official = root.parent
    if official is not None:
        return _load_scienceqa_official(official, split or "test", limit)
    files, _ = _find_parquet(bench, root, split, ["test"], prefer_dirs=["ScienceQA-IMG"])
    items: List[EvalItem] = []
    dropped = 0
    for i, (r, imgs) in enumerate(_parquet_rows(bench, files, ["question", "choices", "answer"], ["image"])):
        ref = imgs["image"]
        v = ref.value()
        if v is None or (isinstance(v, dict) and not v.get("bytes") and not v.get("path")):
            dropped += 1
            continue
        choices = [str(c) for c in _as_list(r["choices"], bench, "choices")]
        ans = int(r["answer"])
        if not 0 <= ans < len(choices):
            raise BenchmarkDataError(bench, f"row {i}: answer index {ans} outside {len(choices)} choices")
        hint = r.get("hint")
        hint = None if _is_missing(hint) else str(hint)
        letters = P.option_letters(len(choices))
        items.append(EvalItem(question_id=f"row-{i}", image=ref,
                              prompt=P.scienceqa_prompt(r["question"], choices, hint),
                              meta={"answer": letters[ans], "choices": choices, "answer_index": ans, "index": i,
                                    "subject": r.get("subject"), "grade": r.get("grade"),
                                    "category": r.get("category")}))
        if limit is not None and len(items) >= limit:
            break
    if dropped:
        logger.info("scienceqa: dropped %d rows without an image (ScienceQA-IMG)", dropped)
    return items


def _load_scienceqa_official(root: Path, split: str, limit) -> List[EvalItem]:
    bench = "scienceqa"
    splits_file = root / "pid_splits.json"
    if not splits_file.is_file():
        raise BenchmarkDataError(bench, f"missing {splits_file} (problems.json needs pid_splits.json beside it)")
    try:
        problems = json.loads((root / "problems.json").read_text(encoding="utf-8"))
        pid_splits = json.loads(splits_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BenchmarkDataError(bench, f"{root}: malformed JSON ({e})") from e
    if split not in pid_splits:
        raise BenchmarkDataError(bench, f"unknown split {split!r} in {splits_file} (has {', '.join(pid_splits)})")
    items: List[EvalItem] = []
    for pid in pid_splits[split]:
        pid = str(pid)
        if pid not in problems:
            raise BenchmarkDataError(bench, f"pid {pid} of split {split} is not in problems.json")
        prob = problems[pid]
        if not prob.get("image"):
            continue  # ScienceQA-IMG: the image questions only
        for k in ("question", "choices", "answer"):
            if k not in prob:
                raise BenchmarkDataError(bench, f"missing key {k!r} for pid {pid} in problems.json")
        choices = [str(c) for c in prob["choices"]]
        ans = int(prob["answer"])
        if not 0 <= ans < len(choices):
            raise BenchmarkDataError(bench, f"pid {pid}: answer index {ans} outside {len(choices)} choices")
        name = str(prob["image"])
        img = FileImage([root / "images" / split / pid / name, root / split / pid / name,
                         root / "images" / pid / name], bench)
        letters = P.option_letters(len(choices))
        hint = prob.get("hint") or None
        items.append(EvalItem(question_id=pid, image=img, prompt=P.scienceqa_prompt(prob["question"], choices, hint),
                              meta={"answer": letters[ans], "choices": choices, "answer_index": ans, "pid": pid,
                                    "subject": prob.get("subject"), "grade": prob.get("grade"),
                                    "category": prob.get("category")}))
        if limit is not None and len(items) >= limit:
            break
    return items


# ======================================================================================================
# MMMU
# ======================================================================================================

_MMMU_IMAGE_COLS = tuple(f"image_{k}" for k in range(1, 8))


def _mmmu_answer(ans, question_type: str):
    if isinstance(ans, (list, tuple)):
        return [str(a) for a in ans]
    ans = "" if ans is None else str(ans)
    s = ans.strip()
    if s.startswith("[") and s.endswith("]"):
        try:
            v = ast.literal_eval(s)
            if isinstance(v, (list, tuple)):
                return [str(a) for a in v]
        except (ValueError, SyntaxError):
            pass
    return s if question_type == "multiple-choice" else ans


def load_mmmu(data_path, split=None, limit=None) -> List[EvalItem]:
    """MMMU; the image is the lowest-numbered ``<image N>`` referenced (question or options), else ``image_1``;
    if that cell is empty the next available image column is used."""
    from .scorers import mmmu_subject_from_id

    bench = "mmmu"
    root = _path(data_path)
    _require_exists(bench, root)
    files, used = _find_parquet(bench, root, split, ["validation"])
    items = []
    rows = _parquet_rows(bench, files, ["id", "question", "options", "answer", "question_type"], ["image_1"],
                         optional_image_columns=_MMMU_IMAGE_COLS[1:])
    for r, imgs in _limited(rows, limit):
        qtype = str(r["question_type"])
        options = [str(o) for o in _as_list(r["options"], bench, "options")] if not _is_missing(r["options"]) else []
        text_all = str(r["question"]) + "\n" + "\n".join(options)
        refs = [k for k in P.mmmu_image_refs(text_all) if f"image_{k}" in imgs]
        order = [f"image_{k}" for k in refs] + [c for c in _MMMU_IMAGE_COLS if c in imgs and
                                                  c not in {f"image_{k}" for k in refs}]
        image = FirstImage([imgs[c] for c in order]) if len(order) > 1 else imgs[order[0]]
        items.append(EvalItem(
            question_id=str(r["id"]), image=image, prompt=P.mmmu_prompt(str(r["question"]), options, qtype),
            meta={"answer": _mmmu_answer(r["answer"], qtype), "options": options, "question_type": qtype,
                  "subject": mmmu_subject_from_id(r["id"]), "num_images": max(1, len(refs)),
                  "image_column": order[0], "subfield": r.get("subfield"), "split": used}))
    return items


# ======================================================================================================
# MMBench
# ======================================================================================================

_MMB_LETTERS = tuple("ABCDEFGHI")


def _mmb_key(row: Dict[str, Any], name: str):
    for k in row:
        if k.lower() == name.lower():
            return row[k]
    return None


def _mmbench_item(bench: str, r: Dict[str, Any], image) -> EvalItem:
    letters = [c for c in _MMB_LETTERS if c in r and not _is_missing(r[c])]
    options = {c: str(r[c]) for c in letters}
    hint = r.get("hint")
    hint = None if _is_missing(hint) else str(hint)
    idx = int(float(r["index"]))
    answer = r.get("answer")
    answer = None if _is_missing(answer) else str(answer).strip()
    return EvalItem(question_id=idx, image=image,
                    prompt=P.mmbench_prompt(str(r["question"]), list(options.values()), hint),
                    meta={"index": idx, "answer": answer, "options": options, "hint": hint,
                          "category": r.get("category"), "l2_category": _mmb_key(r, "l2-category"),
                          "source": r.get("source"), "split": r.get("split")})


def _mmbench_limit(items: List[EvalItem], limit: Optional[int]) -> List[EvalItem]:
    """Keep the first ``limit`` main questions (index < 1e6) and all their circular copies."""
    if limit is None:
        return items
    keep = []
    for it in items:
        idx = it.meta["index"]
        if idx < 1_000_000:
            keep.append(idx)
            if len(keep) >= limit:
                break
    keep_set = set(keep)
    return [it for it in items if it.meta["index"] % 1_000_000 in keep_set]


def load_mmbench(data_path, split=None, limit=None) -> List[EvalItem]:
    """MMBench (English dev by default). ``limit`` counts main questions; their circular copies come along."""
    bench = "mmbench"
    root = _path(data_path)
    _require_exists(bench, root)
    tsv = None
    if root.is_file() and root.suffix.lower() == ".tsv":
        tsv = root
    elif root.is_dir() and not any(root.rglob("*.parquet")):
        cands = sorted(root.rglob("*.tsv"))
        if not cands:
            raise BenchmarkDataError(bench, f"no .parquet or .tsv files under {root}")
        if len(cands) > 1:
            s = (split or "dev").lower()
            sel = [c for c in cands if s in c.stem.lower().split("_") or s in c.stem.lower()]
            en = [c for c in sel if "en" in c.stem.lower().split("_")]
            sel = en or sel
            if len(sel) != 1:
                raise BenchmarkDataError(bench, f"cannot choose a TSV for split {s!r} among "
                                                f"{', '.join(c.name for c in cands)}")
            cands = sel
        tsv = cands[0]
    if tsv is not None:
        items = _load_mmbench_tsv(tsv)
    else:
        files, _ = _find_parquet(bench, root, split, ["dev"], prefer_dirs=["en"])
        items = [_mmbench_item(bench, r, imgs["image"])
                 for r, imgs in _parquet_rows(bench, files, ["index", "question", "A", "B", "category"], ["image"])]
        if items and all(it.meta["answer"] is None for it in items):
            logger.warning("mmbench: no answers in %s (test split?): predictions cannot be scored locally", root)
    return _mmbench_limit(items, limit)


def _load_mmbench_tsv(tsv: Path) -> List[EvalItem]:
    bench = "mmbench"
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))
    with open(tsv, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        cols = reader.fieldnames or []
        for c in ("index", "question", "A", "B", "category", "image"):
            if c not in cols:
                raise BenchmarkDataError(bench, f"missing column {c!r} in {tsv} (columns: {', '.join(cols)})")
        rows = list(reader)
    images: Dict[str, str] = {}
    for r in rows:
        idx = str(int(float(r["index"])))
        img = r.get("image") or ""
        if len(img) > 64:
            images[idx] = img
    items = []
    for r in rows:
        idx = str(int(float(r["index"])))
        img = r.get("image") or ""
        if len(img) <= 64:  # VLMEvalKit stores a copy's image as the index of the row that holds it
            ref = str(int(float(img))) if img.strip() else str(int(idx) % 1_000_000)
            if ref not in images:
                raise BenchmarkDataError(bench, f"row index {idx}: image refers to index {ref!r}, not found in {tsv}")
            img = images[ref]
        items.append(_mmbench_item(bench, r, BytesImage(img, bench)))
    return items


# ======================================================================================================
# synthetic
# ======================================================================================================

SYNTHETIC_SCORERS = ("vqa", "pope", "letter")


def load_synthetic(data_path, split=None, limit=None) -> List[EvalItem]:
    """``<data>/<split>.jsonl`` (or the file itself). Prompt = first human turn without ``<image>``; answer = the
    following gpt turn. Images are paths relative to the JSONL file."""
    bench = "synthetic"
    root = _path(data_path)
    _require_exists(bench, root)
    if root.is_file():
        f = root
    elif split is not None:
        f = root / f"{split}.jsonl"
        if not f.exists():
            raise BenchmarkDataError(bench, f"missing file {f}")
    else:
        cands = sorted(root.glob("*.jsonl"))
        by_name = {c.stem: c for c in cands}
        f = next((by_name[s] for s in ("test", "val", "validation", "eval") if s in by_name), None)
        if f is None:
            if len(cands) == 1:
                f = cands[0]
            else:
                raise BenchmarkDataError(bench, f"missing file {root / 'test.jsonl'} (found: "
                                                f"{', '.join(c.name for c in cands) or 'no .jsonl'}); pass split=")
    items = []
    for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkDataError(bench, f"{f}:{lineno}: not JSON ({e})") from e
        for k in ("id", "conversations", "scorer"):
            if k not in rec:
                raise BenchmarkDataError(bench, f"missing key {k!r} in {f}:{lineno}")
        scorer = rec["scorer"]
        if scorer not in SYNTHETIC_SCORERS:
            raise BenchmarkDataError(bench, f"{f}:{lineno}: unknown scorer {scorer!r} ({', '.join(SYNTHETIC_SCORERS)})")
        conv = rec["conversations"]
        human = next((i for i, t in enumerate(conv) if t.get("from") in ("human", "user")), None)
        gpt = next((i for i, t in enumerate(conv) if i > (human if human is not None else -1)
                    and t.get("from") in ("gpt", "assistant")), None)
        if human is None or gpt is None:
            raise BenchmarkDataError(bench, f"{f}:{lineno}: conversations need a human turn and a gpt turn")
        image = rec.get("image")
        img = FileImage(f.parent / image, bench) if image else None
        meta = {"answer": str(conv[gpt]["value"]).strip(), "family": rec.get("family") or "default",
                "scorer": scorer}
        if scorer == "pope":
            meta["pope_split"] = rec.get("pope_split") or "all"
        items.append(EvalItem(question_id=rec["id"], image=img,
                              prompt=P.strip_image_token(str(conv[human]["value"])), meta=meta))
        if limit is not None and len(items) >= limit:
            break
    return items


# ======================================================================================================
# entry point
# ======================================================================================================

LOADERS: Dict[str, Callable[..., List[EvalItem]]] = {
    "vqav2": load_vqav2, "pope": load_pope, "mme": load_mme, "ai2d": load_ai2d, "mmmu": load_mmmu,
    "scienceqa": load_scienceqa, "mmbench": load_mmbench, "synthetic": load_synthetic,
}


def load_benchmark(name: str, data_path, split: Optional[str] = None, limit: Optional[int] = None) -> List[EvalItem]:
    """Load benchmark ``name`` from ``data_path`` (see the module doc for the layouts). ``limit``: the first N
    items (MMBench: N main questions with their circular copies). Raises :class:`BenchmarkDataError`."""
    key = str(name).lower()
    if key not in LOADERS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(LOADERS)}")
    if limit is not None and int(limit) < 0:
        raise ValueError("limit must be >= 0")
    items = LOADERS[key](data_path, split=split, limit=limit)
    seen = set()
    for it in items:
        k = str(it.question_id)
        if k in seen:
            raise BenchmarkDataError(key, f"duplicate question_id {it.question_id!r} in {data_path}")
        seen.add(k)
    return items
