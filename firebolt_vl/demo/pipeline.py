"""The offline demo pipeline: synthetic benchmark -> tiny pretrained components -> the paper's two stages -> evaluation
next to two controls (a blind text-only model and the `prepend` fusion) -> a report folder.

    1 data        firebolt_vl.data.generate_synthetic: images, questions, captions (train / val / test)
    2 tokenizer   a byte-level BPE trained here on the synthetic text (firebolt_vl.presets.train_tiny_tokenizer)
    3 vision      a tiny SigLIP dual encoder trained with SigLIP's sigmoid loss on the captions; its vision tower is
                  kept, in Hugging Face layout (vision_pretrain.py)
    4 language    a tiny LFM2 (random init, optionally pretrained on the synthetic captions: text_pretrain.py)
    5 models      FireboltForConditionalGeneration.from_components(vision, language, fusion_type=...):
                    firebolt  CMM fusion (the paper)          prepend  MLP projector, G visual tokens (Table 4)
                    blind     the CMM model, trained and evaluated without images (text-only prompts)
    6 stage 1     captions, vision + decoder frozen: only the fusion module learns (CMM warm-up)
      stage 2     instruction tuning on the question split, fusion + decoder (the vision tower stays frozen, as in
                  the authors' release); the best epoch by validation perplexity is kept
    7 evaluation  greedy answers on the test split, scored by firebolt_vl.eval (vqa / pope / letter scorers)
    8 report      metrics.json, loss_curves.png, the trained Firebolt-VL model directory, one example answer

Speed. The vision tower is frozen in both stages, so every image is encoded once (`model.encode_images`, the same
views and the same tower the model uses) and the grid embeddings X_v (N_img, G, D_v) are reused by training and
evaluation through the model's own `fuse` / `prefill` / `decode_step` pieces. Everything is seeded.

Glossary: B batch rows, T tokens, G grids (views) per image, D_v vision width, N_img images of a split.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .text_pretrain import TextPretrainConfig
from .vision_pretrain import VisionPretrainConfig

MODELS = ("firebolt", "blind", "prepend")
MODEL_TITLES = {"firebolt": "Firebolt-VL", "blind": "blind (text only)", "prepend": "prepend"}


# ---------------------------------------------------------------------------------------------- configuration
@dataclass
class StageSpec:
    """One training stage of the demo (mirrors the paper's stages; learning rates per module, 0 = frozen)."""

    name: str
    lr_fusion: float
    lr_language: float
    epochs: float
    batch_size: int = 64
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    max_length: int = 160
    max_samples: Optional[int] = None  # cap on training records (None: all)
    # stage 2 (questions): the questions about one image packed into one multi-turn conversation (LLaVA-Instruct
    # style), in a seeded random order; 1 = one question per conversation. Training only: validation and test stay
    # single-turn. Captions (stage 1) are one turn each.
    turns_per_conversation: int = 1
    val_samples: int = 400  # validation records for perplexity (best epoch kept)


@dataclass
class DemoConfig:
    """Every size and setting of the demo. The field defaults are the full demo (`firebolt-vl demo --full`);
    `DemoConfig.small()` is the command's default (sized for 10 minutes on 2 cores), `DemoConfig.quick()` the smoke
    test."""

    size: str = "full"  # which preset these settings started from: full / small / quick (reported)
    seed: int = 0
    # data (images are generated at image_size: the model sees them unresized)
    n_train: int = 3000
    n_val: int = 200
    n_test: int = 400
    image_size: int = 128
    per_quadrant: int = 1  # objects per quadrant: each object alone in its tile, distractors in the other tiles
    families: Optional[tuple] = None  # question families generated (None: all of firebolt_vl.data.synthetic.FAMILIES)
    # grid geometry: global view + 2 x 2 tiles (the quadrants), every view encoded at view_size
    tile_size: int = 64
    tile_overlap: int = 0
    view_size: int = 64
    vocab_size: int = 512
    # a narrow, shallow tower trained for more steps learns the tiles' shapes better in the same minutes (linear probe
    # on single-shape test tiles: shape 68% vs 48% for 96 wide x 3 layers x 600 steps; colour 100% for both); the
    # global view is not paired (its phrases are too small to learn at 64 px in this budget)
    vision: VisionPretrainConfig = field(default_factory=lambda: VisionPretrainConfig(
        hidden=64, layers=2, heads=2, patch=8, text_hidden=64, text_layers=1, batch_size=64, max_steps=2000, lr=3e-3,
        global_pairs=False))
    # decoder (LFM2) and its pretraining on the synthetic text
    text_hidden: int = 128
    text_layers: int = 4
    text: TextPretrainConfig = field(default_factory=TextPretrainConfig)
    # CMM
    cmm_heads: int = 4
    cmm_head_dim: int = 16
    cmm_top_k: int = 4
    cmm_ffn_mult: float = 2.0
    cmm_dropout: float = 0.0
    cmm_grid_embeddings: bool = True
    ssm_type: str = "s4"
    ssm_state: int = 16
    # batches of 16: on 2 cores a step costs little more than at 64, and 4x the updates learn more per minute
    # (stage 1 caption perplexity 1.94 vs 2.07 after one epoch in the same time). 2 epochs: the CMM warm-up is
    # cheap; with seed 0, runs after 1 epoch reached 52-54% and runs after 2-4 epochs 58-61% (one run each; seed 2
    # with 2 epochs reached 52.4%, so the gain is within the seed spread of a single run: docs/demo/DIAGNOSIS.md)
    stage1: StageSpec = field(default_factory=lambda: StageSpec("stage1", lr_fusion=3e-3, lr_language=0.0, epochs=2.0,
                                                                batch_size=16))
    # stage 2 packs the ~7 questions of an image into one conversation: 28% more answers per second than one
    # question per row (the template and the image slot are paid once); 4 epochs, and the val perplexity is still
    # falling at the last (2.00, 1.86, 1.72, 1.67)
    stage2: StageSpec = field(default_factory=lambda: StageSpec("stage2", lr_fusion=2e-3, lr_language=2e-3,
                                                                epochs=4.0, batch_size=16, max_length=320,
                                                                turns_per_conversation=8))
    models: tuple = MODELS
    eval_batch_size: int = 128
    max_new_tokens: int = 6
    workers: int = 3  # processes side by side for the three model jobs
    threads: int = 1  # torch threads per model job
    # the two pretraining jobs run one after the other in this process with `pretrain_threads` threads each: side
    # by side, the text job (~45 s) left a core idle for the rest of the vision job (~220 s), and a 2-thread job
    # next to another busy process is slower than a 1-thread one (its threads spin-wait: 300 vision steps took
    # 48 s vs 35 s with 1 thread and 23 s with 2 threads alone)
    pretrain_threads: int = 2

    @classmethod
    def small(cls, **overrides) -> "DemoConfig":
        """The default of `firebolt-vl demo`: the whole pipeline (all seven families, both stages, the three models)
        on 500 training images, sized to finish within 10 minutes on a 2-core host of this kind (800 images and 600
        vision steps took 438 s beside another busy process, 567 s of CPU). At this size the
        models do not yet use the image (measured: Firebolt-VL within about 1 point of the blind control at 1000 and
        2000 training images, docs/demo/DIAGNOSIS.md "Session 8"); the gain appears with the full demo's training."""
        base = cls()
        cfg = cls(
            size="small", n_train=500, n_val=100, n_test=200,
            vision=replace(base.vision, max_steps=400),
            text=replace(base.text, epochs=1.0),
            stage1=replace(base.stage1, epochs=1.0),
            stage2=replace(base.stage2, epochs=3.0),
        )
        return replace(cfg, **overrides)

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        """A pipeline smoke run in well under a minute: a handful of images, a few steps per phase."""
        cfg = cls(
            size="quick", n_train=48, n_val=12, n_test=16,
            vision=VisionPretrainConfig(hidden=32, layers=1, heads=2, text_hidden=32, text_layers=1, max_steps=4,
                                        batch_size=32),
            text_hidden=32, text_layers=2, text=TextPretrainConfig(epochs=1.0, batch_size=32),
            cmm_heads=2, cmm_head_dim=8, ssm_state=8,
            stage1=StageSpec("stage1", lr_fusion=3e-3, lr_language=0.0, epochs=1.0, batch_size=16, val_samples=16),
            stage2=StageSpec("stage2", lr_fusion=2e-3, lr_language=2e-3, epochs=1.0, batch_size=32, val_samples=16,
                             max_samples=96, max_length=320, turns_per_conversation=8),
            eval_batch_size=64, workers=1,
        )
        return replace(cfg, **overrides)

    def geometry(self):
        from types import SimpleNamespace

        return SimpleNamespace(image_size=self.image_size, tile_size=self.tile_size, tile_overlap=self.tile_overlap,
                               grid_rows=2, grid_cols=2, add_global_view=True, view_size=self.view_size)

    def firebolt_kwargs(self, fusion: str) -> dict:
        """FireboltConfig settings passed to from_components."""
        return dict(fusion_type=fusion, image_size=self.image_size, tile_size=self.tile_size,
                    tile_overlap=self.tile_overlap, grid_rows=2, grid_cols=2, add_global_view=True,
                    view_size=self.view_size, cmm_heads=self.cmm_heads, cmm_head_dim=self.cmm_head_dim,
                    cmm_top_k=self.cmm_top_k, cmm_ffn_mult=self.cmm_ffn_mult, cmm_dropout=self.cmm_dropout,
                    cmm_grid_embeddings=self.cmm_grid_embeddings,
                    ssm_type=self.ssm_type, ssm_config={"d_state": self.ssm_state})

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- small helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class PhaseClock:
    """Wall time per phase, printed as each one ends."""

    def __init__(self, log: Callable[[str], None]):
        self.seconds: dict[str, float] = {}
        self.log = log
        self.start = time.perf_counter()

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.seconds[name] = self.seconds.get(name, 0.0) + dt
            self.log(f"[{name}] {dt:.1f} s")

    def total(self) -> float:
        return time.perf_counter() - self.start


def peak_memory_mb() -> float:
    """Peak resident memory of this process since the last reset_peak_memory() (VmHWM; ru_maxrss elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM back to the current RSS
    except OSError:
        pass


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_images(data_dir: Path, rel_paths: list[str], image_size: int) -> torch.Tensor:
    """(N, 3, S, S) uint8, resized like the processor (a no-op for images generated at image_size)."""
    from PIL import Image

    from ..processing import load_image

    out = np.empty((len(rel_paths), 3, image_size, image_size), dtype=np.uint8)
    for i, rel in enumerate(rel_paths):
        img = load_image(data_dir / rel)
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.BICUBIC)
        out[i] = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------- components
def build_tokenizer(train_questions: list[dict], train_captions: list[dict], vocab_size: int):
    """Byte-level BPE trained on the synthetic text: captions, questions, answers (answers also alone, as they
    follow the assistant header's newline)."""
    from ..presets import train_tiny_tokenizer

    corpus = [c["caption"] for c in train_captions]
    for r in train_questions:
        q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
        corpus += [q.replace("<image>\n", ""), a]
    return train_tiny_tokenizer(vocab_size=vocab_size, corpus=corpus)


def text_config(cfg: DemoConfig, tokenizer) -> dict:
    from ..presets import tiny_text_config

    return tiny_text_config(len(tokenizer), hidden=cfg.text_hidden, layers=cfg.text_layers, tokenizer=tokenizer,
                            initializer_range=0.02)


def write_language_checkpoint(directory: Path, cfg: DemoConfig, tokenizer) -> Path:
    """A random LFM2 + the tokenizer, in Hugging Face layout."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**text_config(cfg, tokenizer)))
    lm.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_model(vision_dir: Path, language_dir: Path, cfg: DemoConfig, fusion: str, seed: int):
    """(model, processor) assembled from the component checkpoints; the fusion module is seeded."""
    from ..modeling import FireboltForConditionalGeneration

    torch.manual_seed(seed)
    model, processor = FireboltForConditionalGeneration.from_components(
        str(vision_dir), str(language_dir), **cfg.firebolt_kwargs(fusion))
    return model, processor


@torch.no_grad()
def encode_image_grid(model, images: torch.Tensor, batch_size: int = 64, progress: bool = True,
                      desc: str = "encode images") -> torch.Tensor:
    """X_v (N_img, G, D_v) for uint8 images (N_img, 3, S, S) through the model's own frozen grid encoder."""
    from tqdm.auto import tqdm

    from ..train.collate import normalize_pixels

    model.eval()
    chunks = []
    processor_like = _ProcessorStats()
    for i in tqdm(range(0, images.shape[0], batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        pixels = normalize_pixels(processor_like, images[i : i + batch_size])
        chunks.append(model.encode_images(pixels))
    return torch.cat(chunks)


class _ProcessorStats:
    """The processor's normalisation constants (FireboltProcessor defaults: SigLIP's mean = std = 0.5)."""

    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)


# ---------------------------------------------------------------------------------------------- training data
@dataclass
class Example:
    encoded: object  # firebolt_vl.train.collate.Encoded (pixels dropped: X_v comes from the cache)
    image: int  # row of the split's X_v cache, -1 = no image


def question_conversations(records: list[dict], with_image: bool) -> list[tuple[list, Optional[str]]]:
    """(conversations, image path) of question records; without images the `<image>` slot is dropped."""
    from ..eval.prompts import strip_image_token

    out = []
    for r in records:
        conv = copy.deepcopy(r["conversations"])
        if not with_image:
            for turn in conv:
                turn["value"] = strip_image_token(turn["value"])
        out.append((conv, r["image"] if with_image else None))
    return out


def pack_turns(records: list[dict], turns: int, seed: int) -> list[dict]:
    """Question records of the same image merged into multi-turn records of up to `turns` question/answer pairs,
    in a random (seeded) order per image; only the first human turn keeps the `<image>` slot."""
    if turns <= 1:
        return records
    from ..eval.prompts import strip_image_token

    by_image: dict[str, list[dict]] = {}
    for r in records:
        by_image.setdefault(r["image"], []).append(r)
    rng = random.Random(seed)
    out = []
    for image, group in by_image.items():
        group = group[:]
        rng.shuffle(group)
        for k in range(0, len(group), turns):
            conv = []
            for j, r in enumerate(group[k : k + turns]):
                human, answer = r["conversations"][0], r["conversations"][1]
                text = strip_image_token(human["value"])
                conv += [{"from": "human", "value": ("<image>\n" + text) if j == 0 else text},
                         {"from": "gpt", "value": answer["value"]}]
            out.append({"image": image, "conversations": conv})
    return out


def caption_conversations(records: list[dict], with_image: bool) -> list[tuple[list, Optional[str]]]:
    """Caption records as 1-turn conversations with the readers' deterministic caption prompts."""
    from ..data.formats import caption_prompt

    out = []
    for r in records:
        prompt = caption_prompt(r["image"])
        human = ("<image>\n" + prompt) if with_image else prompt
        out.append(([{"from": "human", "value": human}, {"from": "gpt", "value": r["caption"]}],
                    r["image"] if with_image else None))
    return out


def encode_examples(processor, conversations: list[tuple[list, Optional[str]]], image_index: dict[str, int],
                    max_length: int) -> list[Example]:
    """Tokenise with the trainer's encode_conversation (chat template, assistant-only labels). The pixels are not
    needed (X_v is cached per image), so a blank image of the right size stands in for the record's image."""
    from PIL import Image

    from ..train.collate import SkipExample, encode_conversation

    blank = Image.new("RGB", (processor.image_size, processor.image_size))
    out = []
    for conv, image in conversations:
        try:
            enc = encode_conversation(processor, conv, image=blank if image else None, max_length=max_length)
        except SkipExample:
            continue
        enc.pixels = None
        out.append(Example(enc, image_index[image] if image else -1))
    return out


def plan_batches(examples: list[Example], batch_size: int, generator: torch.Generator, window: int = 32) -> list:
    """Shuffled batches of similar lengths: shuffle, sort windows of `window` batches by length, cut, shuffle the
    batch order. Returns lists of example indices."""
    order = torch.randperm(len(examples), generator=generator).tolist()
    span = batch_size * window
    batches = []
    for s in range(0, len(order), span):
        chunk = sorted(order[s : s + span], key=lambda i: examples[i].encoded.input_ids.shape[0])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[p] for p in perm]


def make_batch(examples: list[Example], idx: list[int], processor, xv: Optional[torch.Tensor]) -> dict:
    from ..train.collate import collate

    rows = [examples[i] for i in idx]
    batch = collate([r.encoded for r in rows], processor)
    images = [r.image for r in rows if r.image >= 0]
    batch["image_embeds"] = xv[torch.tensor(images)] if images else None  # (N_img, G, D_v), rows in order
    return batch


def forward_loss(model, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """The model's forward with cached grid embeddings: fuse -> decoder -> next-token CE on the answer tokens."""
    import torch.nn.functional as F

    embeds, _, _, _ = model.fuse(batch["input_ids"], batch["attention_mask"], batch["image_embeds"],
                                 batch.get("pool_mask"))
    logits = model.supervised_logits(embeds, batch["attention_mask"], batch["labels"])  # (N, V): answer tokens only
    return F.cross_entropy(logits.float(), model.supervised_targets(batch["labels"]), reduction=reduction)


@torch.no_grad()
def validation_loss(model, examples: list[Example], processor, xv, batch_size: int) -> float:
    model.eval()
    total, n = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: examples[i].encoded.input_ids.shape[0])
    for k in range(0, len(order), batch_size):
        batch = make_batch(examples, order[k : k + batch_size], processor, xv)
        total += float(forward_loss(model, batch, reduction="sum"))
        n += batch["n_targets"]
    return total / max(n, 1)


def train_stage(model, processor, spec: StageSpec, train: list[Example], val: list[Example],
                xv_train: Optional[torch.Tensor], xv_val: Optional[torch.Tensor], seed: int, label: str,
                progress: bool = True, log: Callable[[str], None] = print, position: int = 0) -> dict:
    """One stage: AdamW (the trainer's parameter groups: no decay on SSM dynamics, biases, norms), warmup + cosine,
    grad clipping, validation perplexity after every epoch, the best epoch's weights kept. Returns the stage stats
    (per-step losses, val perplexities, samples/s, tokens/s, peak memory)."""
    from tqdm.auto import tqdm

    from ..train.optim import apply_trainable, lr_factor, param_groups, set_train_modes
    from ..train.recipe import OptimConfig

    lrs = {"vision": 0.0, "cmm": spec.lr_fusion, "language": spec.lr_language}
    apply_trainable(model, lrs)
    optim_cfg = OptimConfig(betas=(0.9, 0.95), weight_decay=spec.weight_decay, grad_clip=spec.grad_clip,
                            schedule="cosine", warmup_ratio=spec.warmup_ratio)
    groups = param_groups(model, lrs, spec.weight_decay)
    trainable = sum(p.numel() for g in groups for p in g["params"])
    opt = torch.optim.AdamW(groups, betas=optim_cfg.betas, eps=optim_cfg.eps, fused=True)  # one kernel per step
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    gen = torch.Generator().manual_seed(seed)
    if spec.max_samples is not None and len(train) > spec.max_samples:
        keep = torch.randperm(len(train), generator=gen)[: spec.max_samples].tolist()
        train = [train[i] for i in sorted(keep)]
    if len(val) > spec.val_samples:
        val = val[: spec.val_samples]
    n_epochs = max(1, math.ceil(spec.epochs))
    plans = []
    for e in range(n_epochs):
        plan = plan_batches(train, spec.batch_size, gen)
        if e == n_epochs - 1 and spec.epochs < n_epochs:  # a fractional last epoch
            plan = plan[: max(1, int(round(len(plan) * (spec.epochs - (n_epochs - 1)))))]
        plans.append(plan)
    total = sum(len(p) for p in plans)

    torch.manual_seed(seed)  # dropout masks
    reset_peak_memory()
    losses, val_ppl = [], []
    best, best_state = math.inf, None
    samples = tokens = 0
    t_train = 0.0
    step = 0
    bar = tqdm(total=total, desc=f"{label} {spec.name}", unit="step", disable=not progress, leave=False,
               position=position)
    for epoch, plan in enumerate(plans):
        set_train_modes(model, lrs)
        t0 = time.perf_counter()
        for idx in plan:
            batch = make_batch(train, idx, processor, xv_train)
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * lr_factor(step, total, optim_cfg)
            loss = forward_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if spec.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], spec.grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
            samples += batch["n_rows"]
            tokens += batch["n_tokens"]
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", epoch=epoch + 1)
        t_train += time.perf_counter() - t0
        if val:
            v = validation_loss(model, val, processor, xv_val, max(spec.batch_size, 64))
            val_ppl.append(math.exp(min(v, 50.0)))
            if v < best:
                best = v
                best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
    bar.close()
    if best_state is not None and len(val_ppl) > 1:
        model.load_state_dict(best_state)
    model.eval()
    stats = {
        "steps": total, "samples": samples, "tokens": tokens, "seconds": t_train,
        "samples_per_s": samples / max(t_train, 1e-9), "tokens_per_s": tokens / max(t_train, 1e-9),
        "peak_memory_mb": peak_memory_mb(), "trainable_params": trainable, "losses": losses, "val_ppl": val_ppl,
        "best_epoch": int(np.argmin(val_ppl)) + 1 if val_ppl else None,
        "train_records": len(train),
    }
    log(f"{label} {spec.name}: {total} steps, {samples} samples in {t_train:.1f} s -> "
        f"{stats['samples_per_s']:.1f} samples/s ({stats['tokens_per_s']:.0f} tokens/s), peak memory "
        f"{stats['peak_memory_mb']:.0f} MiB, val ppl {', '.join(f'{p:.3f}' for p in val_ppl) or '-'}"
        + (f" (best epoch {stats['best_epoch']})" if val_ppl else ""))
    return stats


# ---------------------------------------------------------------------------------------------- evaluation
def expand_prompts(processor, prompts: list[str]) -> dict:
    """Left-padded input_ids / attention_mask, `<image>` expanded to image_seq_length tokens (as the processor does)."""
    from ..processing import IMAGE_TOKEN

    texts = [p.replace(IMAGE_TOKEN, IMAGE_TOKEN * processor.image_seq_length) for p in prompts]
    enc = processor.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    image_embeds: Optional[torch.Tensor], max_new_tokens: int, stop_at_eos: bool = True) -> torch.Tensor:
    """Greedy decoding from cached grid embeddings with the model's own pieces (fuse -> prefill -> decode_step), the
    same computation as `model.generate(pixel_values=...)` (`stop_at_eos=False` = its `ignore_eos=True`).
    Returns (B, T + new) like generate."""
    tc = model.config.text_config  # generate's defaults: the decoder config's EOS and pad ids
    eos = [] if tc.eos_token_id is None else ([tc.eos_token_id] if isinstance(tc.eos_token_id, int) else list(tc.eos_token_id))
    pad = tc.pad_token_id if tc.pad_token_id is not None else (eos[0] if eos else 0)
    eos_t = torch.tensor(eos if stop_at_eos else [], dtype=torch.long)
    embeds, memory, state, _ = model.fuse(input_ids, attention_mask, image_embeds)
    out = model.prefill(embeds, attention_mask, memory, state, use_cache=True, logits_to_keep=1)
    cache = out.cache
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool)
    seq = input_ids
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].float().argmax(-1)
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad))
        unfinished &= ~torch.isin(nxt, eos_t)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if step == max_new_tokens - 1 or not bool(unfinished.any()):
            break
        out = model.decode_step(nxt[:, None], cache, logits_to_keep=1)
    return seq


