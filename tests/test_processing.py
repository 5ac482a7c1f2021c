"""Image loading for odd inputs, the processor's prompt/padding logic, and their error messages."""

import io

import numpy as np
import pytest
from PIL import Image

from firebolt_vl.processing import ImageLoadError, load_image
from firebolt_vl.testing import png_bytes, png_with_header_size, truncated_jpeg


def _roundtrip(image, fmt="PNG", **kw):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("L", (20, 10), 128),
        lambda: Image.new("LA", (20, 10), (128, 0)),
        lambda: Image.new("P", (20, 10), 3),
        lambda: Image.new("RGBA", (20, 10), (255, 0, 0, 0)),
        lambda: Image.new("CMYK", (20, 10), (0, 255, 255, 0)),
        lambda: Image.fromarray(np.full((10, 20), 65535, dtype=np.uint16)),
        lambda: Image.new("1", (20, 10), 1),
        lambda: Image.new("F", (20, 10), 0.5),
    ],
    ids=["L", "LA", "P", "RGBA", "CMYK", "16bit", "1", "F"],
)
def test_any_mode_becomes_rgb(make):
    img = load_image(make())
    assert img.mode == "RGB" and img.size == (20, 10)


def test_sixteen_bit_png_file_scaled(tmp_path):
    arr = np.full((4, 4), 65535, dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    assert np.asarray(load_image(path)).min() == 255


def test_transparent_pixels_composited_on_white():
    assert load_image(Image.new("RGBA", (2, 2), (255, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_applied():
    img = Image.new("RGB", (30, 10), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    loaded = load_image(_roundtrip(img, "JPEG", exif=exif.tobytes()))
    assert loaded.size == (10, 30)


def test_tiny_and_extreme_aspect_images(tiny_factory):
    _, processor = tiny_factory(fusion_type="cmm", ssm_type="s4")
    for size in [(1, 1), (10000, 20), (20, 10000)]:
        px = processor.preprocess_image(png_bytes(Image.new("RGB", size, (9, 9, 9))))
        assert px.shape == (3, processor.image_size, processor.image_size)


def test_refusals_name_the_problem(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageLoadError, match="corrupt or truncated"):
        load_image(truncated_jpeg())
    with pytest.raises(ImageLoadError, match="not a readable image"):
        load_image(b"this is not an image")
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(png_with_header_size(20000, 20000))
    with pytest.raises(ImageLoadError, match="too large: 9000x9000 = 81000000 pixels, over the limit"):
        load_image(png_with_header_size(9000, 9000))
    with pytest.raises(ImageLoadError, match="over the limit of 100"):
        load_image(Image.new("RGB", (20, 20)), max_pixels=100)


def test_processor_prompts_and_padding(tiny_factory, red_image):
    _, processor = tiny_factory(fusion_type="cmm", ssm_type="s4")
    text = processor.build_prompt("What color?", True)
    assert text.count("<image>") == 1 and text.rstrip().endswith("assistant")
    batch = processor([text, processor.build_prompt("A much longer question about the picture here", True)],
                      images=[red_image, red_image])
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1  # left padded
    assert batch["pixel_values"].shape == (2, 3, processor.image_size, processor.image_size)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}]
    assert processor.chat_prompt(msgs) == text
    with pytest.raises(ValueError, match="empty prompt"):
        processor.build_prompt("   ", True)
    with pytest.raises(ValueError, match="no image was given"):
        processor(text)
    with pytest.raises(ValueError, match="no <image> slot"):
        processor(processor.build_prompt("hi", False), images=red_image)


def test_prepend_processor_expands_image_tokens(tiny_factory, red_image):
    model, processor = tiny_factory(fusion_type="prepend")
    batch = processor(processor.build_prompt("What color?", True), images=red_image)
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == model.config.num_grids


def test_prompt_token_limit(tiny_factory):
    from firebolt_vl.processing import FireboltProcessor

    _, processor = tiny_factory(fusion_type="cmm", ssm_type="s4")
    limited = FireboltProcessor(processor.tokenizer, image_size=processor.image_size, max_prompt_tokens=20)
    with pytest.raises(ValueError, match="over the limit of 20"):
        limited(limited.build_prompt("word " * 100, False))
