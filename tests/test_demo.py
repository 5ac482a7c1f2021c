"""`firebolt-vl demo`: the quick pipeline end to end (structure only, no accuracy), and its building blocks."""

import json

import pytest
import torch


def test_quadrant_phrases_and_view_texts():
    from firebolt_vl.demo.vision_pretrain import EMPTY_TILE, quadrant_phrases, view_texts

    cap = ("a bar chart with bars joe, eva and bob at the top left, the word 'cat' in blue at the top right, "
           "a red circle at the top right, an orange star at the bottom right.")
    per = quadrant_phrases(cap)
    assert per["top left"] == ["a bar chart with bars joe, eva and bob"]
    assert per["top right"] == ["the word 'cat' in blue", "a red circle"]
    assert per["bottom left"] == []
    assert per["bottom right"] == ["an orange star"]
    texts = view_texts(cap, 5, grid_2x2=True, global_view=True)
    assert texts[0] == ["a bar chart with bars joe, eva and bob", "the word 'cat' in blue", "a red circle",
                        "an orange star"]
    assert texts[1:] == [["a bar chart with bars joe, eva and bob"], ["the word 'cat' in blue", "a red circle"],
                         [EMPTY_TILE], ["an orange star"]]
    assert view_texts(cap, 5, grid_2x2=False, global_view=True)[1:] == [None] * 4


def test_cut_view_per_row_equals_cutting_every_view():
    """One view per row (the pretraining step's pairs) gives exactly the pixels of cutting all G views and picking
    one, for tiles (a plain crop) and the global view (resized), in any order of rows."""
    from types import SimpleNamespace

    from firebolt_vl.demo.vision_pretrain import cut_view_per_row, cut_views, normalize_uint8
    from firebolt_vl.vision import view_boxes

    geo = SimpleNamespace(image_size=32, tile_size=16, tile_overlap=0, grid_rows=2, grid_cols=2, add_global_view=True,
                          view_size=16)
    boxes = view_boxes(geo)
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    views = torch.tensor([0, 3, 1, 0, 4, 2, 3])
    expected = cut_views(normalize_uint8(images), boxes, 16)[torch.arange(7), views]
    assert torch.equal(cut_view_per_row(images, views, boxes, 16), expected)


def test_sigmoid_loss_prefers_matching_pairs():
    from firebolt_vl.demo.vision_pretrain import sigmoid_loss

    torch.manual_seed(0)
    x = torch.randn(4, 8)
    scale, bias = torch.tensor(2.3), torch.tensor(-5.0)
    eye = torch.eye(4, dtype=torch.bool)
    aligned = sigmoid_loss(x, x, eye, scale, bias)
    shuffled = sigmoid_loss(x, x.roll(1, 0), eye, scale, bias)
    assert aligned < shuffled
    # duplicates: identical texts count as positives of each other's views
    dup = torch.tensor([[True, True], [True, True]])
    assert sigmoid_loss(x[:2], x[:1].expand(2, -1), dup, scale, bias) < sigmoid_loss(
        x[:2], x[:1].expand(2, -1), torch.eye(2, dtype=torch.bool), scale, bias)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from firebolt_vl.demo.cli import demo

    out = tmp_path_factory.mktemp("demo") / "run"
    assert demo(output=str(out), quick=True, workers=1, no_progress=True) == 0
    return out


def test_quick_demo_report(quick_run):
    metrics = json.loads((quick_run / "metrics.json").read_text())
    families = metrics["families"]
    assert set(families) <= {"attribute", "existence", "counting", "ocr", "position", "chart", "multiple_choice"}
    assert "existence" in families and "attribute" in families
    assert set(metrics["accuracy"]) == {"firebolt", "blind", "prepend"}
    for name, table in metrics["accuracy"].items():
        assert set(table) == set(families) | {"overall"}
        assert all(0.0 <= v <= 100.0 for v in table.values())
        stages = metrics["models"][name]["stages"]
        assert set(stages) == {"stage1", "stage2"}
        for s in stages.values():
            assert s["samples_per_s"] > 0 and s["peak_memory_mb"] > 0
    assert metrics["gain_over_blind"] == pytest.approx(
        metrics["accuracy"]["firebolt"]["overall"] - metrics["accuracy"]["blind"]["overall"])
    assert {"data", "tokenizer", "pretrain", "encode", "models", "report", "total"} <= set(metrics["seconds"])
    assert set(metrics["seconds"]["per_model"]) == {"firebolt", "blind", "prepend"}
    assert metrics["vision_pretrain"]["samples_per_s"] > 0 and metrics["text_pretrain"]["samples_per_s"] > 0
    assert metrics["example"]["question"] and "answer" in metrics["example"]
    png = quick_run / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    n_test = metrics["n_test_questions"]
    for name in ("firebolt", "blind", "prepend"):
        lines = (quick_run / "predictions" / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == n_test
    for control in ("blind", "prepend"):
        assert (quick_run / "controls" / control / "config.json").is_file()


def test_quick_demo_model_dir_loads_and_cached_decoding_matches_generate(quick_run):
    from firebolt_vl.demo.pipeline import expand_prompts, greedy_generate
    from firebolt_vl.hub import load_model_dir

    model, processor = load_model_dir(quick_run / "model")
    assert model.config.fusion_type == "cmm"
    images = sorted((quick_run / "data" / "images" / "test").glob("*.png"))[:3]
    prompts = [processor.build_prompt(q, with_image=True)
               for q in ("What color is the circle?", "How many shapes are there?", "Is there a red star in the image?")]
    inputs = processor(prompts, images=[str(p) for p in images])
    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=4, ignore_eos=True)
        x_v = model.encode_images(inputs["pixel_values"])
        enc = expand_prompts(processor, prompts)
        assert torch.equal(enc["input_ids"], inputs["input_ids"])
        # the demo's evaluation path: grid embeddings computed once, then fuse -> prefill -> decode_step
        ours = greedy_generate(model, enc["input_ids"], enc["attention_mask"], x_v, max_new_tokens=4,
                               stop_at_eos=False)
    assert torch.equal(ours, reference)