def evaluate_model(model, processor, items: list, xv_test: Optional[torch.Tensor], image_index: dict[str, int],
                   with_image: bool, batch_size: int, max_new_tokens: int, label: str, progress: bool = True,
                   position: int = 0) -> dict:
    """Greedy answers for every test item, scored by firebolt_vl.eval's synthetic scorer.
    Returns {"scores": scorer output, "predictions": {question_id: answer}, "seconds", "questions_per_s"}."""
    from tqdm.auto import tqdm

    from ..eval import score

    model.eval()
    prompts = [processor.build_prompt(it.prompt, with_image=with_image) for it in items]
    lengths = [len(ids) for ids in processor.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(items)), key=lambda i: (lengths[i], i))
    preds: dict = {}
    t0 = time.perf_counter()
    bar = tqdm(total=len(items), desc=f"eval {label}", unit="q", disable=not progress, leave=False,
               position=position)
    for k in range(0, len(order), batch_size):
        rows = order[k : k + batch_size]
        enc = expand_prompts(processor, [prompts[i] for i in rows])
        embeds = None
        if with_image:
            embeds = xv_test[torch.tensor([image_index[_item_image_key(items[i])] for i in rows])]
        out = greedy_generate(model, enc["input_ids"], enc["attention_mask"], embeds, max_new_tokens)
        answers = processor.batch_decode(out[:, enc["input_ids"].shape[1] :])
        for i, a in zip(rows, answers):
            preds[items[i].question_id] = a.strip()
        bar.update(len(rows))
    bar.close()
    dt = time.perf_counter() - t0
    return {"scores": score("synthetic", items, preds), "predictions": preds, "seconds": dt,
            "questions_per_s": len(items) / max(dt, 1e-9)}


