"""Tests for the synthetic fine-grained benchmark generator (firebolt_vl.data.synthetic)."""

import json
import re
from collections import Counter, defaultdict

import pytest
from PIL import Image

from firebolt_vl.data import synthetic as syn
from firebolt_vl.data.synthetic import (
    COLORS,
    FAMILIES,
    MC_SUFFIX,
    POPE_SPLITS,
    QUADRANTS,
    SCORERS,
    SHAPES,
    combo_frequencies,
    generate_synthetic,
)

SIZES = dict(n_train=60, n_val=12, n_test=45)


def _read_jsonl(path):
    with open(path, "r", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _question(rec):
    human = rec["conversations"][0]["value"]
    assert human.startswith("<image>\n")
    return human[len("<image>\n"):]


def _answer(rec):
    return rec["conversations"][1]["value"]


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "d0"
    m = generate_synthetic(out, seed=0, progress=False, **SIZES)
    return out, m


def _scenes(out, split):
    return {s["image"]: s for s in _read_jsonl(out / f"scenes_{split}.jsonl")}


def test_layout_and_manifest(ds):
    out, m = ds
    assert m["reused"] is False
    man = json.loads((out / "manifest.json").read_text())
    assert man["seed"] == 0 and man["version"] == syn.GENERATOR_VERSION
    for split, n in (("train", SIZES["n_train"]), ("val", SIZES["n_val"]), ("test", SIZES["n_test"])):
        recs = _read_jsonl(out / f"{split}.jsonl")
        caps = _read_jsonl(out / f"captions_{split}.jsonl")
        assert len(caps) == n == man["splits"][split]["images"]
        assert len(recs) == man["splits"][split]["questions"]
        assert Counter(r["family"] for r in recs) == Counter(
            {k: v for k, v in man["splits"][split]["families"].items() if v})
        assert len(list((out / "images" / split).glob("*.png"))) == n
        for r in recs:
            assert set(r) >= {"id", "image", "conversations", "family", "scorer"}
            assert (out / r["image"]).is_file()
            assert r["image"].startswith(f"images/{split}/")
            assert [t["from"] for t in r["conversations"]] == ["human", "gpt"]
            assert r["conversations"][0]["value"].count("<image>") == 1
        assert len({r["id"] for r in recs}) == len(recs)
        for c in caps:
            assert c["caption"] and (out / c["image"]).is_file()
    # no leftovers from staging
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    with Image.open(out / "images/test/000000.png") as im:
        assert im.size == (256, 256) and im.mode == "RGB"


def test_captions_name_every_object_once_in_shuffled_order(ds):
    """Each caption phrase is one object of the scene at its own quadrant; the phrase order is seeded-random, so the
    n-th phrase does not give away the quadrant (reading order would start at the top left in nearly every caption)."""
    from firebolt_vl.demo.vision_pretrain import caption_phrases

    out, _ = ds
    scenes = _scenes(out, "train")
    first = Counter()
    for c in _read_jsonl(out / "captions_train.jsonl"):
        objs = scenes[c["image"]]["objects"]
        phrases = caption_phrases(c["caption"])
        assert len(phrases) == len(objs)
        assert Counter(q for _, q in phrases) == Counter(o["quadrant"] for o in objs)
        first[phrases[0][1]] += 1
    assert len(first) == 4 and max(first.values()) < 0.5 * sum(first.values())
    scene = next(iter(scenes.values()))
    ordered = syn.caption_scene(scene)  # no rng: reading order
    assert [q for _, q in caption_phrases(ordered)] == sorted((o["quadrant"] for o in scene["objects"]),
                                                             key=syn.QUADRANTS.index)


def test_reuse_returns_quickly(ds):
    out, m = ds
    before = (out / "train.jsonl").stat().st_mtime_ns
    m2 = generate_synthetic(out, seed=0, progress=False, **SIZES)
    assert m2["reused"] is True
    assert (out / "train.jsonl").stat().st_mtime_ns == before
    assert m2["splits"] == m["splits"]


def test_deterministic_same_seed(ds, tmp_path):
    out, _ = ds
    out2 = tmp_path / "again"
    generate_synthetic(out2, seed=0, progress=False, **SIZES)
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "captions_test.jsonl", "scenes_train.jsonl",
                 "manifest.json"):
        assert (out / name).read_bytes() == (out2 / name).read_bytes(), name
    for rel in ("images/train/000000.png", "images/train/000059.png", "images/test/000007.png"):
        with Image.open(out / rel) as a, Image.open(out2 / rel) as b:
            assert a.tobytes() == b.tobytes()


