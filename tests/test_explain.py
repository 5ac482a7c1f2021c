"""`firebolt-vl explain`: the CMM's token-to-grid weights per token / word / overall, the heat over view boxes, the
picture, and a clear error for fusion types without a CMM."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from firebolt_vl.cli import main
from firebolt_vl.serve.explain import explain_weights, heat_map, render_explanation
from firebolt_vl.vision import view_boxes

PROMPT = "What color is the circle on the left?"


def test_weights_match_the_model(tiny_factory, red_image):
    model, processor = tiny_factory()
    result = explain_weights(model, processor, red_image, PROMPT)
    G = model.config.num_grids
    assert result.token_weights.shape == (len(result.tokens), G)
    assert "".join(result.tokens) == PROMPT  # the prompt's tokens cover exactly the prompt
    assert result.words == PROMPT.split()
    enc = processor(processor.build_prompt(PROMPT, True), images=red_image)
    with torch.no_grad():
        full = model(**enc, output_cmm_weights=True).cmm_weights[0].numpy()  # (T, G)
    np.testing.assert_allclose(result.token_weights, full[result.prompt_positions], atol=1e-6)
    np.testing.assert_allclose(result.sequence_weights, full, atol=1e-6)
    np.testing.assert_allclose(result.token_weights.sum(-1), 1.0, atol=1e-5)  # softmax over the kept grids
    kept = model.config.cmm_heads * model.config.cmm_top_k
    assert ((result.token_weights > 0).sum(-1) <= min(G, kept)).all()
    np.testing.assert_allclose(result.overall, result.token_weights.mean(0), atol=1e-6)
    # a word's weights are the mean over the tokens that make it up
    start = 0
    for word, weights in zip(result.words, result.word_weights):
        pos = PROMPT.index(word, start)
        offsets = np.cumsum([0] + [len(t) for t in result.tokens])
        rows = [j for j in range(len(result.tokens)) if offsets[j] < pos + len(word) and offsets[j + 1] > pos]
        np.testing.assert_allclose(weights, result.token_weights[rows].mean(0), atol=1e-6)
        start = pos + len(word)
    assert result.boxes == view_boxes(model.config)
    d = result.to_dict()
    assert d["views"][0] == "global" and len(d["views"]) == G and json.dumps(d)


def test_heat_map_follows_the_view_boxes(tiny_factory):
    model, _ = tiny_factory()
    boxes, S = view_boxes(model.config), model.config.image_size  # global + 2x2 tiles of 32 px in 64 px, overlap 2
    H, W = 80, 96  # the picture's own size: boxes are scaled from S x S
    only_global = heat_map(np.eye(len(boxes))[0], boxes, S, H, W)
    np.testing.assert_allclose(only_global, 1.0)
    tile = 4  # bottom-right tile: rows 30..62, cols 30..62 of 64
    heat = heat_map(np.eye(len(boxes))[tile], boxes, S, H, W)
    y0, x0, y1, x1 = boxes[tile]
    r0, r1, c0, c1 = round(y0 * H / S), round(y1 * H / S), round(x0 * W / S), round(x1 * W / S)
    assert heat[r0:r1, c0:c1].min() > 0 and heat.sum() == pytest.approx(heat[r0:r1, c0:c1].sum())
    assert heat[:r0].max() == 0 and heat[:, :c0].max() < 1  # the overlap with its neighbours is averaged
    both = heat_map(np.array([0.0, 0.5, 0.5, 0.0, 0.0]), boxes, S, S, S)  # tiles 0 and 1 overlap in cols 30..32
    assert both[5, 31] == pytest.approx(0.5) and both[5, 10] == pytest.approx(0.5) and both[40, 10] == 0


def test_render_writes_a_picture(tiny_factory, red_image, tmp_path):
    model, processor = tiny_factory()
    result = explain_weights(model, processor, red_image, PROMPT)
    out = render_explanation(red_image, result, tmp_path / "sub" / "explain.png", max_words=3)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 200
    assert [p.name for p in out.parent.iterdir()] == ["explain.png"]  # no temp files left


def test_no_cmm_is_a_clear_error(tiny_factory, red_image):
    model, processor = tiny_factory(fusion_type="prepend")
    with pytest.raises(ValueError, match="fusion_type 'prepend'"):
        explain_weights(model, processor, red_image, PROMPT)


def test_explain_command(tiny_factory, red_image, tmp_path, capsys):
    from firebolt_vl.hub import save_model_dir

    model, processor = tiny_factory()
    save_model_dir(model, processor, tmp_path / "cmm")
    red_image.save(tmp_path / "red.png")
    args = ["explain", "--model", str(tmp_path / "cmm"), "--image", str(tmp_path / "red.png"), "--prompt", PROMPT,
            "--output", str(tmp_path / "out.png"), "--json", str(tmp_path / "out.json"), "--device", "cpu"]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["words"] == PROMPT.split() and len(data["overall"]) == model.config.num_grids
    assert Image.open(tmp_path / "out.png").format == "PNG"

    prepend, pproc = tiny_factory(fusion_type="prepend")
    save_model_dir(prepend, pproc, tmp_path / "prepend")
    args[2] = str(tmp_path / "prepend")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: explain needs a model with the Cross-Modal Modulator") and "\n" not in err
