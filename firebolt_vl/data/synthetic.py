"""Synthetic fine-grained benchmark generator (PIL only, deterministic by seed).

Every image (default 256x256, i.e. a global view plus 2x2 tiles of ~128 px for
the grid encoder) holds a handful of *small* objects spread over the four
quadrants:

* shapes (circle, square, triangle, star, diamond) of 16-36 px in six colours,
* one or two short lowercase words in small type (font size 13-18 px),
* optionally a small bar chart (3-4 grey bars with 3-letter labels) that fills
  one quadrant.

Every object lies entirely inside one quadrant (so it is entirely inside one
tile); ``per_quadrant=1`` puts each object alone in its quadrant (the demo's
setting), and small images keep shapes >= 12 px and type >= 12 px.  Questions are generated so that the answer depends on one small region
among distractors.  Families (``record["family"]``) and their scorer
(``record["scorer"]``):

==================  ========  =============================================
family              scorer    example
==================  ========  =============================================
``attribute``       vqa       "What color is the triangle?" -> "red"
``existence``       pope      "Is there a green star in the image?" -> "no"
                              (``pope_split`` random / popular / adversarial,
                              one yes and one no question per image)
``counting``        vqa       "How many red shapes are there?" -> "3"
``ocr``             vqa       "What word is written in the top left?" -> "cat"
``position``        vqa       "Is the circle to the left or right of the
                              square?" -> "left"
``chart``           vqa       "Which bar is the tallest?" -> "tom"
``multiple_choice`` letter    "...\\nA. red\\nB. blue\\n...\\nAnswer with the
                              option's letter from the given choices
                              directly." -> "B"
==================  ========  =============================================

Output layout of :func:`generate_synthetic` (all paths relative to ``out_dir``)::

    images/<split>/<000123>.png
    <split>.jsonl            # LLaVA-Instruct records, one per question
    captions_<split>.jsonl   # {"image": ..., "caption": ...}, one per image
    scenes_<split>.jsonl     # scene metadata (objects, bboxes), one per image
    manifest.json            # parameters, version, counts per split/family

Determinism: every image uses its own ``random.Random`` seeded from
``(version, seed, split, index)`` (string seeds are hashed with SHA-512 by
:mod:`random`, independent of ``PYTHONHASHSEED``), and every question family
uses its own stream, so the same seed gives byte-identical jsonl files and
identical pixels, the splits use disjoint seeds, and selecting a subset of
``families`` does not change the images or the questions of the other
families.  (Text rendering uses Pillow's bundled font through FreeType, so
pixels are identical for a given Pillow/FreeType build.)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import shutil
import tempfile
import uuid
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "GENERATOR_VERSION",
    "FAMILIES",
    "SCORERS",
    "POPE_SPLITS",
    "COLORS",
    "SHAPES",
    "QUADRANTS",
    "WORDS",
    "CHART_LABELS",
    "MC_SUFFIX",
    "generate_synthetic",
    "sample_scene",
    "render_scene",
    "make_questions",
    "caption_scene",
    "combo_frequencies",
]

GENERATOR_VERSION = "4"
_GENERATOR_NAME = "firebolt_vl.data.synthetic"

FAMILIES: Tuple[str, ...] = (
    "attribute",
    "existence",
    "counting",
    "ocr",
    "position",
    "chart",
    "multiple_choice",
)
SCORERS: Dict[str, str] = {
    "attribute": "vqa",
    "existence": "pope",
    "counting": "vqa",
    "ocr": "vqa",
    "position": "vqa",
    "chart": "vqa",
    "multiple_choice": "letter",
}
POPE_SPLITS: Tuple[str, ...] = ("random", "popular", "adversarial")

# Colours are saturated enough to be distinguishable after downsampling; a thin
# dark outline keeps light colours (yellow) visible on the pale backgrounds.
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 195, 0),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
COLOR_NAMES: Tuple[str, ...] = tuple(COLORS)
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
SHAPE_PLURALS: Dict[str, str] = {s: s + "s" for s in SHAPES}
# Mildly skewed priors so that "popular" POPE negatives are meaningful.
_COLOR_WEIGHTS = (1.6, 1.4, 1.2, 1.0, 0.9, 0.8)
_SHAPE_WEIGHTS = (1.5, 1.3, 1.1, 1.0, 0.9)

QUADRANTS: Tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
WORDS: Tuple[str, ...] = (
    "cat", "dog", "sun", "car", "box", "map", "key", "cup", "hat", "pen",
    "bus", "fox", "owl", "egg", "ice", "jam", "kit", "leg", "net", "pig",
    "sky", "toy", "van", "web", "bed", "bag", "ant", "bee", "cow", "fish",
    "tree", "book", "milk", "rain", "ship", "moon", "frog", "lamp", "door", "king",
)
CHART_LABELS: Tuple[str, ...] = (
    "ann", "bob", "joe", "kim", "max", "sam", "tom", "zoe", "ben", "eva", "ian", "lia",
)
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
_LETTERS = "ABCD"

_BACKGROUNDS = ((255, 255, 255), (245, 245, 240), (235, 238, 242), (250, 246, 235))
_OUTLINE = (60, 60, 60)
_BAR_COLOR = (95, 100, 115)
_AXIS_COLOR = (40, 40, 40)
_LABEL_COLOR = (20, 20, 20)

_CHART_PROB = 0.4
# legibility floors in pixels, binding only for small images (at 256 px every size is above them)
_MIN_FONT = 12
_MIN_SHAPE = 12
_MAX_SCENE_TRIES = 50

DEFAULT_SIZES = {"train": 2000, "val": 200, "test": 400}


# --------------------------------------------------------------------------- fonts
@functools.lru_cache(maxsize=64)
def _font(size: int):
    """Pillow's bundled scalable font (Pillow>=10.1 with FreeType), else the bitmap default."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):  # old Pillow / no FreeType
        return ImageFont.load_default()


