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