def test_jobs_run_in_worker_processes(tmp_path):
    """The pipeline's job runner: two jobs in two `python -m firebolt_vl.demo.worker` processes, results in order."""
    from firebolt_vl.demo.pipeline import DemoConfig, DemoPaths, run_jobs
    from firebolt_vl.demo.text_pretrain import TextPretrainConfig
    from firebolt_vl.presets import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(300)
    cfg = DemoConfig.quick(text=TextPretrainConfig(epochs=0.0))
    jobs = []
    for k in range(2):
        paths = DemoPaths(out=tmp_path / f"r{k}", data=tmp_path / "data", work=tmp_path / f"r{k}")
        tokenizer.save_pretrained(paths.tokenizer)
        jobs.append(("language", (cfg, paths, False, k)))
    assert run_jobs(jobs, workers=2, threads=1, scratch=tmp_path / "jobs") == [{}, {}]
    for k in range(2):
        assert (tmp_path / f"r{k}" / "language" / "config.json").is_file()
    with pytest.raises(RuntimeError, match="failed"):
        bad = DemoPaths(out=tmp_path / "bad", data=tmp_path / "data", work=tmp_path / "missing")
        run_jobs([("language", (cfg, bad, False, 0))] * 2, workers=2, threads=1, scratch=tmp_path / "jobs")


def test_demo_cli_rejects_bad_arguments(tmp_path):
    from firebolt_vl.cli import build_parser
    from firebolt_vl.demo.cli import demo

    args = vars(build_parser().parse_args(["demo", "--quick", "--output", str(tmp_path), "--models", "firebolt"]))
    assert args["quick"] and args["models"] == "firebolt"
    with pytest.raises(ValueError, match="--models"):
        demo(output=str(tmp_path), quick=True, models="firebolt,oracle")
    with pytest.raises(ValueError, match="--n-train"):
        demo(output=str(tmp_path), quick=True, n_train=0)
    with pytest.raises(ValueError, match="--pretrain-threads"):
        demo(output=str(tmp_path), quick=True, pretrain_threads=0)
    args = vars(build_parser().parse_args(["demo", "--pretrain-threads", "1"]))
    assert args["pretrain_threads"] == 1
    with pytest.raises(SystemExit):  # argparse: the sizes exclude each other
        build_parser().parse_args(["demo", "--quick", "--full"])
    with pytest.raises(ValueError, match="exclude"):
        demo(output=str(tmp_path), quick=True, full=True)


def test_demo_sizes():
    """The command's default is the small demo (fewer images and steps than the full one, all phases and models)."""
    from firebolt_vl.demo.pipeline import MODELS, DemoConfig

    small, full = DemoConfig.small(), DemoConfig()
    assert (small.size, full.size, DemoConfig.quick().size) == ("small", "full", "quick")
    assert small.n_train < full.n_train and small.vision.max_steps < full.vision.max_steps
    assert small.stage2.epochs <= full.stage2.epochs and small.models == full.models == MODELS
    assert small.families is None  # every question family, as the full demo


def test_pack_turns_groups_questions_of_one_image():
    from firebolt_vl.demo.pipeline import pack_turns

    recs = [{"image": f"img{i % 3}.png", "conversations": [{"from": "human", "value": f"<image>\nq{i}?"},
                                                             {"from": "gpt", "value": f"a{i}"}]} for i in range(10)]
    assert pack_turns(recs, 1, 0) is recs
    packed = pack_turns(recs, 3, 0)
    assert len(packed) == 4  # images with 4, 3, 3 questions in chunks of <= 3: 2 + 1 + 1
    pairs = set()
    for r in packed:
        conv = r["conversations"]
        assert 2 <= len(conv) <= 6 and [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in conv) == 1
        for h, a in zip(conv[::2], conv[1::2]):
            q = h["value"].replace("<image>\n", "")
            assert q[1:-1] == a["value"][1:]  # each answer stays with its question
            pairs.add((r["image"], q))
    assert pairs == {(f"img{i % 3}.png", f"q{i}?") for i in range(10)}
    assert pack_turns(recs, 3, 0) == packed and pack_turns(recs, 3, 1) != packed  # seeded order