def _text_bbox(font, text: str) -> Tuple[int, int, int, int]:
    return tuple(int(v) for v in font.getbbox(text))  # type: ignore[return-value]


# --------------------------------------------------------------------------- scenes
def _rng(*parts) -> random.Random:
    return random.Random("firebolt-synth/v%s/%s" % (GENERATOR_VERSION, "/".join(str(p) for p in parts)))


def _quadrant_box(q: int, size: int) -> Tuple[int, int, int, int]:
    half = size // 2
    x0 = (q % 2) * half
    y0 = (q // 2) * half
    x1 = size if q % 2 else half
    y1 = size if q // 2 else half
    return x0, y0, x1, y1


def _overlaps(a, b, pad: int) -> bool:
    return not (a[2] + pad <= b[0] or b[2] + pad <= a[0] or a[3] + pad <= b[1] or b[3] + pad <= a[1])


def _place(rng: random.Random, quad_box, w: int, h: int, taken: List, margin: int, pad: int, tries: int = 30):
    x0, y0, x1, y1 = quad_box
    if x1 - x0 - 2 * margin < w or y1 - y0 - 2 * margin < h:
        return None
    for _ in range(tries):
        x = rng.randint(x0 + margin, x1 - margin - w)
        y = rng.randint(y0 + margin, y1 - margin - h)
        box = (x, y, x + w, y + h)
        if all(not _overlaps(box, t, pad) for t in taken):
            return box
    return None


def _sample_scene_once(rng: random.Random, image_size: int, per_quadrant: int = 0) -> dict:
    S = image_size
    scale = S / 256.0
    margin = max(2, round(4 * scale))
    pad = max(2, round(4 * scale))
    taken: Dict[int, List] = {q: [] for q in range(4)}
    objects: List[dict] = []

    background = list(rng.choice(_BACKGROUNDS))

    chart_q: Optional[int] = rng.randrange(4) if rng.random() < _CHART_PROB else None
    free_quads = [q for q in range(4) if q != chart_q]

    # chart: fills one quadrant
    chart = None
    if chart_q is not None:
        n_bars = rng.choice((3, 4))
        labels = rng.sample(CHART_LABELS, n_bars)
        values = rng.sample(range(2, 11), n_bars)  # distinct -> unique tallest/shortest
        qb = _quadrant_box(chart_q, S)
        cm = max(3, round(8 * scale))
        box = [qb[0] + cm, qb[1] + cm, qb[2] - cm, qb[3] - cm]
        chart = {
            "kind": "chart",
            "quadrant": QUADRANTS[chart_q],
            "bbox": box,
            "bars": [{"label": l, "value": v} for l, v in zip(labels, values)],
            "font_size": max(8, round(11 * scale)),
        }
        objects.append(chart)
        taken[chart_q].append(tuple(box))

    # words: distinct words, distinct colours, distinct quadrants
    n_words = min(len(free_quads), rng.choice((1, 2, 2)))
    if per_quadrant:  # leave room for the two shapes every scene needs
        n_words = min(n_words, max(0, per_quadrant * len(free_quads) - 2))
    word_quads = rng.sample(free_quads, n_words)
    word_texts = rng.sample(WORDS, n_words)
    word_colors = rng.sample(COLOR_NAMES, n_words)
    for q, text, color in zip(word_quads, word_texts, word_colors):
        fs = max(_MIN_FONT, round(rng.randint(13, 18) * scale))
        l, t, r, b = _text_bbox(_font(fs), text)
        box = _place(rng, _quadrant_box(q, S), r - l, b - t, taken[q], margin, pad)
        if box is None:
            continue
        taken[q].append(box)
        objects.append({
            "kind": "word", "text": text, "color": color, "quadrant": QUADRANTS[q],
            "bbox": list(box), "font_size": fs, "origin": [box[0] - l, box[1] - t],
        })

    # shapes
    n_shapes = rng.randint(3, 6)
    for _ in range(n_shapes):
        color = rng.choices(COLOR_NAMES, weights=_COLOR_WEIGHTS)[0]
        shape = rng.choices(SHAPES, weights=_SHAPE_WEIGHTS)[0]
        s = max(_MIN_SHAPE, round(rng.randint(16, 36) * scale))
        quads = [q for q in free_quads if not per_quadrant or len(taken[q]) < per_quadrant]
        rng.shuffle(quads)
        for q in quads:
            box = _place(rng, _quadrant_box(q, S), s, s, taken[q], margin, pad)
            if box is not None:
                taken[q].append(box)
                objects.append({
                    "kind": "shape", "shape": shape, "color": color, "quadrant": QUADRANTS[q],
                    "bbox": list(box), "center": [(box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0],
                })
                break

    return {"image_size": S, "background": background, "objects": objects}


def _scene_ok(scene: dict) -> bool:
    shapes = [o for o in scene["objects"] if o["kind"] == "shape"]
    if len(shapes) < 2:
        return False
    counts = Counter(o["shape"] for o in shapes)
    return any(c == 1 for c in counts.values())  # at least one shape type is unique


def sample_scene(rng: random.Random, image_size: int = 256, per_quadrant: int = 0) -> dict:
    """Sample a scene (pure metadata, JSON-serialisable).

    ``scene = {"image_size", "background", "objects": [...]}`` where each object
    is a shape (``shape``, ``color``, ``quadrant``, ``bbox``, ``center``), a
    word (``text``, ``color``, ``quadrant``, ``bbox``, ``font_size``,
    ``origin``) or a chart (``quadrant``, ``bbox``, ``bars`` = list of
    ``{"label", "value"}``).  At least two shapes, at least one shape type
    that occurs exactly once. ``per_quadrant`` > 0 caps the objects in each quadrant (1: every object is alone
    in its tile, the distractors are in the other tiles); 0 = no cap.
    """
    if image_size < 64:
        raise ValueError("image_size must be >= 64, got %r" % (image_size,))
    scene = None
    for _ in range(_MAX_SCENE_TRIES):
        scene = _sample_scene_once(rng, image_size, per_quadrant)
        if _scene_ok(scene):
            return scene
    assert scene is not None
    return scene  # practically unreachable


# --------------------------------------------------------------------------- rendering
def _star_points(box, n: int = 5, inner: float = 0.45):
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    R = (x1 - x0) / 2.0
    pts = []
    for k in range(2 * n):
        r = R if k % 2 == 0 else R * inner
        a = -math.pi / 2 + k * math.pi / n
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, obj: dict) -> None:
    x0, y0, x1, y1 = obj["bbox"]
    x1 -= 1
    y1 -= 1
    fill = COLORS[obj["color"]]
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    shape = obj["shape"]
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill, outline=_OUTLINE)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill, outline=_OUTLINE)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill, outline=_OUTLINE)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill, outline=_OUTLINE)
    elif shape == "star":
        draw.polygon(_star_points((x0, y0, x1, y1)), fill=fill, outline=_OUTLINE)
    else:  # pragma: no cover
        raise ValueError(shape)