def _item_image_key(item) -> str:
    """The item's image path relative to the data folder (images/<split>/<n>.png)."""
    p = Path(item.image.path)
    return f"{p.parent.parent.name}/{p.parent.name}/{p.name}"


def family_table(scores: dict) -> dict[str, float]:
    """{family: accuracy %} from the synthetic scorer's output (existence: POPE accuracy), plus "overall"."""
    out = {}
    for fam, res in scores["families"].items():
        out[fam] = float(res["accuracy"])
    out["overall"] = float(scores["overall"])
    return out


# ---------------------------------------------------------------------------------------------- jobs
# The expensive phases run as jobs. The three model jobs: one process each, one torch thread each, up to `workers` at
# a time; on a small CPU this is much faster than one process with several threads (the demo's matrices are small,
# and threads that spin-wait collapse as soon as another process competes for the cores). The two pretraining jobs:
# one after the other in this process, with `pretrain_threads` threads (nothing else competes then). Deterministic
# either way: each job seeds itself and reads everything it needs from disk, so the results do not depend on the
# schedule.
@dataclass
class DemoPaths:
    out: Path
    data: Path
    work: Path

    @property
    def tokenizer(self) -> Path:
        return self.work / "tokenizer"

    @property
    def vision(self) -> Path:
        return self.work / "vision"

    @property
    def language(self) -> Path:
        return self.work / "language"

    @property
    def embeds(self) -> Path:
        return self.work / "image_embeds.pt"

    def model_dir(self, name: str) -> Path:
        return self.out / "model" if name == "firebolt" else self.out / "controls" / name


