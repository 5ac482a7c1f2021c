"""The lmms-eval plugin, driven through a minimal stand-in `lmms_eval` package (the real evaluator runs it in
test_lmms_eval_real.py)."""

import abc
import dataclasses
import importlib
import sys
import types

import pytest
import torch


def fake_lmms_eval():
    """Modules with the parts of lmms-eval 0.7's API the plugin uses: lmms, Instance, register_model, ModelManifest."""
    mods = {n: types.ModuleType(n) for n in ("lmms_eval", "lmms_eval.api", "lmms_eval.api.model",
                                               "lmms_eval.api.instance", "lmms_eval.api.registry", "lmms_eval.models",
                                               "lmms_eval.models.registry_v2")}

    class CacheHook:
        def __init__(self):
            self.calls = []

        def add_partial(self, attr, req, res):
            self.calls.append((attr, res))

    class lmms(abc.ABC):
        def __init__(self):
            self._rank, self._world_size = 0, 1
            self.cache_hook = CacheHook()
            self.task_dict = {}

        @abc.abstractmethod
        def loglikelihood(self, requests): ...

        @abc.abstractmethod
        def generate_until(self, requests): ...

        @abc.abstractmethod
        def generate_until_multi_round(self, requests): ...

    @dataclasses.dataclass
    class Instance:
        request_type: str
        arguments: tuple
        idx: int = 0

        @property
        def args(self):
            return self.arguments if isinstance(self.arguments, tuple) else (self.arguments,)

    registry = {}

    def register_model(*names):
        def decorate(cls):
            assert issubclass(cls, lmms)
            for n in names:
                registry[n] = cls
            return cls
        return decorate

    @dataclasses.dataclass(frozen=True)
    class ModelManifest:
        model_id: str
        simple_class_path: str = None
        chat_class_path: str = None

    mods["lmms_eval.api.model"].lmms = lmms
    mods["lmms_eval.api.instance"].Instance = Instance
    mods["lmms_eval.api.registry"].register_model = register_model
    mods["lmms_eval.api.registry"].MODEL_REGISTRY = registry
    mods["lmms_eval.models.registry_v2"].ModelManifest = ModelManifest
    return mods


@pytest.fixture
def plugin(monkeypatch):
    """The plugin module with the stand-in lmms_eval in sys.modules; its Firebolt class is dropped afterwards."""
    for name, mod in fake_lmms_eval().items():
        monkeypatch.setitem(sys.modules, name, mod)
    module = importlib.import_module("firebolt_vl.eval.lmms_plugin")
    module.__dict__.pop("Firebolt", None)
    yield module
    module.__dict__.pop("Firebolt", None)


@pytest.fixture(scope="module")
def model_dir(tiny_factory, tmp_path_factory):
    from firebolt_vl.hub import save_model_dir

    model, processor = tiny_factory()
    return save_model_dir(model, processor, tmp_path_factory.mktemp("lmms") / "model")


@pytest.fixture
def lm(plugin, model_dir):
    from PIL import Image, ImageDraw

    lm = plugin.Firebolt(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size="3", max_new_tokens=5)
    docs = []
    for i, color in enumerate([(220, 20, 20), (20, 200, 20), (20, 20, 220), (200, 200, 0)]):
        img = Image.new("RGB", (48 + 16 * i, 40), (240, 240, 240))
        ImageDraw.Draw(img).ellipse((8, 8, 30, 30), fill=color)
        docs.append({"image": img, "question": "What color is the circle?" + " Answer briefly." * i})
    docs.append({"image": None, "question": "Say hello."})
    lm.task_dict = {"toy": {"test": docs}}
    return lm


def doc_to_visual(doc):
    return [doc["image"]] if doc["image"] is not None else []


def direct_generate(lm, doc, max_new_tokens):
    proc, model = lm.processor, lm.model
    inputs = proc(proc.build_prompt(doc["question"], doc["image"] is not None), images=doc["image"])
    out = model.generate(**inputs, max_new_tokens=max_new_tokens)
    return proc.decode(out[0, inputs["input_ids"].shape[1]:])


def test_module_imports_without_lmms_eval(monkeypatch):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # import lmms_eval -> ImportError
    for name in [n for n in sys.modules if n.startswith("lmms_eval.")]:  # the real one may be imported already
        monkeypatch.setitem(sys.modules, name, None)
    module = importlib.import_module("firebolt_vl.eval.lmms_plugin")
    module.__dict__.pop("Firebolt", None)
    assert module.FireboltLMMsAdapter.is_simple
    with pytest.raises(ImportError, match="lmms-eval"):
        module.Firebolt
    with pytest.raises(ImportError, match="lmms-eval"):
        module.lmms_eval_manifest()


def test_registration_and_manifest(plugin):
    cls = plugin.Firebolt
    api = sys.modules["lmms_eval.api.model"]
    assert issubclass(cls, api.lmms) and cls.is_simple
    assert sys.modules["lmms_eval.api.registry"].MODEL_REGISTRY["firebolt_vl"] is cls
    manifest = plugin.lmms_eval_manifest()
    assert manifest.model_id == "firebolt_vl"
    module_name, cls_name = manifest.simple_class_path.rsplit(".", 1)
    assert getattr(importlib.import_module(module_name), cls_name) is cls  # how lmms-eval resolves the class