def _draw_chart(draw: ImageDraw.ImageDraw, obj: dict) -> None:
    x0, y0, x1, y1 = obj["bbox"]
    font = _font(obj["font_size"])
    bars = obj["bars"]
    label_h = max(_text_bbox(font, b["label"])[3] for b in bars) + 2
    base_y = y1 - label_h - 1
    axis_x = x0 + 2
    draw.line((axis_x, y0, axis_x, base_y), fill=_AXIS_COLOR)
    draw.line((axis_x, base_y, x1, base_y), fill=_AXIS_COLOR)
    slot = (x1 - axis_x - 2) / float(len(bars))
    max_h = base_y - y0 - 2
    bar_w = max(3, int(slot * 0.55))
    for i, b in enumerate(bars):
        cx = axis_x + 2 + slot * (i + 0.5)
        h = max(2, int(round(max_h * b["value"] / 10.0)))
        bx0 = int(round(cx - bar_w / 2.0))
        draw.rectangle((bx0, base_y - h, bx0 + bar_w - 1, base_y - 1), fill=_BAR_COLOR)
        l, t, r, _ = _text_bbox(font, b["label"])
        draw.text((cx - (r - l) / 2.0 - l, base_y + 2 - t + 1), b["label"], fill=_LABEL_COLOR, font=font)


