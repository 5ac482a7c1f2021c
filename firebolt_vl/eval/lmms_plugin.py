"""`lmms-eval` plugin: ``lmms-eval --model firebolt_vl --model_args pretrained=DIR --tasks pope,mme ...``.

lmms-eval (0.6 / 0.7.x) finds plugin models through the entry-point group ``lmms_eval.models``; the entry point must
give a ``ModelManifest`` (or a callable returning one), which names the class by import path. This package's entry
point is :func:`lmms_eval_manifest`::

    [project.entry-points."lmms_eval.models"]
    firebolt_vl = "firebolt_vl.eval.lmms_plugin:lmms_eval_manifest"

(Pointing the entry point at the class itself does not work: lmms-eval calls a callable payload with no arguments.)
Where lmms-eval is installed, the class is also registered with ``@register_model("firebolt_vl")``.

lmms-eval is optional: this module imports without it. The class :data:`Firebolt` (a subclass of
``lmms_eval.api.model.lmms``) is created on first access; without lmms-eval that access raises an ImportError saying
what to install. All the work is in :class:`FireboltLMMsAdapter`, which does not depend on lmms-eval.

Model arguments (``--model_args key=value,...``): ``pretrained`` (model folder, required), ``device`` (auto / cpu /
cuda[:N]), ``dtype`` (fp32 / bf16 / fp16 / float32 / bfloat16 / float16 / auto), ``batch_size`` ("auto" = 8),
``max_new_tokens`` (default when a task gives none), ``use_cache``, ``seed`` (sampling only).

Requests (simple-model interface):

* ``generate_until``: args ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``; the visuals are
  ``doc_to_visual(self.task_dict[task][split][doc_id])``; the context is wrapped in the chat template with the image
  first (``processor.build_prompt``); ``gen_kwargs``: ``until`` (stop strings: the text is cut at the first one,
  then stripped, so the texts equal ``firebolt-vl eval``'s),
  ``max_new_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``do_sample``; others are ignored. Requests are
  grouped by gen_kwargs, batched longest first and answered in the original order.
* ``loglikelihood``: args ``(context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)``, or
  ``(context, continuation)`` without an image (lmms-eval's unconditional requests). Returns ``(sum of the
  log-probabilities of the continuation's tokens given the templated context and the image, whether greedy decoding
  would produce exactly those tokens)``. The continuation is tokenized on its own and appended to the templated
  context (the assistant turn's text).
* ``generate_until_multi_round``: not supported (NotImplementedError).

Firebolt-VL takes one image per prompt: with several visuals the first image is used (a warning says so); a visual
that cannot be loaded gives the answer ``""`` (generate_until) and a warning.
"""

from __future__ import annotations

import json
import warnings
from typing import Any, List, Optional, Sequence, Tuple

MODEL_NAME = "firebolt_vl"
CLASS_PATH = f"{__name__}.Firebolt"
DEFAULT_MAX_NEW_TOKENS = 128
AUTO_BATCH_SIZE = 8  # used for batch_size=auto
_INSTALL_HINT = "the lmms-eval plugin needs lmms-eval: pip install 'lmms-eval>=0.7'"


def _as_int(value, name: str, default: int) -> int:
    if value is None or value == "auto":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _as_bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(value)