def _init_worker(threads: int) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # no per-process notices (e.g. the causal_conv1d fallback)
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


JOBS: dict[str, Callable] = {}  # name -> job function (filled below); workers look jobs up by name


def run_jobs(jobs: list[tuple[str, tuple]], workers: int, threads: int, scratch: Path) -> list:
    """Run `JOBS[name](*args)` for each job, `workers` processes at a time (`python -m firebolt_vl.demo.worker`, with
    `threads` torch threads each), or in this process when workers == 1. Arguments and results travel as pickles in
    `scratch`. Returns the results in job order; raises if a job fails (its traceback is on stderr)."""
    if workers <= 1 or len(jobs) <= 1:
        previous = torch.get_num_threads()
        _init_worker(threads)
        try:
            return [JOBS[name](*args) for name, args in jobs]
        finally:
            torch.set_num_threads(previous)
    import pickle
    import subprocess

    scratch.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               FIREBOLT_DEMO_THREADS=str(threads))
    pending = list(enumerate(jobs))
    running: dict[int, subprocess.Popen] = {}
    results: dict[int, object] = {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                k, (name, args) = pending.pop(0)
                spec = scratch / f"job{k}-{name}.in.pkl"
                spec.write_bytes(pickle.dumps((name, args)))
                running[k] = subprocess.Popen([sys.executable, "-m", "firebolt_vl.demo.worker", str(spec),
                                               str(scratch / f"job{k}-{name}.out.pkl")], env=env)
            for k, proc in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[k]
                name = jobs[k][0]
                out = scratch / f"job{k}-{name}.out.pkl"
                if proc.returncode != 0 or not out.is_file():
                    raise RuntimeError(f"demo job {name!r} failed (exit status {proc.returncode}); see its error above")
                results[k] = pickle.loads(out.read_bytes())
            time.sleep(0.2)
    finally:
        for proc in running.values():  # a failure or an interrupt: stop the jobs still running
            proc.terminate()
        for proc in running.values():
            proc.wait()
    return [results[k] for k in range(len(jobs))]


def _log(line: str) -> None:
    print(line, flush=True)


def vision_job(cfg: DemoConfig, paths: DemoPaths, progress: bool, position: int) -> dict:
    """Tiny SigLIP pretraining on the training captions; the vision tower is saved to paths.vision."""
    from transformers import AutoTokenizer

    from .vision_pretrain import pretrain_vision

    seed_everything(cfg.seed)
    reset_peak_memory()
    tokenizer = AutoTokenizer.from_pretrained(paths.tokenizer)
    caps = {s: read_jsonl(paths.data / f"captions_{s}.jsonl") for s in ("train", "val")}
    images = {s: load_images(paths.data, [c["image"] for c in caps[s]], cfg.image_size) for s in caps}
    stats = pretrain_vision(images["train"], [c["caption"] for c in caps["train"]], tokenizer, cfg.geometry(),
                            paths.vision, cfg.vision, seed=cfg.seed,
                            val=(images["val"], [c["caption"] for c in caps["val"]]), progress=progress,
                            position=position)
    stats["peak_memory_mb"] = peak_memory_mb()
    _log(f"vision pretrain (SigLIP sigmoid loss): {stats['steps']} steps, {stats['samples_per_s']:.1f} views/s, "
         f"peak memory {stats['peak_memory_mb']:.0f} MiB, loss {np.mean(stats['losses'][:10]):.2f} -> "
         f"{np.mean(stats['losses'][-10:]):.2f}; held-out phrase precision "
         + ", ".join(f"{k} {v['precision']:.1f}%" for k, v in stats.get("val", {}).items()))
    return stats


def language_job(cfg: DemoConfig, paths: DemoPaths, progress: bool, position: int) -> dict:
    """A random tiny LFM2 (+ the tokenizer) in HF layout, pretrained on the synthetic text when configured."""
    from transformers import AutoTokenizer

    from .text_pretrain import pretrain_language, pretraining_texts

    seed_everything(cfg.seed)
    reset_peak_memory()
    tokenizer = AutoTokenizer.from_pretrained(paths.tokenizer)
    write_language_checkpoint(paths.language, cfg, tokenizer)
    if cfg.text.epochs <= 0:
        return {}
    texts = pretraining_texts([c["caption"] for c in read_jsonl(paths.data / "captions_train.jsonl")],
                              [r["conversations"][0]["value"] for r in read_jsonl(paths.data / "train.jsonl")])
    stats = pretrain_language(paths.language, texts, cfg.text, seed=cfg.seed, progress=progress, position=position,
                              peak_memory=peak_memory_mb)
    _log(f"text pretrain (LFM2 on the synthetic text): {stats['steps']} steps, {stats['samples_per_s']:.1f} "
         f"samples/s, peak memory {stats['peak_memory_mb']:.0f} MiB, loss {np.mean(stats['losses'][:10]):.2f} -> "
         f"{np.mean(stats['losses'][-10:]):.2f}")
    return stats


def model_job(name: str, cfg: DemoConfig, paths: DemoPaths, progress: bool, position: int) -> dict:
    """Build one model from the pretrained components, train stage 1 and stage 2 on the cached grid embeddings,
    evaluate it on the test split, save it. Returns its accuracy table, scores and stage stats."""
    from ..eval import load_benchmark
    from ..hub import save_model_dir

    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    fusion = "prepend" if name == "prepend" else "cmm"
    with_image = name != "blind"
    title = MODEL_TITLES[name]
    xv = torch.load(paths.embeds) if with_image else {"train": None, "val": None, "test": None}
    index = {}
    caps, q = {}, {}
    for s in ("train", "val", "test"):
        caps[s] = read_jsonl(paths.data / f"captions_{s}.jsonl")
        index[s] = {c["image"]: i for i, c in enumerate(caps[s])}
    for s in ("train", "val"):
        q[s] = read_jsonl(paths.data / f"{s}.jsonl")
    model, processor = build_model(paths.vision, paths.language, cfg, fusion, cfg.seed)
    stats = {}
    stages = ((cfg.stage1, caption_conversations, caps["train"], caps["val"]),
              (cfg.stage2, question_conversations, pack_turns(q["train"], cfg.stage2.turns_per_conversation, cfg.seed),
               q["val"]))
    for spec, convs, train_records, val_records in stages:
        train = encode_examples(processor, convs(train_records, with_image), index["train"], spec.max_length)
        val = encode_examples(processor, convs(val_records, with_image), index["val"], spec.max_length)
        stats[spec.name] = train_stage(model, processor, spec, train, val, xv["train"], xv["val"], cfg.seed, title,
                                       progress, _log, position)
    items = load_benchmark("synthetic", paths.data, split="test")
    ev = evaluate_model(model, processor, items, xv["test"], index["test"], with_image, cfg.eval_batch_size,
                        cfg.max_new_tokens, title, progress, position)
    table = family_table(ev["scores"])
    _log(f"{title}: overall {table['overall']:.1f}% on {len(items)} test questions "
         f"({ev['questions_per_s']:.0f} questions/s)")
    save_model_dir(model, processor, paths.model_dir(name))
    _write_predictions(paths.out / "predictions" / f"{name}.jsonl", items, ev["predictions"])
    return {"fusion": fusion, "with_image": with_image, "accuracy": table, "scores": ev["scores"], "stages": stats,
            "eval_seconds": ev["seconds"], "seconds": time.perf_counter() - t0, "n_test": len(items),
            "model_dir": str(paths.model_dir(name))}


JOBS.update(vision=vision_job, language=language_job, model=model_job)


# ---------------------------------------------------------------------------------------------- the whole demo
def run_demo(output_dir="runs/demo", cfg: Optional[DemoConfig] = None, progress: bool = True,
             log: Callable[[str], None] = _log) -> dict:
    """Run every phase into `output_dir` and return the metrics dict (also written to metrics.json)."""
    from ..data.synthetic import generate_synthetic
    from ..processing import atomic_write_text
    from .report import answer_example, format_results, write_loss_curves

    cfg = cfg or DemoConfig()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = DemoPaths(out=out, data=out / "data", work=out / "components")
    paths.work.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # no notices such as the causal_conv1d fallback in the demo's output
    seed_everything(cfg.seed)
    clock = PhaseClock(log)
    try:
        with clock.phase("data"):
            manifest = generate_synthetic(paths.data, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test,
                                          seed=cfg.seed, image_size=cfg.image_size, progress=progress,
                                          per_quadrant=cfg.per_quadrant, families=cfg.families)
            q_train = read_jsonl(paths.data / "train.jsonl")
            caps_train = read_jsonl(paths.data / "captions_train.jsonl")
            log("data: " + ", ".join(f"{s} {v['images']} images / {v['questions']} questions"
                                     for s, v in manifest["splits"].items())
                + (" (reused)" if manifest.get("reused") else ""))

        with clock.phase("tokenizer"):
            tokenizer = build_tokenizer(q_train, caps_train, cfg.vocab_size)
            tokenizer.save_pretrained(paths.tokenizer)
            log(f"tokenizer: byte-level BPE trained on the synthetic text, {len(tokenizer)} tokens")

        with clock.phase("pretrain"):  # the vision tower, then the decoder
            vstats, tstats = run_jobs([("vision", (cfg, paths, progress, 0)), ("language", (cfg, paths, progress, 1))],
                                      1, cfg.pretrain_threads, paths.work / "jobs")

        with clock.phase("encode"):  # the frozen tower's grid embeddings X_v, once per image
            model, _ = build_model(paths.vision, paths.language, cfg, "cmm", cfg.seed)
            xv = {}
            for s in ("train", "val", "test"):
                caps = read_jsonl(paths.data / f"captions_{s}.jsonl")
                images = load_images(paths.data, [c["image"] for c in caps], cfg.image_size)
                xv[s] = encode_image_grid(model, images, progress=progress, desc=f"encode {s} images")
            torch.save(xv, paths.embeds)
            log("grid embeddings X_v: " + ", ".join(f"{s} {tuple(v.shape)}" for s, v in xv.items()))
            del model, xv

        with clock.phase("models"):  # the three models, side by side
            outs = run_jobs([("model", (name, cfg, paths, progress, k)) for k, name in enumerate(cfg.models)],
                            cfg.workers, cfg.threads, paths.work / "jobs")
            results = dict(zip(cfg.models, outs))

        with clock.phase("report"):
            example = None
            if "firebolt" in results:
                from ..eval import load_benchmark

                example = answer_example(paths.model_dir("firebolt"), paths.data,
                                         load_benchmark("synthetic", paths.data, split="test"))
            n_test = next(iter(results.values()))["n_test"] if results else 0
            metrics = {
                "accuracy": {name: r["accuracy"] for name, r in results.items()},
                "families": sorted({f for r in results.values() for f in r["accuracy"] if f != "overall"}),
                "n_test_questions": n_test,
                "models": {name: {k: v for k, v in r.items() if k != "stages"} | {"stages": _stage_summary(r["stages"])}
                           for name, r in results.items()},
                "vision_pretrain": {k: v for k, v in vstats.items() if k != "losses"},
                "text_pretrain": {k: v for k, v in tstats.items() if k != "losses"} or None,
                "example": example,
                "config": cfg.to_dict(),
                "data": {"dir": str(paths.data), "splits": manifest["splits"]},
                "model_dir": str(paths.model_dir("firebolt")) if "firebolt" in results else None,
            }
            if "firebolt" in results and "blind" in results:
                metrics["gain_over_blind"] = (results["firebolt"]["accuracy"]["overall"]
                                              - results["blind"]["accuracy"]["overall"])
            curves = {"vision_pretrain": vstats["losses"]}
            if tstats:
                curves["text_pretrain"] = tstats["losses"]
            for name, r in results.items():
                for sname, st in r["stages"].items():
                    curves[f"{name}/{sname}"] = st["losses"]
            write_loss_curves(out / "loss_curves.png", curves)
            metrics["loss_curves"] = str(out / "loss_curves.png")
            atomic_write_text(out / "losses.json", json.dumps(curves))
    finally:
        torch.set_num_threads(threads)
        hf_logging.set_verbosity(verbosity)
    metrics["seconds"] = {k: round(v, 2) for k, v in clock.seconds.items()}
    metrics["seconds"]["total"] = round(clock.total(), 2)
    metrics["seconds"]["per_model"] = {name: round(r["seconds"], 2) for name, r in results.items()}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=float))
    log(format_results(metrics))
    return metrics


def _stage_summary(stages: dict) -> dict:
    return {k: {kk: vv for kk, vv in v.items() if kk != "losses"} | {"final_loss": float(np.mean(v["losses"][-10:]))}
            for k, v in stages.items()}


def _write_predictions(path: Path, items, preds: dict) -> None:
    from ..processing import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"question_id": it.question_id, "family": it.meta.get("family"),
                         "answer": preds.get(it.question_id, ""), "gold": it.meta.get("answer")}) for it in items]
    atomic_write_text(path, "\n".join(lines) + "\n")


__all__ = ["DemoConfig", "StageSpec", "run_demo", "train_stage", "evaluate_model", "greedy_generate",
           "expand_prompts", "MODELS", "MODEL_TITLES"]