def render_scene(scene: dict) -> Image.Image:
    """Draw a scene produced by :func:`sample_scene` into an RGB image."""
    S = scene["image_size"]
    img = Image.new("RGB", (S, S), tuple(scene["background"]))
    draw = ImageDraw.Draw(img)
    for obj in scene["objects"]:
        if obj["kind"] == "shape":
            _draw_shape(draw, obj)
        elif obj["kind"] == "word":
            draw.text(tuple(obj["origin"]), obj["text"], fill=COLORS[obj["color"]], font=_font(obj["font_size"]))
        elif obj["kind"] == "chart":
            _draw_chart(draw, obj)
    return img


# --------------------------------------------------------------------------- captions
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _reading_key(obj: dict):
    x0, y0 = obj["bbox"][0], obj["bbox"][1]
    return (QUADRANTS.index(obj["quadrant"]), y0, x0)


def caption_scene(scene: dict, rng: Optional[random.Random] = None) -> str:
    """One caption describing every object, in quadrant (reading) order, or in an order shuffled by `rng`.

    The generator shuffles: with one object per quadrant, reading order would name the quadrants in the same order in
    every caption, so "at the top left" would follow the first phrase whatever the image shows, and captioning
    (stage 1) would teach nothing about where things are."""
    objects = sorted(scene["objects"], key=_reading_key)
    if rng is not None:
        rng.shuffle(objects)
    parts = []
    for obj in objects:
        where = "at the " + obj["quadrant"]
        if obj["kind"] == "shape":
            parts.append("%s %s %s %s" % (_article(obj["color"]), obj["color"], obj["shape"], where))
        elif obj["kind"] == "word":
            parts.append("the word '%s' in %s %s" % (obj["text"], obj["color"], where))
        elif obj["kind"] == "chart":
            labels = [b["label"] for b in obj["bars"]]
            parts.append("a bar chart with bars %s and %s %s" % (", ".join(labels[:-1]), labels[-1], where))
    return ", ".join(parts) + "."


# --------------------------------------------------------------------------- questions
def _shapes(scene):
    return [o for o in scene["objects"] if o["kind"] == "shape"]


def _words(scene):
    return [o for o in scene["objects"] if o["kind"] == "word"]


def _chart(scene):
    for o in scene["objects"]:
        if o["kind"] == "chart":
            return o
    return None


def combo_frequencies(scenes: Iterable[dict]) -> Counter:
    """Number of images containing each (shape, color) combination."""
    freq: Counter = Counter()
    for sc in scenes:
        freq.update({(o["shape"], o["color"]) for o in _shapes(sc)})
    return freq


def _referents(scene) -> List[Tuple[str, dict]]:
    """Shapes that can be named unambiguously: 'circle' if unique type, else 'red circle' if unique combo."""
    shapes = _shapes(scene)
    by_shape = Counter(o["shape"] for o in shapes)
    by_combo = Counter((o["shape"], o["color"]) for o in shapes)
    out = []
    for o in shapes:
        if by_shape[o["shape"]] == 1:
            out.append((o["shape"], o))
        elif by_combo[(o["shape"], o["color"])] == 1:
            out.append(("%s %s" % (o["color"], o["shape"]), o))
    return out


def _q_attribute(scene, rng):
    shapes = _shapes(scene)
    words = _words(scene)
    by_shape = Counter(o["shape"] for o in shapes)
    by_color = Counter(o["color"] for o in shapes)
    word_colors = {w["color"] for w in words}
    options = []
    uniq_shape = [o for o in shapes if by_shape[o["shape"]] == 1]
    if uniq_shape:
        options.append("color_of_shape")
    uniq_color = [c for c, n in sorted(by_color.items()) if n == 1 and c not in word_colors]
    if uniq_color:
        options.append("shape_of_color")
    if words:
        options.append("color_of_word")
    if not options:
        return None
    kind = rng.choice(options)
    if kind == "color_of_shape":
        o = rng.choice(uniq_shape)
        return kind, "What color is the %s?" % o["shape"], o["color"]
    if kind == "shape_of_color":
        c = rng.choice(uniq_color)
        o = [s for s in shapes if s["color"] == c][0]
        return kind, "What shape is the %s object?" % c, o["shape"]
    w = rng.choice(words)
    return kind, "What color is the word %s?" % w["text"], w["color"]


