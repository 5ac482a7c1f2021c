"""Prefill scaling: how fusion + decoder prefill grow with the prompt length and with the number of grids.

Glossary
    T text tokens of the prompt   G grids (views) per image   n image tokens per grid of a prepend design
    D decoder width               D_v vision width

The vision encoder is left out (its cost per grid is the same for every design and appears in the TTFT figures):
grid embeddings are random (1, G, D_v) tensors, so each point times exactly what the fusion design adds.

    firebolt (CMM)      fusion: CMM over the T text tokens against G grid keys -> O(T G) correlation + O(T log T)
                        SSM; the decoder sees T + 1 tokens whatever G is
    prepend (1/grid)    fusion: MLP projector per grid; the decoder sees T + G tokens
    lfm2_vl (256/tile)  LFM2-VL's layout: n = 256 image tokens per 512 px tile (projector over the unshuffled patch
                        grid); the decoder sees T + n G tokens, and attention makes that superlinear (G <= 11: its
                        processor makes at most 10 tiles + a thumbnail)
"""

from __future__ import annotations

import torch

from .measure import now


def _text_ids(tokenizer, T: int, generator: torch.Generator) -> torch.Tensor:
    """(1, T) ordinary token ids (no special tokens), deterministic."""
    specials = set(tokenizer.all_special_ids)
    pool = torch.tensor([i for i in range(min(len(tokenizer), 512)) if i not in specials])
    return pool[torch.randint(len(pool), (1, T), generator=generator)]


@torch.no_grad()
def _time(fn, device, repeats: int) -> float:
    best = None
    for _ in range(repeats):
        t0 = now(device)
        fn()
        dt = now(device) - t0
        best = dt if best is None else min(best, dt)
    return best


@torch.no_grad()
def _firebolt_point(variant, text_ids, G: int, device, repeats: int) -> dict:
    """CMM design: one <image> slot + T text tokens; X_v (1, G, D_v)."""
    model = variant.model
    cfg = model.config
    ids = torch.cat([torch.tensor([[cfg.image_token_id]]), text_ids], 1).to(device)
    mask = torch.ones_like(ids)
    x_v = torch.randn(1, G, cfg.vision_config.hidden_size, device=device, dtype=variant.dtype)
    fused = {}

    def fuse():
        fused["v"] = model.fuse(ids, mask, x_v)

    def prefill():
        embeds, memory, state, _ = fused["v"]
        model.prefill(embeds, mask, memory, state, use_cache=True, logits_to_keep=1)

    fuse()
    f = _time(fuse, device, repeats)
    p = _time(prefill, device, repeats)
    return {"fusion_s": f, "prefill_s": p, "total_s": f + p, "decoder_tokens": int(ids.shape[1])}


@torch.no_grad()
def _prepend_point(variant, text_ids, G: int, device, repeats: int) -> dict:
    """Prepend design: G projected grid tokens written at G <image> slots before the T text tokens. The projection
    is written here rather than through `model.fuse`, which checks the slot count against the config's grid count,
    while this sweep varies G."""
    model = variant.model
    cfg = model.config
    ids = torch.cat([torch.full((1, G), cfg.image_token_id), text_ids], 1).to(device)
    mask = torch.ones_like(ids)
    x_v = torch.randn(1, G, cfg.vision_config.hidden_size, device=device, dtype=variant.dtype)
    fused = {}

    def fuse():
        text = model.get_input_embeddings()(ids)  # (1, G + T, D)
        visual = model.projector(x_v)  # (1, G, D)
        slot = (ids == cfg.image_token_id).unsqueeze(-1).expand_as(text)
        fused["v"] = text.masked_scatter(slot, visual.reshape(-1).to(text.dtype))

    def prefill():
        model.prefill(fused["v"], mask, None, None, use_cache=True, logits_to_keep=1)

    fuse()
    f = _time(fuse, device, repeats)
    p = _time(prefill, device, repeats)
    return {"fusion_s": f, "prefill_s": p, "total_s": f + p, "decoder_tokens": int(ids.shape[1])}