class FireboltLMMsAdapter:
    """The lmms-eval model interface for a Firebolt-VL model folder, without depending on lmms-eval."""

    is_simple = True  # lmms-eval "simple" model: text contexts + doc_to_visual

    def __init__(
        self,
        pretrained: str,
        device: Optional[str] = None,
        dtype: Optional[Any] = None,
        batch_size: Any = 1,
        max_new_tokens: Any = DEFAULT_MAX_NEW_TOKENS,
        use_cache: Any = True,
        seed: Any = 0,
        max_batch_size: Any = None,
        **kwargs,
    ) -> None:
        super().__init__()  # lmms.__init__ in the plugin class: rank, world size, cache hook, task_dict
        import torch

        from ..hub import load_model_dir, parse_dtype, resolve_device

        if kwargs:
            warnings.warn(f"firebolt-vl lmms-eval plugin: ignoring unknown model_args {sorted(kwargs)}")
        for attr, value in (("_rank", 0), ("_world_size", 1), ("task_dict", {})):
            if not hasattr(self, attr):
                setattr(self, attr, value)
        if not hasattr(self, "cache_hook"):
            self.cache_hook = _NoCacheHook()
        if isinstance(dtype, torch.dtype):
            torch_dtype = dtype
        else:
            torch_dtype = parse_dtype(None if dtype in (None, "", "auto") else str(dtype).replace("torch.", ""))
        self._device = resolve_device(None if device in (None, "", "auto") else str(device))
        self._model, self._processor = load_model_dir(pretrained, self._device, torch_dtype)
        self.pretrained = pretrained
        if isinstance(batch_size, str) and batch_size.startswith("auto"):  # lmms-eval's "auto[:N]": no search here
            batch_size = AUTO_BATCH_SIZE
        self.batch_size_per_gpu = max(1, _as_int(batch_size, "batch_size", 1))
        self.max_new_tokens = _as_int(max_new_tokens, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        self.use_cache = _as_bool(use_cache)
        self.seed = _as_int(seed, "seed", 0)
        self._warned: set = set()

    # ---- properties lmms-eval code expects ----
    @property
    def model(self):
        return self._model

    @property
    def processor(self):
        return self._processor

    @property
    def tokenizer(self):
        return self._processor.tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def tok_encode(self, string: str) -> List[int]:
        return self.tokenizer.encode(string, add_special_tokens=False)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    # ---- helpers ----
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message)

    def _doc(self, task, split, doc_id):
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError) as e:
            raise KeyError(f"firebolt-vl plugin: no document {doc_id!r} in task_dict[{task!r}][{split!r}]") from e

    def _visuals(self, doc_to_visual, task, split, doc_id) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self._doc(task, split, doc_id))
        if visuals is None:
            return []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        flat = []
        for v in visuals:  # some tasks nest lists
            flat.extend(v if isinstance(v, (list, tuple)) else [v])
        return [v for v in flat if v is not None]

    def _image(self, visuals: Sequence) -> Any:
        """The first visual as an RGB PIL image (None when there is none); ImageLoadError if unusable."""
        from ..processing import load_image

        if not visuals:
            return None
        if len(visuals) > 1:
            self._warn_once("multi", f"firebolt-vl plugin: Firebolt-VL takes one image per prompt; using the first of "
                                     f"{len(visuals)} visuals")
        v = visuals[0]
        if isinstance(v, dict):  # {"bytes": ..., "path": ...} cells
            v = v.get("bytes") or v.get("path")
        return load_image(v, self._processor.max_image_pixels)

    def _prompt(self, context: str, with_image: bool) -> str:
        """Chat-templated prompt for the user turn ``context`` (image first); an empty context is allowed."""
        from ..processing import IMAGE_TOKEN

        context = "" if context is None else str(context)
        if not with_image:
            context = context.replace(IMAGE_TOKEN, "")
        if context.strip():
            return self._processor.build_prompt(context, with_image=with_image)
        return self._processor.chat_prompt([{"role": "user", "content": IMAGE_TOKEN + "\n" if with_image else ""}])

    def _to_device(self, inputs: dict) -> dict:
        out = {k: v.to(self._device) for k, v in inputs.items()}
        if "pixel_values" in out:
            out["pixel_values"] = out["pixel_values"].to(self._model.dtype)
        return out

    def _stop_token_ids(self, until: Sequence[str]) -> List[int]:
        """Model EOS ids plus the ids of stop strings that are one token (stopping there cuts nothing extra)."""
        eos, _ = self._model._default_ids(None, None)
        ids = list(eos)
        for s in until:
            toks = self.tokenizer.encode(s, add_special_tokens=False)
            if len(toks) == 1 and self.tokenizer.decode(toks) == s and toks[0] not in ids:
                ids.append(toks[0])
        return ids

    # ---- generate_until ----
    def _parse_gen_kwargs(self, gen_kwargs: Optional[dict]) -> dict:
        g = dict(gen_kwargs or {})
        until = g.get("until") or []
        if isinstance(until, str):
            until = [until]
        if not isinstance(until, (list, tuple)):
            raise ValueError(f"gen_kwargs['until'] must be a string or a list, got {type(until).__name__}")
        temperature = float(g.get("temperature") or 0.0)
        do_sample = _as_bool(g["do_sample"]) if "do_sample" in g else temperature > 0
        if do_sample and temperature <= 0:
            temperature = 1.0
        if _as_int(g.get("num_beams"), "num_beams", 1) != 1:
            self._warn_once("beams", "firebolt-vl plugin: beam search is not supported; decoding greedily")
        top_p = g.get("top_p")
        return {
            "until": [str(u) for u in until if u],
            "max_new_tokens": _as_int(g.get("max_new_tokens"), "max_new_tokens", self.max_new_tokens),
            "do_sample": do_sample,
            "temperature": temperature if do_sample else 1.0,
            "top_p": float(top_p) if (do_sample and top_p is not None) else None,
        }

    def generate_until(self, requests) -> List[str]:
        """Answers for generate_until requests, in request order (see the module doc)."""
        import torch
        from tqdm.auto import tqdm

        args = [r.args for r in requests]
        results: List[Optional[str]] = [None] * len(args)
        groups: dict = {}  # gen_kwargs (as JSON) -> request indices
        for i, a in enumerate(args):
            key = json.dumps(a[1] or {}, sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        bar = tqdm(total=len(args), desc="firebolt-vl generate", disable=self.rank != 0)
        gen = torch.Generator(device=self._device).manual_seed(self.seed)
        for indices in groups.values():
            opts = self._parse_gen_kwargs(args[indices[0]][1])
            eos = self._stop_token_ids(opts["until"])
            order = sorted(indices, key=lambda i: (-len(str(args[i][0])), i))  # longest first: OOM shows early
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                rows, texts, images = [], [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = args[i][:6]
                    try:
                        image = self._image(self._visuals(doc_to_visual, task, split, doc_id))
                    except (OSError, ValueError) as e:  # a bad visual answers "" instead of ending the evaluation
                        warnings.warn(f"firebolt-vl plugin: {task} doc {doc_id}: {e}; answering ''")
                        results[i] = ""
                        continue
                    rows.append(i)
                    texts.append(self._prompt(context, image is not None))
                    images.append(image)
                if rows:
                    inputs = self._to_device(self._processor(texts, images=images))
                    with torch.inference_mode():
                        out = self._model.generate(
                            **inputs, max_new_tokens=opts["max_new_tokens"], do_sample=opts["do_sample"],
                            temperature=opts["temperature"], top_p=opts["top_p"], eos_token_id=eos,
                            use_cache=self.use_cache, generator=gen if opts["do_sample"] else None,
                        )  # (B, T + new)
                    new = out[:, inputs["input_ids"].shape[1] :].cpu()
                    for i, text in zip(rows, self._processor.batch_decode(new)):
                        for stop in opts["until"]:
                            text = text.split(stop, 1)[0]
                        text = text.strip()  # as `firebolt-vl eval` answers (runner.generate_answers)
                        results[i] = text
                        self.cache_hook.add_partial("generate_until", (args[i][0], args[i][1]), text)
                bar.update(len(chunk))
        bar.close()
        return [r if r is not None else "" for r in results]

    # ---- loglikelihood ----
    def _ll_item(self, a: tuple) -> Tuple[Any, Any, Any]:
        """(context ids (T_c,), continuation ids (T_n,), pixel values (3, S, S) or None) of one request."""
        import torch

        if len(a) >= 6:
            context, target, doc_to_visual, doc_id, task, split = a[:6]
            doc = self._doc(task, split, doc_id) if (callable(target) or doc_to_visual is not None) else None
            continuation = target(doc) if callable(target) else target
            image = self._image(self._visuals(doc_to_visual, task, split, doc_id))
        elif len(a) == 2:
            (context, continuation), image = a, None
        else:
            raise ValueError(f"loglikelihood request args must be (context, continuation[, doc_to_visual, doc_id, task,"
                             f" split]), got {len(a)} items")
        if isinstance(continuation, (list, tuple)):
            continuation = continuation[0]
        enc = self._processor(self._prompt(context, image is not None), images=image)
        ctx = enc["input_ids"][0]  # (T_c,)
        cont = torch.tensor(self.tokenizer.encode(str(continuation), add_special_tokens=False), dtype=torch.long)
        pixels = enc["pixel_values"][0] if "pixel_values" in enc else None
        return ctx, cont, pixels

    def loglikelihood(self, requests) -> List[Tuple[float, bool]]:
        """(log P(continuation | context, image), is greedy) per request (see the module doc)."""
        from tqdm.auto import tqdm

        args = [r.args for r in requests]
        results: List[Optional[Tuple[float, bool]]] = [None] * len(args)
        pad = self._model._default_ids(None, None)[1]

        def size(i):  # text length as a cheap proxy for tokens; images are loaded one batch at a time
            a = args[i]
            return len(str(a[0] or "")) + (len(a[1]) if isinstance(a[1], str) else 0)

        order = sorted(range(len(args)), key=lambda i: (-size(i), i))
        bar = tqdm(total=len(args), desc="firebolt-vl loglikelihood", disable=self.rank != 0)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            prepared = {i: self._ll_item(args[i]) for i in chunk}
            todo = []
            for i in chunk:
                if len(prepared[i][1]) == 0:
                    results[i] = (0.0, True)  # the empty continuation
                else:
                    todo.append(i)
            if todo:
                for i, res in zip(todo, self._ll_batch([prepared[i] for i in todo], pad)):
                    results[i] = res
                    self.cache_hook.add_partial("loglikelihood", args[i], res)
            bar.update(len(chunk))
        bar.close()
        return results

    def _ll_batch(self, batch, pad: int) -> List[Tuple[float, bool]]:
        """One left-padded forward over [context | continuation] rows; logits only for the continuation span."""
        import torch

        lengths = [len(c) + len(n) for c, n, _ in batch]
        L, n_max = max(lengths), max(len(n) for _, n, _ in batch)
        ids = torch.full((len(batch), L), pad, dtype=torch.long)  # (B, L)
        mask = torch.zeros(len(batch), L, dtype=torch.long)  # (B, L) 1 = token
        ctx_mask = torch.zeros(len(batch), L, dtype=torch.long)  # (B, L) 1 = context token (pooled output mode)
        for b, (c, n, _) in enumerate(batch):
            row = torch.cat([c, n])
            ids[b, L - len(row) :] = row
            mask[b, L - len(row) :] = 1
            ctx_mask[b, L - len(row) : L - len(n)] = 1
        pixels = [p for _, _, p in batch if p is not None]
        pixel_values = torch.stack(pixels).to(self._device, self._model.dtype) if pixels else None  # (N_img, 3, S, S)
        with torch.inference_mode():
            out = self._model(ids.to(self._device), mask.to(self._device), pixel_values,
                              pool_mask=ctx_mask.to(self._device), logits_to_keep=n_max + 1)
        logits = out.logits[:, -(n_max + 1) : -1].float()  # (B, n_max, V): predictions of the last n_max tokens
        logp = torch.log_softmax(logits, dim=-1)
        res = []
        for b, (_, n, _) in enumerate(batch):
            k = len(n)
            lp = logp[b, n_max - k :]  # (k, V)
            tok = n.to(lp.device)
            total = float(lp.gather(-1, tok[:, None]).sum())
            greedy = bool((lp.argmax(-1) == tok).all())
            res.append((total, greedy))
        return res

    def generate_until_multi_round(self, requests) -> List[str]:
        raise NotImplementedError("the firebolt-vl lmms-eval plugin does not support multi-round generation "
                                  "(generate_until_multi_round); use single-round tasks")


class _NoCacheHook:
    def add_partial(self, attr, req, res) -> None:
        pass


def _make_plugin_class():
    """Build ``Firebolt(FireboltLMMsAdapter, lmms_eval.api.model.lmms)`` and register it as "firebolt_vl"."""
    try:
        from lmms_eval.api.model import lmms
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} ({e})") from e

    class Firebolt(FireboltLMMsAdapter, lmms):
        """Firebolt-VL for lmms-eval: ``--model firebolt_vl --model_args pretrained=DIR[,device=cuda,dtype=bf16,...]``."""

        is_simple = True

    Firebolt.__module__ = __name__
    try:
        from lmms_eval.api.registry import register_model
    except ImportError:  # registry unavailable: entry-point loading still finds the class by path
        return Firebolt
    return register_model(MODEL_NAME)(Firebolt)


def lmms_eval_manifest():
    """The entry-point payload for lmms-eval's ``lmms_eval.models`` group (a ``ModelManifest``)."""
    try:
        from lmms_eval.models.registry_v2 import ModelManifest
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} ({e})") from e
    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def __getattr__(name: str):
    """``Firebolt`` is created on first access, so the module imports without lmms-eval."""
    if name == "Firebolt":
        cls = _make_plugin_class()
        globals()["Firebolt"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