def _balanced_pick(rng, counts: Dict[str, int]):
    """A (key, count) whose count is drawn uniformly from the distinct counts on offer, so that the answers are
    balanced and a model cannot score by answering the most common count (VQAv2's reason for balanced pairs)."""
    value = rng.choice(sorted(set(counts.values())))
    return rng.choice(sorted(k for k, n in counts.items() if n == value)), value


def _q_counting(scene, rng):
    shapes = _shapes(scene)
    kind = rng.choice(("count_color", "count_color", "count_shape", "count_shape", "count_all"))
    if kind == "count_all":
        return kind, "How many shapes are there?", str(len(shapes))
    if kind == "count_color":
        c, n = _balanced_pick(rng, {c: sum(o["color"] == c for o in shapes) for c in COLOR_NAMES})
        return kind, "How many %s shapes are there?" % c, str(n)
    s, n = _balanced_pick(rng, {s: sum(o["shape"] == s for o in shapes) for s in SHAPES})
    return kind, "How many %s are there?" % SHAPE_PLURALS[s], str(n)


def _existence_pair(scene, rng, pope_split: str, freq: Counter):
    shapes = _shapes(scene)
    present = {(o["shape"], o["color"]) for o in shapes}
    all_combos = [(s, c) for s in SHAPES for c in COLOR_NAMES]
    absent = [x for x in all_combos if x not in present]
    pos = rng.choice(sorted(present))
    if pope_split == "random":
        neg = rng.choice(absent)
    elif pope_split == "popular":
        ranked = sorted(absent, key=lambda x: (-freq.get(x, 0), all_combos.index(x)))
        neg = rng.choice(ranked[:3])
    elif pope_split == "adversarial":
        pshapes = {s for s, _ in present}
        pcolors = {c for _, c in present}
        conf = [x for x in absent if x[0] in pshapes or x[1] in pcolors]
        neg = rng.choice(conf or absent)
    else:  # pragma: no cover
        raise ValueError(pope_split)
    out = []
    for (s, c), ans in ((pos, "yes"), (neg, "no")):
        out.append(("exists", "Is there %s %s %s in the image?" % (_article(c), c, s), ans, (s, c)))
    return out


def _q_ocr(scene, rng):
    words = _words(scene)
    if not words:
        return None
    w = rng.choice(words)
    if rng.random() < 0.5:
        # words are placed in distinct quadrants, and never in the chart quadrant
        return "word_at_quadrant", "What word is written in the %s?" % w["quadrant"], w["text"]
    return "word_of_color", "What word is written in %s?" % w["color"], w["text"]


def _q_position(scene, rng):
    refs = _referents(scene)
    if not refs:
        return None
    S = scene["image_size"]
    min_gap = 16 * S / 256.0
    lr, ab = [], []
    for i, (na, a) in enumerate(refs):
        for j, (nb, b) in enumerate(refs):
            if i == j:
                continue
            if abs(a["center"][0] - b["center"][0]) >= min_gap:
                lr.append((na, a, nb, b))
            if abs(a["center"][1] - b["center"][1]) >= min_gap:
                ab.append((na, a, nb, b))
    options = ["quadrant_of", "quadrant_of"]  # 4-way answers weighted up against the 2-way comparisons
    if lr:
        options.append("left_right")
    if ab:
        options.append("above_below")
    kind = rng.choice(options)
    if kind == "quadrant_of":
        name, o = rng.choice(refs)
        return kind, "Which quadrant is the %s in?" % name, o["quadrant"]
    if kind == "left_right":
        na, a, nb, b = rng.choice(lr)
        ans = "left" if a["center"][0] < b["center"][0] else "right"
        return kind, "Is the %s to the left or right of the %s?" % (na, nb), ans
    na, a, nb, b = rng.choice(ab)
    ans = "above" if a["center"][1] < b["center"][1] else "below"
    return kind, "Is the %s above or below the %s?" % (na, nb), ans


