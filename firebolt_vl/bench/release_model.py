"""A release-shaped Firebolt-VL for `firebolt-vl bench --preset release`: random weights written in the format of the
authors' released checkpoint (github huyquoctrinh/Firebolt-VL @ 0429f93, `FireboltLMForCausalLM.save_pretrained`),
then converted by `firebolt_vl.release.convert_release`, the path a user's `convert-release` takes.

Shapes (the release's): SigLIP2-base patch16 at 256 px (vision tower only; the converter drops the text tower, so it
is not written), LiquidAI/LFM2-350M, the CMM TokenGridCorrFiLMS4 (4 x 32 heads, top-k 4, gate 0.5) with the
state-spaces S4Block at H = 1024, N = 64 (32 stored complex modes, HiPPO-LegS DPLR init, dt log-uniform in
[1e-3, 1e-1]) holding C~ = C (I - dA^512) with l_kernel 512, as after the release's first forward. The converted
model has the S4 as the full 64-dim pair system (d_state 128), the 512-tap window, and native views (256 px global +
128 px tiles with 2 px overlap).

Directory written (a temporary one, removed after the conversion):
    lfm2/      config.json + the tokenizer (no weights: the release holds them under base_lm.*)
    siglip/    config.json (siglip_vision_model) + preprocessor_config.json
    release/   config.json (model_type fireboltlm) + model.safetensors
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch


def release_s4_tensors(H: int, gen: torch.Generator, l_kernel: int = 512, dt_min: float = 1e-3,
                       dt_max: float = 1e-1) -> dict[str, torch.Tensor]:
    """The state-spaces S4Block's stored tensors (keys under `s4.`) at its init, C~ formed as its first forward does."""
    from ..release import dense_bilinear
    from ..ssm.s4 import hippo_legs_nplr

    lam, p, b = hippo_legs_nplr(64)  # (32,) each, complex128: one mode of each conjugate pair
    N2 = lam.shape[0]
    lam, p, b = lam.repeat(H, 1), p.repeat(H, 1), b.repeat(H, 1)  # (H, N2)
    c = torch.complex(torch.randn(H, N2, generator=gen, dtype=torch.float64),
                      torch.randn(H, N2, generator=gen, dtype=torch.float64)) / math.sqrt(2)
    log_dt = math.log(dt_min) + torch.rand(H, 1, generator=gen, dtype=torch.float64) * math.log(dt_max / dt_min)
    if l_kernel:  # C~ = c (I - dA^n) over the full 2*N2 system [x, conj x]
        full = lambda z: torch.cat([z, z.conj()], -1)  # noqa: E731
        dA, _ = dense_bilinear(torch.exp(log_dt[:, 0]), full(lam), full(p), full(b))
        eye = torch.eye(2 * N2, dtype=dA.dtype)
        c = (full(c).unsqueeze(-2) @ (eye - torch.linalg.matrix_power(dA, l_kernel))).squeeze(-2)[:, :N2]
    r = lambda z: torch.view_as_real(z)[None].float().contiguous()  # noqa: E731  (1, H, N2, 2)
    return {"layer.kernel.inv_dt": log_dt.float(), "layer.kernel.A_real": torch.log(-lam.real).float(),
            "layer.kernel.A_imag": (-lam.imag).float(), "layer.kernel.P": r(p), "layer.kernel.B": r(b),
            "layer.kernel.C": r(c), "layer.kernel.l_kernel": torch.tensor(l_kernel),
            "layer.D": torch.randn(1, H, generator=gen)}