def test_pyproject_entry_point_gives_a_manifest(plugin):
    """lmms-eval 0.6+/0.7 calls a callable entry-point payload and expects a ModelManifest back."""
    import pathlib

    tomllib = pytest.importorskip("tomllib")
    pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
    target = tomllib.loads(pyproject.read_text())["project"]["entry-points"]["lmms_eval.models"]["firebolt_vl"]
    module_name, attr = target.split(":")
    payload = getattr(importlib.import_module(module_name), attr)
    manifest = payload() if callable(payload) else payload
    assert isinstance(manifest, sys.modules["lmms_eval.models.registry_v2"].ModelManifest)
    assert manifest.model_id == "firebolt_vl" and manifest.simple_class_path == "firebolt_vl.eval.lmms_plugin.Firebolt"


def test_generate_until_matches_generate(lm, plugin):
    Instance = sys.modules["lmms_eval.api.instance"].Instance
    docs = lm.task_dict["toy"]["test"]
    reqs = [Instance("generate_until", (d["question"], {"max_new_tokens": 4 if i % 2 else 6, "until": ["\n\n"]},
                                        doc_to_visual, i, "toy", "test"), idx=0)
            for i, d in enumerate(docs)]
    got = lm.generate_until(reqs)
    assert len(got) == len(docs)
    for i, d in enumerate(docs):  # batched, regrouped and reordered, yet each answer is the row's own
        assert got[i] == direct_generate(lm, d, 4 if i % 2 else 6).split("\n\n")[0]
    assert len(lm.cache_hook.calls) == len(docs)

    # a stop string cuts the answer at its first occurrence
    full = direct_generate(lm, docs[0], 6)
    assert len(full) >= 4, full
    stop = full[2:4]
    req = Instance("generate_until", (docs[0]["question"], {"max_new_tokens": 6, "until": [stop]}, doc_to_visual, 0,
                                      "toy", "test"))
    assert lm.generate_until([req]) == [full.split(stop, 1)[0]]


def greedy_single_token(lm):
    """(doc index, context, continuation) where the continuation is the greedy next token and survives
    decode -> encode (byte-level fragments of a random model often do not)."""
    proc, model = lm.processor, lm.model
    for i, doc in enumerate(lm.task_dict["toy"]["test"]):
        for q in (doc["question"], "Describe it.", "Name the shape.", "Is it big?"):
            inputs = proc(proc.build_prompt(q, doc["image"] is not None), images=doc["image"])
            with torch.no_grad():
                tok = int(model(**inputs, logits_to_keep=1).logits[0, -1].argmax())
            text = proc.tokenizer.decode([tok])
            if proc.tokenizer.encode(text, add_special_tokens=False) == [tok]:
                return i, q, text
    pytest.fail("no greedy token that survives decode -> encode")


def test_loglikelihood_matches_forward(lm):
    Instance = sys.modules["lmms_eval.api.instance"].Instance
    proc, model = lm.processor, lm.model
    docs = lm.task_dict["toy"]["test"]
    g_doc, g_context, g_text = greedy_single_token(lm)
    cases = [(0, docs[0]["question"], " red"), (g_doc, g_context, g_text), (2, docs[2]["question"], lambda d: " blue"),
             (3, docs[3]["question"], "yellow and more"), (4, docs[4]["question"], " hello")]
    reqs = [Instance("loglikelihood", (context, cont, doc_to_visual, i, "toy", "test")) for i, context, cont in cases]
    reqs.append(Instance("loglikelihood", ("", " A")))  # lmms-eval's unconditional form: no image, empty context
    got = lm.loglikelihood(reqs)
    assert len(got) == len(reqs)
    for (i, context, cont), (logprob, is_greedy) in zip(cases, got):
        doc = docs[i]
        text = cont(doc) if callable(cont) else cont
        inputs = proc(proc.build_prompt(context, doc["image"] is not None), images=doc["image"])
        cont_ids = torch.tensor([proc.tokenizer.encode(text, add_special_tokens=False)])
        ids = torch.cat([inputs["input_ids"], cont_ids], 1)
        labels = torch.full_like(ids, -100)
        labels[:, -cont_ids.shape[1]:] = cont_ids
        with torch.no_grad():
            out = model(ids, pixel_values=inputs.get("pixel_values"), labels=labels)  # mean CE over the continuation
        assert logprob == pytest.approx(-out.loss.item() * cont_ids.shape[1], abs=1e-3)
        span = out.logits[0, -cont_ids.shape[1] - 1:-1].argmax(-1)
        assert is_greedy == bool((span == cont_ids[0]).all())
    assert got[1][1] is True  # the greedy token
    assert got[3][1] is False and got[-1][0] < 0
    assert lm.loglikelihood([Instance("loglikelihood", ("Hi", ""))]) == [(0.0, True)]  # empty continuation


def test_multi_round_is_refused(lm):
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round([])


def test_bad_visual_answers_empty(lm):
    Instance = sys.modules["lmms_eval.api.instance"].Instance
    lm.task_dict["toy"]["test"].append({"image": b"not an image", "question": "What is it?"})
    req = Instance("generate_until", ("What is it?", {"max_new_tokens": 3}, doc_to_visual, 5, "toy", "test"))
    with pytest.warns(UserWarning, match="not a readable image"):
        assert lm.generate_until([req]) == [""]