def _q_chart(scene, rng):
    ch = _chart(scene)
    if ch is None:
        return None
    bars = ch["bars"]
    kind = rng.choice(("tallest", "shortest", "compare"))
    if kind == "tallest":
        return kind, "Which bar is the tallest?", max(bars, key=lambda b: b["value"])["label"]
    if kind == "shortest":
        return kind, "Which bar is the shortest?", min(bars, key=lambda b: b["value"])["label"]
    a, b = rng.sample(bars, 2)
    ans = a["label"] if a["value"] > b["value"] else b["label"]
    return kind, "Which bar is taller, %s or %s?" % (a["label"], b["label"]), ans


def _q_multiple_choice(scene, rng):
    shapes = _shapes(scene)
    words = _words(scene)
    by_shape = Counter(o["shape"] for o in shapes)
    by_color = Counter(o["color"] for o in shapes)
    word_colors = {w["color"] for w in words}
    refs = _referents(scene)
    cands = []
    uniq_shape = [o for o in shapes if by_shape[o["shape"]] == 1]
    if uniq_shape:
        cands.append("mc_color")
    uniq_color = [c for c, n in sorted(by_color.items()) if n == 1 and c not in word_colors]
    if uniq_color:
        cands.append("mc_shape")
    cands.append("mc_count")
    if words:
        cands.append("mc_word")
    if refs:
        cands.append("mc_quadrant")
    if _chart(scene) is not None:
        cands.append("mc_chart")
    kind = rng.choice(cands)
    if kind == "mc_color":
        o = rng.choice(uniq_shape)
        q, ans, pool = "What color is the %s?" % o["shape"], o["color"], COLOR_NAMES
    elif kind == "mc_shape":
        c = rng.choice(uniq_color)
        q = "What shape is the %s object?" % c
        ans, pool = [s for s in shapes if s["color"] == c][0]["shape"], SHAPES
    elif kind == "mc_count":
        # balanced answers, and the options are the 4 smallest counts that hold the answer, so that they do not give
        # it away: distractors drawn from 0-7 let a blind model pick the smallest non-zero option (85% right without
        # the image), and a window placed at random around the answer would make the smallest option a good guess
        c, n = _balanced_pick(rng, {c: by_color[c] for c in COLOR_NAMES})
        lo = max(0, n - 3)
        q, ans, pool = "How many %s shapes are there?" % c, str(n), tuple(str(k) for k in range(lo, lo + 4))
    elif kind == "mc_word":
        w = rng.choice(words)
        q, ans, pool = "What word is written in the %s?" % w["quadrant"], w["text"], WORDS
    elif kind == "mc_quadrant":
        name, o = rng.choice(refs)
        q, ans, pool = "Which quadrant is the %s in?" % name, o["quadrant"], QUADRANTS
    else:
        bars = _chart(scene)["bars"]
        q = "Which bar is the tallest?"
        ans, pool = max(bars, key=lambda b: b["value"])["label"], tuple(b["label"] for b in bars)
    distractors = [p for p in pool if p != ans]
    opts = [ans] + rng.sample(distractors, min(len(_LETTERS) - 1, len(distractors)))
    rng.shuffle(opts)
    letter = _LETTERS[opts.index(ans)]
    body = "\n".join("%s. %s" % (_LETTERS[i], o) for i, o in enumerate(opts))
    return kind, "%s\n%s\n%s" % (q, body, MC_SUFFIX), letter, opts


def make_questions(scene: dict, seed_parts: Sequence, families: Sequence[str], freq: Counter,
                   pope_split: str) -> List[dict]:
    """Question dicts ``{"family", "qtype", "question", "answer", ...}`` for one scene.

    Each family draws from its own RNG (seeded by ``seed_parts`` + family), so
    the questions of one family do not depend on which other families are on.
    """
    out: List[dict] = []
    for fam in FAMILIES:
        if fam not in families:
            continue
        rng = _rng(*seed_parts, "q", fam)
        if fam == "existence":
            for qtype, q, ans, combo in _existence_pair(scene, rng, pope_split, freq):
                out.append({"family": fam, "qtype": qtype, "question": q, "answer": ans,
                            "pope_split": pope_split, "target": list(combo)})
            continue
        fn = {
            "attribute": _q_attribute,
            "counting": _q_counting,
            "ocr": _q_ocr,
            "position": _q_position,
            "chart": _q_chart,
            "multiple_choice": _q_multiple_choice,
        }[fam]
        res = fn(scene, rng)
        if res is None:
            continue
        d = {"family": fam, "qtype": res[0], "question": res[1], "answer": res[2]}
        if fam == "multiple_choice":
            d["options"] = list(res[3])
        out.append(d)
    return out