def test_different_seed_differs_and_splits_disjoint(ds, tmp_path):
    out, _ = ds
    out2 = tmp_path / "seed1"
    generate_synthetic(out2, seed=1, progress=False, **SIZES)
    assert (out / "train.jsonl").read_bytes() != (out2 / "train.jsonl").read_bytes()
    with Image.open(out / "images/train/000000.png") as a, Image.open(out2 / "images/train/000000.png") as b:
        assert a.tobytes() != b.tobytes()
    # splits come from disjoint seed streams: no identical scene across splits
    scenes = {}
    for split in ("train", "val", "test"):
        for s in _read_jsonl(out / f"scenes_{split}.jsonl"):
            key = json.dumps(s["objects"], sort_keys=True)
            assert key not in scenes, (split, scenes.get(key))
            scenes[key] = split


def test_families_and_answer_formats(ds):
    out, _ = ds
    recs = _read_jsonl(out / "train.jsonl") + _read_jsonl(out / "test.jsonl")
    assert {r["family"] for r in recs} == set(FAMILIES)
    for r in recs:
        fam, ans, q = r["family"], _answer(r), _question(r)
        assert r["scorer"] == SCORERS[fam]
        assert ("pope_split" in r) == (fam == "existence")
        assert len(q) < 200
        if fam == "existence":
            assert ans in ("yes", "no") and r["pope_split"] in POPE_SPLITS
        elif fam == "counting":
            assert re.fullmatch(r"\d", ans)
        elif fam == "multiple_choice":
            assert q.endswith("\n" + MC_SUFFIX)
            letters = re.findall(r"^([A-D])\. ", q, flags=re.M)
            assert letters == list("ABCD"[:len(letters)]) and len(letters) >= 3
            assert ans in letters
            assert len(r["options"]) == len(letters)
        elif fam == "position":
            assert ans in ("left", "right", "above", "below") + QUADRANTS
        else:
            assert re.fullmatch(r"[a-z]+", ans), (fam, ans)


