"""Tests for the training-data readers (firebolt_vl.data.formats)."""

import io
import json
import logging
import tarfile

import pytest
from PIL import Image, ImageFile

from firebolt_vl.data import formats as fmt
from firebolt_vl.data.formats import (
    CAPTION_PROMPTS,
    CaptionReader,
    ConversationReader,
    PreferenceReader,
    WebDatasetCaptionReader,
    open_dataset,
)


def _png(path, color=(255, 0, 0), size=(20, 12)):
    Image.new("RGB", size, color).save(path, format="PNG")
    return path


def _jpeg_bytes(color=(0, 128, 255), size=(64, 48)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_jsonl(path, recs):
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return path


def _conv_records(tmp_path):
    (tmp_path / "imgs").mkdir()
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "imgs" / "b.png", color=(0, 255, 0))
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return [
        {"id": "r0", "image": "imgs/a.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]},
        {"id": "r1", "image": "imgs/b.png",  # no <image> placeholder, role/content keys
         "conversations": [{"role": "user", "content": "Describe."}, {"role": "assistant", "content": "green"},
                           {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "yes"}]},
        {"id": "r2",  # text-only
         "conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello"}]},
        {"id": "r3", "image": "imgs/missing.png",
         "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "r4", "image": "imgs/broken.png",
         "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "r5", "image": "imgs/a.png", "conversations": [{"from": "human", "value": "only a question"}]},
        {"id": "r6", "image": "imgs/a.png", "family": "ocr", "scorer": "vqa",
         "conversations": [{"from": "human", "value": "Read it.\n<image>"}, {"from": "gpt", "value": "cat"}]},
    ]


def _check_conversation_reader(reader, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="firebolt_vl.data.formats"):
        recs = list(reader)
    assert [r["id"] for r in recs] == ["r0", "r1", "r2", "r6"]
    assert reader.stats == {"ok": 4, "skipped_missing": 1, "skipped_corrupt": 1, "skipped_invalid": 1}
    r0, r1, r2, r6 = recs
    assert isinstance(r0["image"], Image.Image) and r0["image"].mode == "RGB" and r0["image"].size == (20, 12)
    assert r0["image"].getpixel((0, 0)) == (255, 0, 0)
    assert r0["conversations"] == [{"from": "human", "value": "<image>\nWhat color?"},
                                   {"from": "gpt", "value": "red"}]
    assert r1["conversations"][0] == {"from": "human", "value": "<image>\nDescribe."}
    assert [t["from"] for t in r1["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert r2["image"] is None and "<image>" not in r2["conversations"][0]["value"]
    assert r6["conversations"][0]["value"] == "Read it.\n<image>"
    assert r6["meta"] == {"family": "ocr", "scorer": "vqa"}
    assert all(r["source"] == reader.source for r in recs)
    # warnings name the files
    text = caplog.text
    assert str(tmp_path / "imgs" / "missing.png") in text and str(tmp_path / "imgs" / "broken.png") in text
    # a second pass counts again but does not warn again
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="firebolt_vl.data.formats"):
        assert len(list(reader)) == 4
    assert "missing.png" not in caplog.text
    assert reader.stats["skipped_missing"] == 2


def test_llava_json_list(tmp_path, caplog):
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(_conv_records(tmp_path)))
    reader = open_dataset(path)
    assert isinstance(reader, ConversationReader) and len(reader) == 7
    _check_conversation_reader(reader, tmp_path, caplog)


def test_llava_jsonl_with_image_root(tmp_path, caplog):
    recs = _conv_records(tmp_path)
    sub = tmp_path / "ann"
    sub.mkdir()
    path = _write_jsonl(sub / "llava.jsonl", recs)
    with open(path, "a") as f:
        f.write("\n")  # blank lines are ignored
    reader = open_dataset(str(path), image_root=tmp_path, source="llava")
    assert isinstance(reader, ConversationReader) and reader.source == "llava" and len(reader) == 7
    _check_conversation_reader(reader, tmp_path, caplog)
    # default image_root is the file's folder -> every image is missing there
    r2 = open_dataset(path)
    assert [r["id"] for r in r2] == ["r2"] and r2.stats["skipped_missing"] == 5