# --------------------------------------------------------------------------- generation
def _params(n_train, n_val, n_test, seed, image_size, families, per_quadrant) -> dict:
    return {
        "per_quadrant": int(per_quadrant),
        "n_train": int(n_train),
        "n_val": int(n_val),
        "n_test": int(n_test),
        "seed": int(seed),
        "image_size": int(image_size),
        "families": list(families),
    }


def _read_manifest(out_dir: Path) -> Optional[dict]:
    try:
        with open(out_dir / "manifest.json", "r", encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("generator") != _GENERATOR_NAME:
        return None
    return m


def _complete(out_dir: Path, manifest: dict) -> bool:
    try:
        for split, info in manifest["splits"].items():
            for name in (f"{split}.jsonl", f"captions_{split}.jsonl", f"scenes_{split}.jsonl"):
                if not (out_dir / name).is_file():
                    return False
            img_dir = out_dir / "images" / split
            n = sum(1 for e in os.scandir(img_dir) if e.name.endswith(".png")) if img_dir.is_dir() else 0
            if n != info["images"]:
                return False
    except (KeyError, TypeError, OSError):
        return False
    return True


def _generate_split(root: Path, split: str, n: int, seed: int, image_size: int, families: Sequence[str],
                    progress: bool, per_quadrant: int = 0) -> dict:
    from tqdm.auto import tqdm

    img_dir = root / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    # pass 1: scenes (cheap metadata) -> dataset-level statistics for POPE "popular"
    scenes = [sample_scene(_rng(seed, split, i), image_size, per_quadrant) for i in range(n)]
    freq = combo_frequencies(scenes)
    fam_counts: Counter = Counter()
    pope_counts: Counter = Counter()
    yes_no: Counter = Counter()
    n_q = 0
    with open(root / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as fq, \
            open(root / f"captions_{split}.jsonl", "w", encoding="utf-8", newline="\n") as fc, \
            open(root / f"scenes_{split}.jsonl", "w", encoding="utf-8", newline="\n") as fs:
        for i in tqdm(range(n), desc=f"synthetic {split}", unit="img", disable=not progress, leave=False):
            scene = scenes[i]
            rel = f"images/{split}/{i:06d}.png"
            render_scene(scene).save(root / rel, format="PNG")
            fc.write(json.dumps({"image": rel, "caption": caption_scene(scene, _rng(seed, split, i, "caption"))},
                                ensure_ascii=False) + "\n")
            fs.write(json.dumps({"image": rel, **scene}, ensure_ascii=False) + "\n")
            pope_split = POPE_SPLITS[i % len(POPE_SPLITS)]
            for k, q in enumerate(make_questions(scene, (seed, split, i), families, freq, pope_split)):
                fam = q["family"]
                rec = {
                    "id": f"{split}-{i:06d}-{k:02d}",
                    "image": rel,
                    "conversations": [
                        {"from": "human", "value": "<image>\n" + q["question"]},
                        {"from": "gpt", "value": q["answer"]},
                    ],
                    "family": fam,
                    "scorer": SCORERS[fam],
                    "qtype": q["qtype"],
                }
                if fam == "existence":
                    rec["pope_split"] = q["pope_split"]
                    pope_counts[q["pope_split"]] += 1
                    yes_no[q["answer"]] += 1
                if "options" in q:
                    rec["options"] = q["options"]
                fq.write(json.dumps(rec, ensure_ascii=False) + "\n")
                fam_counts[fam] += 1
                n_q += 1
    return {
        "images": n,
        "questions": n_q,
        "captions": n,
        "families": {f: fam_counts[f] for f in FAMILIES if f in families},
        "pope_splits": {p: pope_counts[p] for p in POPE_SPLITS} if "existence" in families else {},
        "existence_answers": {a: yes_no[a] for a in ("yes", "no")} if "existence" in families else {},
    }


def generate_synthetic(
    out_dir,
    n_train: int = DEFAULT_SIZES["train"],
    n_val: int = DEFAULT_SIZES["val"],
    n_test: int = DEFAULT_SIZES["test"],
    seed: int = 0,
    image_size: int = 256,
    families: Optional[Sequence[str]] = None,
    progress: bool = True,
    per_quadrant: int = 0,
) -> dict:
    """Generate (or reuse) the synthetic benchmark in ``out_dir``; return the manifest.

    The returned dict is the content of ``manifest.json`` plus ``"out_dir"``
    (absolute path) and ``"reused"`` (True when an existing complete dataset
    with identical parameters and generator version was found; nothing is
    written then).  ``per_quadrant`` caps the objects per quadrant (see
    :func:`sample_scene`; 0 = no cap).

    Atomicity: everything is written into a hidden staging directory next to
    ``out_dir`` (``.<name>.tmp-*``) and moved into place with ``os.rename``
    once complete, ``manifest.json`` last.  An interrupted run leaves at most a
    stale staging directory, never a partial ``out_dir``.  An existing
    ``out_dir`` produced by this generator with different parameters is
    replaced; a non-empty ``out_dir`` that was not produced by it raises
    :class:`FileExistsError`.
    """
    if families is None:
        fams = list(FAMILIES)
    else:
        if isinstance(families, str):
            families = [families]
        unknown = sorted(set(families) - set(FAMILIES))
        if unknown:
            raise ValueError("unknown families %s; choose from %s" % (unknown, list(FAMILIES)))
        fams = [f for f in FAMILIES if f in families]
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    for k, v in sizes.items():
        if int(v) < 0:
            raise ValueError("n_%s must be >= 0" % k)
    if image_size < 64:
        raise ValueError("image_size must be >= 64")
    if int(per_quadrant) < 0:
        raise ValueError("per_quadrant must be >= 0 (0 = no cap)")
    params = _params(n_train, n_val, n_test, seed, image_size, fams, per_quadrant)

    out = Path(out_dir).absolute()
    existing = _read_manifest(out) if out.exists() else None
    if existing is not None and existing.get("version") == GENERATOR_VERSION \
            and existing.get("params") == params and _complete(out, existing):
        return {**existing, "out_dir": str(out), "reused": True}
    if out.exists() and existing is None:
        if not out.is_dir() or any(out.iterdir()):
            raise FileExistsError(
                "%s exists and is not a firebolt synthetic dataset (no manifest.json); refusing to overwrite" % out)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".%s.tmp-" % out.name, dir=str(out.parent)))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp creates 0700; give out_dir the usual permissions
    try:
        splits = {}
        for split, n in sizes.items():
            splits[split] = _generate_split(staging, split, int(n), int(seed), int(image_size), fams, progress,
                                            int(per_quadrant))
        manifest = {
            "generator": _GENERATOR_NAME,
            "version": GENERATOR_VERSION,
            "seed": int(seed),
            "params": params,
            "image_size": int(image_size),
            "scorers": {f: SCORERS[f] for f in fams},
            "splits": splits,
            "files": {
                "questions": "{split}.jsonl",
                "captions": "captions_{split}.jsonl",
                "scenes": "scenes_{split}.jsonl",
                "images": "images/{split}/{index:06d}.png",
            },
        }
        tmp_manifest = staging / "manifest.json.tmp"
        with open(tmp_manifest, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp_manifest, staging / "manifest.json")
        _install(staging, out, params)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    final = _read_manifest(out) or manifest
    return {**final, "out_dir": str(out), "reused": False}