@torch.no_grad()
def _lfm2_vl_point(variant, text_ids, G: int, device, repeats: int) -> dict:
    """LFM2-VL layout: G tiles of n image tokens (projector over each tile's patch grid) + T text tokens."""
    from transformers import DynamicCache

    model = variant.model
    p = variant.preset
    side = p.vl_tile // p.vl_patch  # patches per tile side
    n = (side // p.vl_downsample) ** 2
    hidden = torch.randn(G, side, side, model.config.vision_config.hidden_size, device=device, dtype=variant.dtype)
    ids = torch.cat([torch.full((1, n * G), model.config.image_token_id), text_ids], 1).to(device)
    mask = torch.ones_like(ids)
    projector = model.model.multi_modal_projector
    fused = {}

    def fuse():
        feats = projector(hidden).reshape(-1, model.config.text_config.hidden_size)  # (G n, D)
        text = model.get_input_embeddings()(ids)
        slot = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(text)
        fused["v"] = text.masked_scatter(slot, feats.to(text.dtype))

    def prefill():
        model(inputs_embeds=fused["v"], attention_mask=mask, cache=DynamicCache(config=model.config.text_config),
              use_cache=True, logits_to_keep=1)

    fuse()
    f = _time(fuse, device, repeats)
    pf = _time(prefill, device, repeats)
    return {"fusion_s": f, "prefill_s": pf, "total_s": f + pf, "decoder_tokens": int(ids.shape[1]), "image_tokens": n * G}


LFM2_VL_MAX_TILES = 11  # Lfm2VlImageProcessor: max_tiles 10, plus the thumbnail
POINTS = {"firebolt": _firebolt_point, "prepend": _prepend_point, "lfm2_vl": _lfm2_vl_point}


def run_scaling(suite, lengths: list[int], grids: list[int], grid_text_tokens: int = 256, repeats: int = 1,
                length_designs=("firebolt", "prepend"), progress=None) -> dict:
    """Two sweeps at batch 1: prefill vs text length T (G = the config's grids) and vs G (T = grid_text_tokens)."""
    device = suite.device
    gen = torch.Generator().manual_seed(0)
    result = {
        "what": "fusion + decoder prefill (first-token logits), batch 1, vision encoder excluded (random grid "
                "embeddings), best of %d" % repeats,
        "prompt_length": {"lengths": list(lengths), "designs": {}},
        "grids": {"grids": list(grids), "text_tokens": grid_text_tokens, "designs": {}},
    }
    G0 = None
    if "firebolt" in suite.variants:
        G0 = suite.variants["firebolt"].model.config.num_grids
    elif "prepend" in suite.variants:
        G0 = suite.variants["prepend"].model.config.num_grids
    texts = {T: _text_ids(suite.tokenizer, T, gen) for T in sorted(set(lengths) | {grid_text_tokens})}
    # warm up each design once on a small input (allocator, kernels)
    for name in POINTS:
        if name in suite.variants:
            POINTS[name](suite.variants[name], texts[min(texts)][:, :16], 1, device, 1)
    for name in length_designs:
        if name not in suite.variants or G0 is None:
            continue
        rows = []
        for T in lengths:
            rows.append({"text_tokens": T, "grids": G0, **POINTS[name](suite.variants[name], texts[T], G0, device, repeats)})
            if progress:
                progress(f"{name} T={T}")
        result["prompt_length"]["designs"][name] = rows
    for name in POINTS:
        if name not in suite.variants:
            continue
        rows = []
        for G in grids:
            if name == "lfm2_vl" and G > LFM2_VL_MAX_TILES:
                continue  # LFM2-VL splits an image into at most 10 tiles + a thumbnail
            rows.append({"grids": G, "text_tokens": grid_text_tokens,
                         **POINTS[name](suite.variants[name], texts[grid_text_tokens], G, device, repeats)})
            if progress:
                progress(f"{name} G={G}")
        result["grids"]["designs"][name] = rows
    # linear fits of the CMM fusion cost (seconds per token, per grid) -- the claim the plots show
    fb = result["prompt_length"]["designs"].get("firebolt")
    if fb and len(fb) >= 2:
        result["prompt_length"]["cmm_fusion_s_per_token"] = _slope([r["text_tokens"] for r in fb], [r["fusion_s"] for r in fb])
    fbg = result["grids"]["designs"].get("firebolt")
    if fbg and len(fbg) >= 2:
        result["grids"]["cmm_fusion_s_per_grid"] = _slope([r["grids"] for r in fbg], [r["fusion_s"] for r in fbg])
    return result


def _slope(x: list[float], y: list[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    den = sum((a - mx) ** 2 for a in x)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / den if den else 0.0