def test_bad_json_line_counted(tmp_path):
    _png(tmp_path / "a.png")
    path = tmp_path / "d.jsonl"
    good = {"image": "a.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path.write_text(json.dumps(good) + "\n{not json\n" + json.dumps(good) + "\n")
    reader = ConversationReader(path)
    recs = list(reader)
    assert len(recs) == 2 and reader.stats["skipped_invalid"] == 1
    assert recs[0]["id"] == "d:1" and recs[1]["id"] == "d:3"


def _make_tar(path, samples):
    with tarfile.open(path, "w") as tf:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _wds_shard(tmp_path, name="00000.tar", start=0):
    good = _jpeg_bytes()
    truncated = _jpeg_bytes(color=(200, 10, 10), size=(96, 96))
    truncated = truncated[: len(truncated) // 2]
    samples = [
        ("%09d.jpg" % start, good), ("%09d.txt" % start, b"a blue picture"),
        ("%09d.json" % start, b'{"url": "http://x"}'),
        ("%09d.jpg" % (start + 1), truncated), ("%09d.txt" % (start + 1), b"a truncated picture"),
        ("%09d.png" % (start + 2), _png(tmp_path / "tmp.png", (0, 0, 255)).read_bytes()),
        ("%09d.txt" % (start + 2), "une légende\n".encode("utf-8")),
    ]
    return _make_tar(tmp_path / name, samples)


def test_webdataset_tar_skips_truncated(tmp_path, caplog):
    shard = _wds_shard(tmp_path)
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # someone else set it: the reader must still detect truncation
    try:
        reader = open_dataset(str(shard))
        assert isinstance(reader, WebDatasetCaptionReader)
        with caplog.at_level(logging.WARNING, logger="firebolt_vl.data.formats"):
            recs = list(reader)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    assert len(recs) == 2
    assert reader.stats["ok"] == 2 and reader.stats["skipped_corrupt"] == 1
    assert reader.stats["skipped_missing"] == 0
    assert "000000001.jpg" in caplog.text and str(shard) in caplog.text
    r0, r2 = recs
    assert r0["image"].size == (64, 48) and r0["image"].mode == "RGB"
    assert r0["conversations"][1] == {"from": "gpt", "value": "a blue picture"}
    assert r2["conversations"][1]["value"] == "une légende"
    for r in recs:
        human = r["conversations"][0]["value"]
        assert human.startswith("<image>\n") and human[len("<image>\n"):] in CAPTION_PROMPTS
    assert r0["id"] == "00000.tar/000000000" and r0["index"] == 0 and r2["index"] == 2
    # deterministic prompt choice
    assert [r["conversations"] for r in open_dataset(str(shard))] == [r["conversations"] for r in recs]


def test_webdataset_brace_list_dir_and_sharding(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    _wds_shard(d, "00000.tar", 0)
    _wds_shard(d, "00001.tar", 3)
    pattern = str(d / "{00000..00001}.tar")
    for spec in (pattern, [str(d / "00000.tar"), str(d / "00001.tar")], str(d)):
        reader = open_dataset(spec)
        ids = [r["id"] for r in reader]
        assert ids == ["00000.tar/000000000", "00000.tar/000000002", "00001.tar/000000003",
                       "00001.tar/000000005"], spec
        assert reader.stats["skipped_corrupt"] == 2
    base = open_dataset(pattern)
    s0 = [r["id"] for r in base.shard(0, 2)]
    s1 = [r["id"] for r in base.shard(1, 2)]
    assert sorted(s0 + s1) == sorted(ids) and not set(s0) & set(s1)
    f1 = [r["id"] for r in base.shard(1, 2, by="file")]
    assert f1 == ["00001.tar/000000003", "00001.tar/000000005"]
    # resume: skip the first 3 entries (6 samples in total, one corrupt per shard)
    assert [r["id"] for r in base.skip(3)] == ["00001.tar/000000003", "00001.tar/000000005"]
    with pytest.raises(FileNotFoundError, match="00002.tar"):
        open_dataset(str(d / "{00000..00002}.tar"))


def test_webdataset_sample_without_image_is_missing(tmp_path):
    shard = _make_tar(tmp_path / "x.tar", [("a.txt", b"caption only"), ("b.png", _png(tmp_path / "p.png").read_bytes()),
                                          ("b.txt", b"ok")])
    reader = WebDatasetCaptionReader(str(shard))
    assert [r["id"] for r in reader] == ["x.tar/b"]
    assert reader.stats["skipped_missing"] == 1


def test_truncated_tar_shard_is_counted(tmp_path):
    shard = _wds_shard(tmp_path)
    data = shard.read_bytes()
    with tarfile.open(shard) as tf:
        offsets = {m.name: (m.offset, m.offset_data) for m in tf.getmembers()}
    # cut inside the data of the second sample's image, and inside a header
    # (a cut header is only noticed at the end: the pending sample is dropped, it may be incomplete)
    for cut, expected in ((offsets["000000001.jpg"][1] + 100, ["cut.tar/000000000"]),
                          (offsets["000000001.jpg"][0] + 100, [])):
        bad = tmp_path / "cut.tar"
        bad.write_bytes(data[:cut])
        reader = WebDatasetCaptionReader(str(bad))
        recs = list(reader)
        assert reader.stats["corrupt_shards"] == 1, cut
        assert [r["id"] for r in recs] == expected, cut
    # a shard cut after the last member (end-of-archive marker lost) is flagged too
    bad.write_bytes(data[: offsets["000000002.txt"][1] + 512])
    reader = WebDatasetCaptionReader(str(bad))
    assert [r["id"] for r in reader] == ["cut.tar/000000000"] and reader.stats["corrupt_shards"] == 1


def test_caption_jsonl(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png", (1, 2, 3))
    path = _write_jsonl(tmp_path / "caps.jsonl", [
        {"image": "a.png", "caption": "a red square"},
        {"image": "b.png", "caption": "  a dark square "},
        {"image": "c.png", "caption": "missing"},
        {"image": "a.png", "caption": ""},
    ])
    reader = open_dataset(path)
    assert isinstance(reader, CaptionReader)
    recs = list(reader)
    assert [r["conversations"][1]["value"] for r in recs] == ["a red square", "a dark square"]
    assert reader.stats == {"ok": 2, "skipped_missing": 1, "skipped_corrupt": 0, "skipped_invalid": 1}
    for r in recs:
        assert r["conversations"][0]["value"][len("<image>\n"):] in CAPTION_PROMPTS
    assert recs[0]["conversations"][0]["value"] == "<image>\n" + fmt.caption_prompt("a.png")


def test_mmpr_preference_jsonl(tmp_path):
    _png(tmp_path / "a.png")
    path = _write_jsonl(tmp_path / "mmpr.jsonl", [
        {"image": "a.png", "question": "<image>\nWhat is shown?", "chosen": "A red box.", "rejected": "A cat."},
        {"image": "a.png", "question": "Color?", "chosen": "red", "rejected": "blue"},
        {"question": "2+2?", "chosen": "4", "rejected": "5"},
        {"image": "nope.png", "question": "Q", "chosen": "x", "rejected": "y"},
    ])
    reader = open_dataset(path)
    assert isinstance(reader, PreferenceReader) and len(reader) == 4
    recs = list(reader)
    assert len(recs) == 3 and reader.stats["skipped_missing"] == 1
    assert recs[0]["conversations"] == [{"from": "human", "value": "<image>\nWhat is shown?"},
                                        {"from": "gpt", "value": "A red box."}]
    assert recs[0]["rejected"] == "A cat."
    assert recs[1]["conversations"][0]["value"] == "<image>\nColor?"
    assert recs[2]["image"] is None and recs[2]["conversations"][1]["value"] == "4"


def test_exif_orientation_and_modes(tmp_path):
    im = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    im.save(tmp_path / "rot.jpg", exif=exif)
    Image.new("L", (8, 8), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (8, 8), (1, 2, 3, 4)).save(tmp_path / "rgba.png")
    out = fmt.load_image(tmp_path / "rot.jpg")
    assert out.size == (20, 40) and out.mode == "RGB"
    assert fmt.load_image(tmp_path / "gray.png").mode == "RGB"
    assert fmt.load_image((tmp_path / "rgba.png").read_bytes()).mode == "RGB"


def test_missing_files_raise(tmp_path):
    for name in ("nope.json", "nope.jsonl", "nope.tar"):
        with pytest.raises(FileNotFoundError, match=name):
            open_dataset(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        ConversationReader(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError):
        open_dataset(tmp_path / "x.json", kind="bogus")


def test_shard_skip_len_and_workers(tmp_path, monkeypatch):
    _png(tmp_path / "a.png")
    recs = [{"id": str(i), "image": "a.png",
             "conversations": [{"from": "human", "value": "q%d" % i}, {"from": "gpt", "value": "a"}]}
            for i in range(10)]
    path = _write_jsonl(tmp_path / "d.jsonl", recs)
    base = open_dataset(path)
    assert len(base) == 10
    shards = [base.shard(r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [4, 3, 3]
    got = [[r["id"] for r in s] for s in shards]
    assert got == [["0", "3", "6", "9"], ["1", "4", "7"], ["2", "5", "8"]]
    # resume inside a shard
    s0 = base.shard(0, 3)
    it = iter(s0)
    first = [next(it)["index"] for _ in range(2)]
    assert first == [0, 1] and s0.position == 2
    resumed = base.shard(0, 3).skip(s0.position)
    assert [r["id"] for r in resumed] == ["6", "9"] and len(resumed) == 2
    assert [r["index"] for r in base.shard(0, 3).skip(2)] == [2, 3]
    # composing shards
    assert [r["id"] for r in base.shard(1, 2).shard(1, 2)] == ["3", "7"]
    with pytest.raises(ValueError):
        base.skip(1).shard(0, 2)
    # DataLoader-style worker split of the remaining entries
    monkeypatch.setattr(fmt, "_worker_split", lambda: (1, 2))
    assert [r["id"] for r in base.skip(1)] == ["2", "4", "6", "8"]
    assert [r["id"] for r in ConversationReader(path, split_workers=False).skip(1)] == [str(i) for i in range(1, 10)]


def test_reads_synthetic_output(tmp_path):
    from firebolt_vl.data.synthetic import generate_synthetic

    out = tmp_path / "syn"
    generate_synthetic(out, n_train=3, n_val=0, n_test=2, progress=False)
    q = open_dataset(out / "test.jsonl")
    recs = list(q)
    assert recs and q.stats["ok"] == len(recs) and q.stats["skipped_missing"] == 0
    assert recs[0]["image"].size == (256, 256)
    assert {"family", "scorer"} <= set(recs[0]["meta"])
    caps = open_dataset(out / "captions_train.jsonl")
    assert isinstance(caps, CaptionReader) and len(list(caps)) == 3
