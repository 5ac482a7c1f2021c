import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


class _DeprecationLog(logging.Handler):
    """Collects the deprecation notices transformers logs (not all of them go through `warnings`: 5.24's
    `past_key_values` -> `cache` rename is a `logger.warning_once`)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if "deprecat" in message.lower() or "will be removed" in message.lower():
            self.messages.append(message)


_DEPRECATIONS = _DeprecationLog()
logging.getLogger("transformers").addHandler(_DEPRECATIONS)


@pytest.fixture(autouse=True)
def no_transformers_deprecations():
    """Fail the test in which our code triggers a deprecation that transformers only logs, while it is still a
    notice. The `warnings` kind (FutureWarning / DeprecationWarning attributed to our modules or tests) is turned
    into an error by `filterwarnings` in pyproject.toml."""
    start = len(_DEPRECATIONS.messages)
    yield
    new = _DEPRECATIONS.messages[start:]
    assert not new, f"transformers logged a deprecation during this test: {new[0]}"


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and OpenMP threads stall badly on a busy machine
    (modules that train use it for every test: `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    """build(**config overrides) -> (model in eval mode, processor), cached per set of overrides."""
    from firebolt_vl.presets import build_tiny

    cache = {}

    def build(**overrides):
        key = tuple(sorted((k, str(v)) for k, v in overrides.items()))
        if key not in cache:
            overrides.setdefault("init_std", 0.5)
            model, processor = build_tiny(tmp_path_factory.mktemp("tiny"), **overrides)
            cache[key] = (model.eval(), processor)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def tiny_dir_factory(tmp_path_factory):
    """init_std -> a saved tiny model directory (seed 0), written once per std and shared read-only by the tests
    that load it (training, LoRA, DPO)."""
    from firebolt_vl.hub import save_model_dir
    from firebolt_vl.presets import build_tiny

    dirs = {}

    def saved(init_std: float):
        if init_std not in dirs:
            root = tmp_path_factory.mktemp("tinymodel")
            model, processor = build_tiny(root / "parts", seed=0, init_std=init_std)
            dirs[init_std] = save_model_dir(model, processor, root / "model")
        return dirs[init_std]

    return saved


@pytest.fixture
def red_image():
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (96, 80), (240, 240, 240))
    ImageDraw.Draw(img).ellipse((10, 10, 30, 30), fill=(220, 20, 20))
    return img