def release_cmm_tensors(D: int, Dv: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """TokenGridCorrFiLMS4's stored tensors (keys under the fuser's `model.`), PyTorch-default-like random init."""
    lin = lambda o, i: (torch.rand(o, i, generator=gen) * 2 - 1) / math.sqrt(i)  # noqa: E731
    vec = lambda n, i: (torch.rand(n, generator=gen) * 2 - 1) / math.sqrt(i)  # noqa: E731
    inner = 4 * 32
    cmm = {"q_proj.weight": lin(inner, D), "k_proj.weight": lin(inner, Dv), "v_proj.weight": lin(D, Dv),
           "film_in.weight": lin(2 * D, D), "film_in.bias": vec(2 * D, D), "film_out.weight": lin(2 * D, D),
           "film_out.bias": vec(2 * D, D), "mod_gate": torch.tensor(0.5),
           "ffn.1.weight": lin(4 * D, D), "ffn.1.bias": vec(4 * D, D), "ffn.4.weight": lin(D, 4 * D),
           "ffn.4.bias": vec(D, 4 * D)}
    for n in ("norm_in", "norm_out", "ffn.0"):
        cmm[f"{n}.weight"], cmm[f"{n}.bias"] = torch.ones(D), torch.zeros(D)
    s4 = release_s4_tensors(D, gen)
    s4["output_linear.0.weight"] = lin(2 * D, D)[..., None]  # Conv1d(H, 2H, 1)
    s4["output_linear.0.bias"] = vec(2 * D, D)
    cmm.update({f"s4.{k}": v for k, v in s4.items()})
    return cmm


def write_release_dir(root: Path, text: dict, vision: dict, tokenizer, seed: int = 0) -> Path:
    """Write a release-format directory with random weights at the given shapes under `root`; returns its path."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from ..processing import ensure_image_token
    from ..release import CMM_PREFIX, LM_PREFIX, VISION_PREFIX

    root = Path(root)
    image_token_id = ensure_image_token(tokenizer)
    lm_cfg = AutoConfig.for_model(**text)
    (root / "lfm2").mkdir(parents=True)
    lm_cfg.save_pretrained(root / "lfm2")
    tokenizer.save_pretrained(root / "lfm2")
    vcfg = SiglipVisionConfig(**{k: v for k, v in vision.items() if k != "model_type"})
    (root / "siglip").mkdir()
    vcfg.save_pretrained(root / "siglip")
    side = vcfg.image_size
    (root / "siglip" / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": side, "width": side},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))

    torch.manual_seed(seed)
    state = {}
    lm = AutoModelForCausalLM.from_config(lm_cfg)
    state.update({f"{LM_PREFIX}{k}": v for k, v in lm.state_dict().items() if k != "lm_head.weight"})  # tied head
    del lm
    tower = SiglipVisionModel(vcfg)
    tower_state = tower.state_dict()
    if not any(k.startswith("vision_model.") for k in tower_state):  # transformers 5 drops the inner prefix here
        tower_state = {f"vision_model.{k}": v for k, v in tower_state.items()}
    # the dual encoder's vision tower as SiglipModel names it, fp16 as released
    state.update({f"{VISION_PREFIX}{k}": v.half() for k, v in tower_state.items()})
    del tower
    gen = torch.Generator().manual_seed(seed + 1)
    state.update({f"{CMM_PREFIX}{k}": v for k, v in
                  release_cmm_tensors(lm_cfg.hidden_size, vcfg.hidden_size, gen).items()})
    src = root / "release"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(src / "model.safetensors"))
    del state
    config = {"model_type": "fireboltlm", "architectures": ["FireboltLMForCausalLM"],
              "lm_name_or_path": str(root / "lfm2"), "vision_ckpt_path": str(root / "siglip"),
              "fuse_strategy": "cossm", "image_token_id": image_token_id, "vocab_size": lm_cfg.vocab_size,
              "tie_word_embeddings": True}
    (src / "config.json").write_text(json.dumps(config))
    return src


def release_s4_reference(s4: dict[str, torch.Tensor], u: torch.Tensor, window: int = 512) -> torch.Tensor:
    """The release S4Block's pre-activation K * u + D u in float64, from its stored tensors: the full 2*N2 system
    (dense), plain c recovered from C~, the kernel cut at `window` taps, direct convolution. u (B, L, H)."""
    from ..release import dense_bilinear, plain_c, release_s4_full_system

    dt, lam, p, b, c_stored, n = release_s4_full_system(s4)
    c = plain_c(dt, lam, p, b, c_stored, n)  # (H, 2N2)
    dA, v = dense_bilinear(dt, lam, p, b)
    L = u.shape[1]
    y = s4["layer.D"].double().reshape(-1) * u.double()
    for k in range(min(window, L)):
        y[:, k:] += (c * v).sum(-1).real * u[:, : L - k].double()  # tap k = c dA^k dB (real: conjugate halves)
        v = torch.einsum("hnm,hm->hn", dA, v)
    return y


def s4_exactness(model, s4: dict[str, torch.Tensor], length: int = 600, seed: int = 0) -> dict:
    """Max abs difference between the converted S4 (its scan, as a CPU decodes at batch 1) and the release's S4 in
    float64 (`release_s4_reference`) on random inputs longer than the window."""
    ssm = model.cmm.ssm
    u = torch.randn(1, length, ssm.d_model, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        got, _ = ssm(u)
        want = ssm._output(release_s4_reference(s4, u, ssm.window or length).float())
        err = (got - want).abs()
    return {"tokens": length, "window": ssm.window, "max_abs_err": float(err.max()),
            "max_abs_err_past_window": float(err[:, ssm.window:].max()) if ssm.window and length > ssm.window else None,
            "output_scale": float(want.abs().max())}


def build_release_model(text: dict, vision: dict, tokenizer, seed: int = 0, check_tokens: int = 600):
    """(converted model in eval mode, processor, conversion report) of a release-shaped random checkpoint. The report
    gains `s4_check`: the converted S4 against the release's S4 in float64 over `check_tokens` tokens (0 = skip)."""
    from safetensors import safe_open

    from ..release import CMM_PREFIX, convert_release

    with tempfile.TemporaryDirectory(prefix="firebolt-release-bench-") as tmp:
        src = write_release_dir(Path(tmp), text, vision, tokenizer, seed)
        model, processor, report = convert_release(src, verbose=False)
        with safe_open(str(src / "model.safetensors"), "pt") as f:
            s4 = {k[len(CMM_PREFIX) + 3:]: f.get_tensor(k) for k in f.keys() if k.startswith(CMM_PREFIX + "s4.")}
    report = {k: v for k, v in report.items() if k not in ("source", "lm", "vision", "tokenizer")}  # temporary paths
    if check_tokens:
        report["s4_check"] = s4_exactness(model, s4, check_tokens, seed)
    return model, processor, report


__all__ = ["build_release_model", "write_release_dir", "release_cmm_tensors", "release_s4_tensors",
           "release_s4_reference", "s4_exactness"]
