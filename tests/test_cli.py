"""The command line: build and generate end to end, and one-line errors with a non-zero exit."""

import subprocess
import sys

import pytest
from PIL import Image

from firebolt_vl.testing import truncated_jpeg


def run(*args):
    return subprocess.run([sys.executable, "-m", "firebolt_vl.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "model"
    r = run("build", "--preset", "tiny", "--output", str(out))
    assert r.returncode == 0, r.stderr
    return out


def test_build_and_generate(built, tmp_path):
    assert (built / "model.safetensors").is_file() and (built / "processor_config.json").is_file()
    img = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (255, 0, 0)).save(img)
    r = run("generate", "--model", str(built), "--image", str(img), "--prompt", "What color?", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    r2 = run("generate", "--model", str(built), "--prompt", "Hello", "--max-new-tokens", "3")
    assert r2.returncode == 0, r2.stderr


@pytest.mark.parametrize(
    "case, expected",
    [("missing_image", "image file not found"), ("corrupt_image", "corrupt or truncated"),
     ("bad_model", "model directory not found"), ("not_a_model", "config.json is missing")],
)
def test_errors_are_one_line(built, tmp_path, case, expected):
    model, image = str(built), None
    if case == "missing_image":
        image = str(tmp_path / "nope.png")
    elif case == "corrupt_image":
        image = tmp_path / "bad.jpg"
        image.write_bytes(truncated_jpeg())
    elif case == "bad_model":
        model = str(tmp_path / "no_model")
    else:
        model = str(tmp_path)
    args = ["generate", "--model", model, "--prompt", "hi"] + (["--image", str(image)] if image else [])
    r = run(*args)
    assert r.returncode == 2
    assert expected in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def _dual_encoder_checkpoint(directory, kind: str):
    """A SigLIP (`siglip`) or SigLIP2 (`siglip2`) dual encoder saved as the hub's checkpoints are: text tower, logit
    scale and bias included, config with nested text/vision configs."""
    import torch
    from transformers import Siglip2Config, Siglip2Model, SiglipConfig, SiglipModel

    from firebolt_vl.presets import tiny_vision_config

    torch.manual_seed(0)
    vision = {k: v for k, v in tiny_vision_config(kind).items() if k != "model_type"}
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16)
    config_cls, model_cls = (Siglip2Config, Siglip2Model) if kind == "siglip2" else (SiglipConfig, SiglipModel)
    model_cls(config_cls(text_config=text, vision_config=vision)).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("kind", ["siglip", "siglip2"])
def test_build_from_real_layout_checkpoints_then_generate(tmp_path, kind):
    """`firebolt-vl build` from a hub-layout SigLIP/SigLIP2 dual encoder and an LFM2 checkpoint with its tokenizer, then
    `firebolt-vl generate` on an RGB and a palette image; a truncated image and a missing directory are one line each."""
    from firebolt_vl.presets import write_component_checkpoints

    _, language = write_component_checkpoints(tmp_path / "components")
    vision = _dual_encoder_checkpoint(tmp_path / "components" / f"{kind}-dual", kind)
    out = tmp_path / "model"
    r = run("build", "--vision", str(vision), "--language", str(language), "--output", str(out), "--image-size", "64",
            "--tile-size", "32", "--cmm-heads", "2", "--cmm-head-dim", "8", "--d-state", "16")
    assert r.returncode == 0, r.stderr
    rgb, palette = tmp_path / "rgb.jpg", tmp_path / "palette.png"
    Image.new("RGB", (48, 40), (10, 200, 30)).save(rgb)
    Image.new("RGB", (30, 50), (200, 10, 30)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(palette)
    assert Image.open(palette).mode == "P"
    for image in (rgb, palette):
        r = run("generate", "--model", str(out), "--image", str(image), "--prompt", "What color?", "--max-new-tokens", "3")
        assert r.returncode == 0, r.stderr
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(truncated_jpeg())
    for args, expected in ((["--model", str(out), "--image", str(bad)], "corrupt or truncated"),
                           (["--model", str(tmp_path / "absent")], "model directory not found")):
        r = run("generate", *args, "--prompt", "hi")
        assert r.returncode == 2 and expected in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_package_name_does_not_collide_with_firebolt_sdk(tmp_path):
    """`firebolt-sdk` installs a top-level `firebolt` package and `firebolt-cli` a `firebolt` command: ours are
    `firebolt_vl` and `firebolt-vl`, and nothing of ours imports a module named `firebolt`. With a stand-in `firebolt`
    package first on the path (as an installed SDK would be), `import firebolt_vl` and its CLI still work."""
    import ast
    import os
    import tomllib
    from pathlib import Path

    import firebolt_vl

    root = Path(firebolt_vl.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            assert not any(n == "firebolt" or n.startswith("firebolt.") for n in names), (path, names)
    project = tomllib.loads((root.parent / "pyproject.toml").read_text())["project"]
    assert set(project["scripts"]) == {"firebolt-vl"}
    sdk = tmp_path / "site" / "firebolt"
    sdk.mkdir(parents=True)
    (sdk / "__init__.py").write_text("SDK = True\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(root.parent)])}
    code = "import firebolt, firebolt_vl.cli; assert firebolt.SDK; print(firebolt_vl.cli.build_parser().prog)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "firebolt-vl", r.stderr


def test_thread_default_leaves_busy_cores(monkeypatch):
    """generate / chat on CPU: --threads as given; by default the cores other work leaves free (at least one)."""
    import torch

    from firebolt_vl.bench import load
    from firebolt_vl.hub import set_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(load.os, "cpu_count", lambda: 2)
        monkeypatch.setattr(load, "busy_cores", lambda interval_s=0.25: 1.0)  # one core busy elsewhere
        set_threads(torch.device("cpu"), None)
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(load, "busy_cores", lambda interval_s=0.25: 0.1)  # idle
        set_threads(torch.device("cpu"), None)
        assert torch.get_num_threads() == 2
        set_threads(torch.device("cpu"), 1)
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="--threads must be >= 1, got 0"):
            set_threads(torch.device("cpu"), 0)
    finally:
        torch.set_num_threads(before)