def _check_answer(rec, scene, split_scenes):
    shapes = [o for o in scene["objects"] if o["kind"] == "shape"]
    words = [o for o in scene["objects"] if o["kind"] == "word"]
    chart = [o for o in scene["objects"] if o["kind"] == "chart"]
    q, ans, fam = _question(rec), _answer(rec), rec["family"]
    if fam == "multiple_choice":
        base, *opts = q.split("\n")[:-1]
        options = dict(o.split(". ", 1) for o in opts)
        assert options[ans] == rec["options"]["ABCD".index(ans)]
        # answer the base question as an open question
        fake = {"family": "mc", "conversations": [{"value": "<image>\n" + base}, {"value": options[ans]}]}
        return _check_answer(fake, scene, split_scenes)
    m = re.fullmatch(r"How many (\w+) shapes are there\?", q)
    if m:
        assert int(ans) == sum(o["color"] == m.group(1) for o in shapes)
        return "count_color"
    m = re.fullmatch(r"How many (\w+)s are there\?", q)
    if m:
        target = m.group(1)
        n = len(shapes) if target == "shape" else sum(o["shape"] == target for o in shapes)
        assert int(ans) == n
        return "count"
    m = re.fullmatch(r"What color is the (\w+)\?", q)
    if m:
        match = [o for o in shapes if o["shape"] == m.group(1)]
        assert len(match) == 1 and match[0]["color"] == ans
        return "color"
    m = re.fullmatch(r"What shape is the (\w+) object\?", q)
    if m:
        match = [o for o in shapes if o["color"] == m.group(1)]
        assert len(match) == 1 and match[0]["shape"] == ans
        assert not [w for w in words if w["color"] == m.group(1)]
        return "shape"
    m = re.fullmatch(r"What color is the word (\w+)\?", q)
    if m:
        assert [w["color"] for w in words if w["text"] == m.group(1)] == [ans]
        return "word_color"
    m = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", q)
    if m:
        present = any(o["color"] == m.group(1) and o["shape"] == m.group(2) for o in shapes)
        assert ans == ("yes" if present else "no")
        return "exists"
    m = re.fullmatch(r"What word is written in the (top left|top right|bottom left|bottom right)\?", q)
    if m:
        assert [w["text"] for w in words if w["quadrant"] == m.group(1)] == [ans]
        return "word_at"
    m = re.fullmatch(r"What word is written in (\w+)\?", q)
    if m:
        assert [w["text"] for w in words if w["color"] == m.group(1)] == [ans]
        return "word_of"

    def ref(name):
        parts = name.split()
        match = [o for o in shapes if o["shape"] == parts[-1] and (len(parts) == 1 or o["color"] == parts[0])]
        assert len(match) == 1, name
        return match[0]

    m = re.fullmatch(r"Which quadrant is the ([\w ]+) in\?", q)
    if m:
        o = ref(m.group(1))
        assert o["quadrant"] == ans
        # bbox really inside that quadrant
        S = scene["image_size"]
        qi = QUADRANTS.index(ans)
        x0, y0, x1, y1 = o["bbox"]
        assert (qi % 2) * S // 2 <= x0 < x1 <= (qi % 2 + 1) * S // 2
        assert (qi // 2) * S // 2 <= y0 < y1 <= (qi // 2 + 1) * S // 2
        return "quadrant"
    m = re.fullmatch(r"Is the ([\w ]+) to the left or right of the ([\w ]+)\?", q)
    if m:
        a, b = ref(m.group(1)), ref(m.group(2))
        assert ans == ("left" if a["center"][0] < b["center"][0] else "right")
        return "lr"
    m = re.fullmatch(r"Is the ([\w ]+) above or below the ([\w ]+)\?", q)
    if m:
        a, b = ref(m.group(1)), ref(m.group(2))
        assert ans == ("above" if a["center"][1] < b["center"][1] else "below")
        return "ab"
    if q.startswith("Which bar"):
        assert len(chart) == 1
        bars = {b["label"]: b["value"] for b in chart[0]["bars"]}
        if q == "Which bar is the tallest?":
            assert bars[ans] == max(bars.values())
        elif q == "Which bar is the shortest?":
            assert bars[ans] == min(bars.values())
        else:
            m = re.fullmatch(r"Which bar is taller, (\w+) or (\w+)\?", q)
            assert ans in m.groups() and bars[ans] == max(bars[g] for g in m.groups())
        return "chart"
    raise AssertionError("unrecognised question: %r" % q)


def test_answers_consistent_with_scene(ds):
    out, _ = ds
    seen = Counter()
    for split in ("train", "test"):
        scenes = _scenes(out, split)
        for r in _read_jsonl(out / f"{split}.jsonl"):
            seen[_check_answer(r, scenes[r["image"]], scenes)] += 1
    # every question template was exercised
    assert set(seen) >= {"count_color", "count", "color", "exists", "word_at", "quadrant", "chart"}


def test_rendered_pixels_match_scene(ds):
    out, _ = ds
    scenes = _scenes(out, "test")
    for rel, sc in list(scenes.items())[:15]:
        with Image.open(out / rel) as im:
            im = im.convert("RGB")
            for o in sc["objects"]:
                if o["kind"] == "shape":
                    x0, y0, x1, y1 = o["bbox"]
                    assert 16 <= x1 - x0 <= 36
                    cx, cy = int((x0 + x1) // 2), int((y0 + y1 + 1) // 2)
                    assert im.getpixel((cx, cy)) == COLORS[o["color"]], (rel, o)
                elif o["kind"] == "word":
                    x0, y0, x1, y1 = o["bbox"]
                    crop = im.crop((x0, y0, x1, y1))
                    assert COLORS[o["color"]] in {c for _, c in crop.getcolors(10000)}


def test_pope_negatives_absent_and_balanced(ds):
    out, _ = ds
    for split in ("train", "test"):
        scenes = _scenes(out, split)
        freq = combo_frequencies(scenes.values())
        recs = [r for r in _read_jsonl(out / f"{split}.jsonl") if r["family"] == "existence"]
        by_split = defaultdict(Counter)
        for r in recs:
            by_split[r["pope_split"]][_answer(r)] += 1
            sc = scenes[r["image"]]
            present = {(o["shape"], o["color"]) for o in sc["objects"] if o["kind"] == "shape"}
            color, shape = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", _question(r)).groups()
            if _answer(r) == "yes":
                assert (shape, color) in present
                continue
            assert (shape, color) not in present
            if r["pope_split"] == "adversarial":
                assert any(s == shape or c == color for s, c in present)
            elif r["pope_split"] == "popular":
                absent = sorted((f, k) for k, f in freq.items() if k not in present)
                all_absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in present]
                top = sorted(all_absent, key=lambda k: -freq.get(k, 0))
                assert freq.get((shape, color), 0) >= freq.get(top[2], 0), absent
        assert set(by_split) == set(POPE_SPLITS)
        for c in by_split.values():
            assert c["yes"] == c["no"] > 0


def test_family_subset_is_consistent(ds, tmp_path):
    out, _ = ds
    sub = tmp_path / "sub"
    m = generate_synthetic(sub, seed=0, families=["counting", "chart"], progress=False, **SIZES)
    assert m["params"]["families"] == ["counting", "chart"]
    full = [r for r in _read_jsonl(out / "train.jsonl") if r["family"] in ("counting", "chart")]
    part = _read_jsonl(sub / "train.jsonl")
    strip = lambda r: (r["image"], r["family"], r["conversations"])  # noqa: E731
    assert [strip(r) for r in part] == [strip(r) for r in full]
    assert (out / "images/train/000003.png").read_bytes() == (sub / "images/train/000003.png").read_bytes()
    with pytest.raises(ValueError):
        generate_synthetic(tmp_path / "bad", families=["nope"], progress=False, n_train=1, n_val=0, n_test=0)


def test_regenerates_on_param_change_and_refuses_foreign_dir(tmp_path):
    out = tmp_path / "d"
    generate_synthetic(out, n_train=4, n_val=1, n_test=2, progress=False)
    m = generate_synthetic(out, n_train=5, n_val=1, n_test=2, progress=False)
    assert m["reused"] is False and m["splits"]["train"]["images"] == 5
    assert len(list((out / "images/train").glob("*.png"))) == 5
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("x")
    with pytest.raises(FileExistsError):
        generate_synthetic(foreign, n_train=2, n_val=0, n_test=0, progress=False)
    assert (foreign / "precious.txt").read_text() == "x"


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "d"
    calls = {"n": 0}
    real = syn.render_scene

    def flaky(scene):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(scene)

    monkeypatch.setattr(syn, "render_scene", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic(out, n_train=10, n_val=2, n_test=2, progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(syn, "render_scene", real)
    m = generate_synthetic(out, n_train=10, n_val=2, n_test=2, progress=False)
    assert m["reused"] is False and (out / "manifest.json").is_file()


def test_per_quadrant_cap_small_images_and_balanced_counts(tmp_path):
    out = tmp_path / "capped"
    generate_synthetic(out, n_train=600, n_val=0, n_test=0, seed=3, image_size=128, per_quadrant=1, progress=False)
    scenes = _scenes(out, "train")
    for sc in scenes.values():
        per_quad = Counter(o["quadrant"] for o in sc["objects"])
        assert max(per_quad.values()) == 1 and sum(o["kind"] == "shape" for o in sc["objects"]) >= 2
        for o in sc["objects"]:  # the legibility floors bind at 128 px
            if o["kind"] == "shape":
                assert o["bbox"][2] - o["bbox"][0] >= syn._MIN_SHAPE
            elif o["kind"] == "word":
                assert o["font_size"] >= syn._MIN_FONT
    recs = _read_jsonl(out / "train.jsonl")
    for r in recs:
        _check_answer(r, scenes[r["image"]], scenes)
    # per-colour / per-shape counts: the answer is drawn uniformly over the distinct counts on offer, so no single
    # count dominates: over these 600 images the commonest count is 48.6% of the answers, while drawing the colour
    # (or shape) first would make "0" 62% of them (600 images give a ~2-point sampling spread; 150 gave 54%)
    counts = Counter(_answer(r) for r in recs if r["qtype"] in ("count_color", "count_shape"))
    assert len(counts) >= 3 and max(counts.values()) <= 0.55 * sum(counts.values())
    # multiple-choice counts: balanced answers; the options are the 4 smallest counts holding the answer, so they no
    # longer give it away (with distractors drawn from 0-7 the smallest non-zero option was nearly always right)
    mc = [r for r in recs if r["qtype"] == "mc_count"]
    assert len(mc) >= 10
    for r in mc:
        n = int(r["options"]["ABCD".index(_answer(r))])
        assert sorted(int(o) for o in r["options"]) == list(range(max(0, n - 3), max(0, n - 3) + 4))
    assert len({r["options"]["ABCD".index(_answer(r))] for r in mc}) >= 3  # "0" included: any colour is asked
    with pytest.raises(ValueError, match="per_quadrant"):
        generate_synthetic(tmp_path / "bad", n_train=1, n_val=0, n_test=0, per_quadrant=-1, progress=False)
