import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    """build(**config overrides) -> (model in eval mode, processor), cached per set of overrides."""
    from firebolt.presets import build_tiny

    cache = {}

    def build(**overrides):
        key = tuple(sorted((k, str(v)) for k, v in overrides.items()))
        if key not in cache:
            overrides.setdefault("init_std", 0.5)
            model, processor = build_tiny(tmp_path_factory.mktemp("tiny"), **overrides)
            cache[key] = (model.eval(), processor)
        return cache[key]

    return build


@pytest.fixture
def red_image():
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (96, 80), (240, 240, 240))
    ImageDraw.Draw(img).ellipse((10, 10, 30, 30), fill=(220, 20, 20))
    return img