def _install(staging: Path, out: Path, params: dict) -> None:
    """Move the complete staging directory to ``out`` (replacing an older generation)."""
    if out.exists():
        cur = _read_manifest(out)
        if cur is not None and cur.get("params") == params and cur.get("version") == GENERATOR_VERSION \
                and _complete(out, cur):
            shutil.rmtree(staging, ignore_errors=True)  # a concurrent run finished first
            return
        if cur is None and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            trash = out.parent / (".%s.old-%s" % (out.name, uuid.uuid4().hex[:8]))
            os.rename(out, trash)
            try:
                os.rename(staging, out)
            finally:
                shutil.rmtree(trash, ignore_errors=True)
            return
    try:
        os.rename(staging, out)
    except OSError:
        cur = _read_manifest(out)
        if cur is not None and cur.get("params") == params and _complete(out, cur):
            shutil.rmtree(staging, ignore_errors=True)
            return
        raise


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Generate the Firebolt synthetic fine-grained benchmark.")
    p.add_argument("out_dir")
    p.add_argument("--n-train", type=int, default=DEFAULT_SIZES["train"])
    p.add_argument("--n-val", type=int, default=DEFAULT_SIZES["val"])
    p.add_argument("--n-test", type=int, default=DEFAULT_SIZES["test"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--families", nargs="*", default=None, choices=FAMILIES)
    p.add_argument("--per-quadrant", type=int, default=0, help="objects per quadrant at most (0 = no cap)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    m = generate_synthetic(a.out_dir, a.n_train, a.n_val, a.n_test, a.seed, a.image_size, a.families,
                           progress=not a.no_progress, per_quadrant=a.per_quadrant)
    print(json.dumps({k: m[k] for k in ("out_dir", "reused", "splits")}, indent=2))


if __name__ == "__main__":
    main()
