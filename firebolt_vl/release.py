"""Converting the authors' released Firebolt-VL checkpoint (github huyquoctrinh/Firebolt-VL @ 0429f93, hub
`huyquoctrinh/FireboltVL`) into an ordinary firebolt-vl model directory.

Glossary
    H   d_model of the CMM = LFM2 hidden size (1024)          N2  complex modes the release stores per channel (32)
    L   sequence length                                       W   the release's S4 window, l_max = 512 taps
    D_v SigLIP hidden size (768)

The release directory (`FireboltLMForCausalLM.save_pretrained`):
    config.json         model_type "fireboltlm", fuse_strategy "cossm", the *paths* lm_name_or_path (LFM2) and
                        vision_ckpt_path (SigLIP) that its loader re-opens, image_token_id
    *.safetensors       base_lm.*                                   LFM2 (tied head absent)
                        model.vision_encoder.encoder.model.*        SigLIP dual encoder, fp16 (text tower unused)
                        model.fuser.fuser.model.*                   the CMM (TokenGridCorrFiLMS4) with `s4.*`
                        model.fuser.fuser.importance.*, model.projector.*   unused by the cossm path

CMM (release key -> ours): q_proj, k_proj, v_proj, film_in, film_out, norm_in, norm_out, ffn.{0,1,4} keep their
names; mod_gate -> gate; s4 -> ssm. The release's op order is ours (see cmm.py): top-k 4 of 5 then softmax, mean over
heads, FiLM-in on LN(X_t), SSM, FiLM-out, residual + FFN, LN.

S4 (state-spaces S4Block, DPLR, rank 1, bilinear), per channel, with the release's parameters
    Lambda = -exp(A_real) - i A_imag (N2,),  P, B (N2,) complex,  dt = exp(inv_dt),  C~ stored, l_kernel buffer n.
Its state is the real 2*N2-dimensional system in the complex basis [x, conj x]:
    A_full = diag([Lambda, conj Lambda]) - p p^*,  p = [P, conj P],  b = [B, conj B],  y = c x  (c = [C, conj C])
(the rank-1 correction couples the two halves of every conjugate pair). A model that keeps N2 modes and reads out
2 Re(C x) has A = diag(Lambda) - P P^* instead, a different system. We therefore hold both halves explicitly:
our S4Block with d_state 4*N2 (2*N2 complex modes) and
    Lambda' = [Lambda, conj Lambda], P' = p, B' = b, C' = c / 2      so that 2 Re(C' x) = c x,
which is the release's system exactly (no approximation); the price is twice the modes of a native d_state 64 S4
(2*N2 = 64 complex modes per channel: ~2x the SSM's share of a decoding step, a small part of the whole).
C from C~: the release turns C into C~ = C (I - dA^n) on its first forward (n = l_kernel = 512) and stores C~;
we learn plain C, so we solve c (I - dA^n) = c~ in float64. n = 0 (saved before any forward) means C is plain.
The release's kernel is cut at W = 512 taps (output t sees inputs t-511..t): the converted S4 gets `window` 512 in
its ssm_config (S4Block's windowed mode: the same W-tap convolution in parallel, and an O(1)-per-token recurrence
with a buffer of the last W inputs when decoding), so it equals the release at every length; `window=None`
(`convert-release --no-window`) keeps the untruncated recurrence instead.

S4D (the release's minimal S4DKernel: log_dt, log_A_real, A_imag, C, ZOH, B = 1, full-length kernel) is our S4D
with the same parameterisation: a rename. Mamba checkpoints are refused.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

RELEASE_MODEL_TYPE = "fireboltlm"
SUPPORTED_STRATEGIES = {"cossm": 4, "film": 1}  # fuse_strategy -> the top-k its fuser hard-codes (both 4 x 32 heads)
RELEASE_WINDOW = 512  # S4Block(l_max=512): the kernel is cut at 512 taps
LM_PREFIX = "base_lm."
VISION_PREFIX = "model.vision_encoder.encoder.model."
CMM_PREFIX = "model.fuser.fuser.model."
UNUSED_PREFIXES = ("model.fuser.fuser.importance.", "model.projector.")
# release CMM key -> ours (everything else under CMM_PREFIX except s4.* keeps its name)
CMM_RENAMES = {"mod_gate": "gate"}
CMM_NAMES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "film_in.weight", "film_in.bias", "film_out.weight",
             "film_out.bias", "norm_in.weight", "norm_in.bias", "norm_out.weight", "norm_out.bias", "ffn.0.weight",
             "ffn.0.bias", "ffn.1.weight", "ffn.1.bias", "ffn.4.weight", "ffn.4.bias", "mod_gate")
S4_KEYS = ("layer.D", "layer.kernel.inv_dt", "layer.kernel.A_real", "layer.kernel.A_imag", "layer.kernel.B",
           "layer.kernel.C", "layer.kernel.P", "layer.kernel.l_kernel", "output_linear.0.weight", "output_linear.0.bias")
S4D_KEYS = ("D", "kernel.log_dt", "kernel.log_A_real", "kernel.A_imag", "kernel.C", "output_linear.0.weight",
            "output_linear.0.bias")


class ReleaseFormatError(ValueError):
    """A release directory that cannot be converted; the message says what is wrong and what to pass instead."""


# ---------------------------------------------------------------------------------------------------- detection
def is_release_dir(path) -> bool:
    """True when `path` is a directory whose config.json says model_type "fireboltlm"."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == RELEASE_MODEL_TYPE
    except (json.JSONDecodeError, OSError):
        return False


def convert_command(src) -> str:
    """The exact command that converts release directory `src` next to itself."""
    src = str(src).rstrip("/")
    return f"firebolt-vl convert-release {src} --output {src}-firebolt-vl"


def refusal(src) -> str:
    """One-line message for a loader handed a release directory."""
    return (f"{src} is the authors' released checkpoint (model_type {RELEASE_MODEL_TYPE!r}), not a firebolt-vl model "
            f"directory: convert it once with `{convert_command(src)}` and load the output")


# ---------------------------------------------------------------------------------------------------- reading
def read_release_config(src: Path) -> dict:
    config = src / "config.json"
    if not config.is_file():
        raise ReleaseFormatError(f"{src} is not a Firebolt-VL release directory: config.json is missing")
    try:
        cfg = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise ReleaseFormatError(f"{config} is not valid JSON: {e}") from None
    if cfg.get("model_type") != RELEASE_MODEL_TYPE:
        raise ReleaseFormatError(
            f"{src} is not a Firebolt-VL release directory: config.json says model_type {cfg.get('model_type')!r}, "
            f"the release's is {RELEASE_MODEL_TYPE!r}")
    strategy = cfg.get("fuse_strategy")
    if strategy not in SUPPORTED_STRATEGIES:
        raise ReleaseFormatError(
            f"{src}: fuse_strategy {strategy!r} is not supported; only the CMM checkpoints of the release convert "
            f"({', '.join(sorted(SUPPORTED_STRATEGIES))})")
    return cfg


def _check_safetensors(path: Path) -> None:
    """Refuse a truncated or corrupt safetensors file from its header (8-byte length + JSON), before reading it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ReleaseFormatError(f"{path} is truncated: {size} bytes, no safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ReleaseFormatError(f"{path} is truncated: its header claims {n} bytes, the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ReleaseFormatError(f"{path} is corrupt: its safetensors header is not JSON") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ReleaseFormatError(f"{path} is truncated: {size} bytes, its tensors need {8 + n + end} "
                                 f"(re-download it)")


def load_release_state(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of the release's safetensors file(s) (single file or an index of shards), as stored."""
    from safetensors.torch import load_file

    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({src / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(src.glob("*.safetensors"))
    if not files:
        bins = list(src.glob("*.bin"))
        hint = " (only a pickled .bin: re-save it with safe_serialization=True)" if bins else ""
        raise ReleaseFormatError(f"{src} has no safetensors weights{hint}")
    state = {}
    for f in files:
        if not f.is_file():
            raise ReleaseFormatError(f"{src}: shard {f.name} named in the index is missing")
        _check_safetensors(f)
        state.update(load_file(str(f)))
    return state


def _take(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def release_ssm_type(cmm: dict[str, torch.Tensor]) -> str:
    """"s4" or "s4d" from the release CMM's keys; Mamba (or anything else) is refused."""
    if all(f"s4.{k}" in cmm for k in S4_KEYS):
        return "s4"
    if all(f"s4.{k}" in cmm for k in S4D_KEYS):
        return "s4d"
    found = sorted(k for k in cmm if k.startswith("s4."))[:4]
    raise ReleaseFormatError(f"the release's fusion SSM is neither its S4Block nor its S4D (keys {found}...): "
                             f"Mamba and other SSMs are not supported")


# ---------------------------------------------------------------------------------------------------- S4 / S4D maths
def dense_bilinear(dt: torch.Tensor, lam: torch.Tensor, p: torch.Tensor, b: torch.Tensor):
    """Dense bilinear discretisation of A = diag(lam) - p p^*, any dtype (float64 for conversions).

    dt (H,), lam/p/b (H, M) complex -> dA (H, M, M), dB (H, M)."""
    M = lam.shape[-1]
    eye = torch.eye(M, dtype=lam.dtype, device=lam.device)
    A = torch.diag_embed(lam) - p[:, :, None] * p.conj()[:, None, :]  # (H, M, M)
    h = (dt / 2).to(lam.dtype)[:, None, None]
    M0, M1 = eye - h * A, eye + h * A
    dA = torch.linalg.solve(M0, M1)  # (H, M, M)
    dB = torch.linalg.solve(M0, (dt.to(lam.dtype)[:, None] * b).unsqueeze(-1)).squeeze(-1)  # (H, M)
    return dA, dB


def release_s4_full_system(s4: dict[str, torch.Tensor]):
    """The release S4's continuous parameters as the full 2*N2 system, float64.

    Returns dt (H,), lam (H, 2N2), p (H, 2N2), b (H, 2N2), c_stored (H, 2N2) (C or C~ as stored), n = l_kernel."""
    kernel = {k.split("layer.kernel.")[-1]: v for k, v in s4.items()}
    dt = torch.exp(kernel["inv_dt"].double()).reshape(-1)  # (H,)  dt_transform "exp"
    lam = torch.complex(-torch.exp(kernel["A_real"].double()), -kernel["A_imag"].double())  # (H, N2)

    def cplx(t):  # (1, H, N2, 2) -> (H, N2) complex128 (rank / channels 1)
        if t.shape[0] != 1:
            raise ReleaseFormatError(f"the release S4 has rank/channels {t.shape[0]}; only 1 is supported")
        return torch.view_as_complex(t[0].double().contiguous())

    full = lambda z: torch.cat([z, z.conj()], dim=-1)  # noqa: E731  (H, N2) -> (H, 2N2)
    n = int(kernel["l_kernel"].reshape(-1)[0])
    return dt, full(lam), full(cplx(kernel["P"])), full(cplx(kernel["B"])), full(cplx(kernel["C"])), n


def plain_c(dt, lam, p, b, c_stored, n: int) -> torch.Tensor:
    """c with c (I - dA^n) = c_stored (float64 solve); c_stored itself when n = 0. All (H, 2N2) complex128."""
    if n == 0:
        return c_stored
    dA, _ = dense_bilinear(dt, lam, p, b)
    eye = torch.eye(dA.shape[-1], dtype=dA.dtype)
    M = eye - torch.linalg.matrix_power(dA, n)  # (H, M, M)
    return torch.linalg.solve(M.transpose(-1, -2), c_stored.unsqueeze(-1)).squeeze(-1)  # M^T c^T = c~^T


def convert_s4(s4: dict[str, torch.Tensor], window: int | None = RELEASE_WINDOW
               ) -> tuple[dict[str, torch.Tensor], dict]:
    """Release S4Block tensors (keys under `s4.`) -> our S4Block's state dict and its ssm_config (d_state 4*N2,
    window: the release's 512-tap kernel cut, or None for the untruncated recurrence)."""
    dt, lam, p, b, c_stored, n = release_s4_full_system(s4)
    c = plain_c(dt, lam, p, b, c_stored, n)
    half = lam.shape[-1] // 2
    c = torch.cat([c[:, :half], c[:, :half].conj()], -1) / 2  # (H, 2N2): 2 Re(c' x) = c x, exact conj symmetry
    f32 = lambda z: torch.view_as_real(z.to(torch.complex64)).contiguous()  # noqa: E731
    ours = {
        "log_dt": torch.log(dt).float(),
        "inv_A_real": torch.log(-lam.real).float(),
        "A_imag": lam.imag.float(),
        "P": f32(p),
        "B": f32(b),
        "C": f32(c),
        "D": s4["layer.D"].reshape(-1).float(),
        "output_linear.weight": s4["output_linear.0.weight"].squeeze(-1).float(),  # Conv1d(H, 2H, 1) -> Linear
        "output_linear.bias": s4["output_linear.0.bias"].float(),
    }
    config = {"d_state": 2 * lam.shape[-1]}
    if window is not None:
        config["window"] = int(window)
    return ours, config


def convert_s4d(s4: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Release S4D tensors (keys under `s4.`) -> our S4D's state dict (same parameterisation) and its ssm_config."""
    ours = {
        "log_dt": s4["kernel.log_dt"].float(),
        "log_A_real": s4["kernel.log_A_real"].float(),
        "A_imag": s4["kernel.A_imag"].float(),
        "C": s4["kernel.C"].float(),
        "D": s4["D"].float(),
        "output_linear.weight": s4["output_linear.0.weight"].squeeze(-1).float(),
        "output_linear.bias": s4["output_linear.0.bias"].float(),
    }
    return ours, {"d_state": 2 * s4["kernel.C"].shape[1]}


def convert_cmm(cmm: dict[str, torch.Tensor], window: int | None = RELEASE_WINDOW
                ) -> tuple[dict[str, torch.Tensor], str, dict]:
    """Release TokenGridCorrFiLMS4 tensors -> (our CrossModalModulator state dict, ssm_type, ssm_config); `window`
    applies to the S4 (the release's S4D uses its full-length kernel)."""
    missing = [k for k in CMM_NAMES if k not in cmm]
    if missing:
        raise ReleaseFormatError(f"the release's fusion module lacks {missing[:3]} (a different fuser?)")
    if "ctx_to_text.weight" in cmm:
        raise ReleaseFormatError("the release's fuser has ctx_to_text (proj_vision_to_text=False): not supported")
    ours = {CMM_RENAMES.get(k, k): cmm[k].float() for k in CMM_NAMES}
    ours["gate"] = ours["gate"].reshape(())
    ssm_type = release_ssm_type(cmm)
    s4 = _take(cmm, "s4.")
    ssm_state, ssm_config = convert_s4(s4, window) if ssm_type == "s4" else convert_s4d(s4)
    ours.update({f"ssm.{k}": v for k, v in ssm_state.items()})
    return ours, ssm_type, ssm_config


# ---------------------------------------------------------------------------------------------------- referenced checkpoints
def _resolve_reference(what: str, value: str | None, src: Path, flag: str, example: str) -> str:
    """A local directory (as given, or relative to the release directory) or a hub id; else a clear error."""
    if not value:
        raise ReleaseFormatError(f"the release's config names no {what} checkpoint: pass {flag} {example}")
    for cand in (Path(value), src / value):
        if cand.is_dir():
            if not (cand / "config.json").is_file():
                raise ReleaseFormatError(f"the {what} checkpoint {cand} has no config.json: pass {flag} {example}")
            return str(cand)
    looks_local = value.startswith((".", "/", "~")) or value.count("/") != 1
    if looks_local:
        raise ReleaseFormatError(f"the release's config points at {value!r} for the {what} checkpoint, which is "
                                 f"not here: pass {flag} {example} (or a local copy)")
    return value  # a hub id


def _load_config(path: str, what: str, flag: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ReleaseFormatError(f"cannot read the {what} checkpoint {path!r} ({str(e).splitlines()[0]}): "
                                 f"pass {flag} with a local copy") from None


def vision_config_of(path: str) -> dict:
    """The vision tower config (model_type siglip_vision_model) of a SigLIP dual-encoder or vision-only checkpoint."""
    cfg = _load_config(path, "SigLIP", "--vision")
    if cfg.model_type == "siglip":
        cfg = cfg.vision_config
    if cfg.model_type != "siglip_vision_model":
        raise ReleaseFormatError(f"{path}: expected the release's fixed-resolution SigLIP checkpoint, found "
                                 f"model_type {cfg.model_type!r}")
    return cfg.to_dict()


def image_processor_settings(path: str) -> dict:
    """size, resample, mean and std from the SigLIP checkpoint's preprocessor_config.json (what the release's
    AutoProcessor used); SigLIP's defaults (256, BICUBIC, 0.5) with a note when the file is absent."""
    from transformers.utils import cached_file

    try:
        file = cached_file(path, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    except OSError:
        file = None
    if file is None:
        print(f"note: {path} has no preprocessor_config.json; using SigLIP's defaults (256 px, BICUBIC, mean=std=0.5)")
        return {"image_size": 256, "resample": 3, "image_mean": (0.5,) * 3, "image_std": (0.5,) * 3}
    pp = json.loads(Path(file).read_text())
    size = pp.get("size", {})
    side = size.get("height", size.get("shortest_edge", 256)) if isinstance(size, dict) else int(size)
    if isinstance(size, dict) and size.get("width", side) != side:
        raise ReleaseFormatError(f"{file}: non-square processor size {size} is not supported")
    if not pp.get("do_resize", True) or not pp.get("do_normalize", True) or not pp.get("do_rescale", True):
        raise ReleaseFormatError(f"{file}: a processor without resize/rescale/normalise is not supported")
    if abs(float(pp.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise ReleaseFormatError(f"{file}: rescale_factor {pp['rescale_factor']} is not 1/255")
    return {"image_size": int(side), "resample": int(pp.get("resample", 3)),
            "image_mean": tuple(pp.get("image_mean", (0.5,) * 3)), "image_std": tuple(pp.get("image_std", (0.5,) * 3))}


def download_release(repo_id: str) -> Path:
    """A hub id -> the local snapshot (online machines only)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja",
                                                               "*.model"]))
    except Exception as e:  # offline, unknown repo, no permission: one line
        raise ReleaseFormatError(f"cannot fetch {repo_id!r} from the hub ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}); download it on an online machine "
                                 f"and pass the local directory") from None


# ---------------------------------------------------------------------------------------------------- conversion
def convert_release(src, *, lm: str | None = None, vision: str | None = None, tokenizer: str | None = None,
                    text_only_bypass: bool = True, window: int | None = RELEASE_WINDOW, verbose: bool = True):
    """Release directory (or hub id) -> (our model in eval mode, FireboltProcessor, report dict). Writes nothing.

    lm / vision / tokenizer override the LFM2 / SigLIP / tokenizer locations the release's config points at.
    text_only_bypass: the release's behaviour for prompts without an image (raw embeddings into LFM2).
    window: the S4's kernel cut (the release's l_max = 512, exact at every length); None = the untruncated recurrence.
    """
    from transformers import AutoTokenizer

    from .configuration import FireboltConfig
    from .modeling import FireboltForConditionalGeneration
    from .processing import FireboltProcessor, ensure_image_token

    src_path = Path(src)
    if not src_path.exists():
        if str(src).count("/") == 1 and not str(src).startswith((".", "/", "~")):
            src_path = download_release(str(src))
        else:
            raise ReleaseFormatError(f"release directory not found: {src}")
    if not src_path.is_dir():
        raise ReleaseFormatError(f"not a directory: {src}")
    cfg = read_release_config(src_path)
    lm_path = _resolve_reference("LFM2", lm or cfg.get("lm_name_or_path"), src_path, "--lm", "LiquidAI/LFM2-350M")
    vision_path = _resolve_reference("SigLIP", vision or cfg.get("vision_ckpt_path"), src_path, "--vision",
                                     "google/siglip2-base-patch16-256")
    text_config = _load_config(lm_path, "LFM2", "--lm").to_dict()
    vision_config = vision_config_of(vision_path)
    pixels = image_processor_settings(vision_path)

    state = load_release_state(src_path)
    lm_state = _take(state, LM_PREFIX)
    vision_state = _take(_take(state, VISION_PREFIX), "vision_model.")
    cmm_state = _take(state, CMM_PREFIX)
    for what, part, prefix in (("LFM2", lm_state, LM_PREFIX), ("SigLIP", vision_state, VISION_PREFIX + "vision_model."),
                               ("fusion", cmm_state, CMM_PREFIX)):
        if not part:
            raise ReleaseFormatError(f"{src_path}: no {what} weights (no key starts with {prefix!r})")
    known = (LM_PREFIX, VISION_PREFIX, CMM_PREFIX, *UNUSED_PREFIXES)
    unknown = sorted(k for k in state if not k.startswith(known))
    if unknown:
        raise ReleaseFormatError(f"{src_path}: unexpected weights {unknown[:3]} (not the release's layout)")
    cmm, ssm_type, ssm_config = convert_cmm(cmm_state, window)

    tok_src = tokenizer or (str(src_path) if (src_path / "tokenizer_config.json").is_file() else lm_path)
    try:
        tok = AutoTokenizer.from_pretrained(tok_src)
    except (OSError, ValueError) as e:
        raise ReleaseFormatError(f"cannot load a tokenizer from {tok_src!r} ({str(e).splitlines()[0]}): pass "
                                 f"--tokenizer") from None
    image_token_id = ensure_image_token(tok)
    want = cfg.get("image_token_id")
    if want is not None and int(want) != image_token_id:
        raise ReleaseFormatError(f"the release was trained with <image> = id {want}, the tokenizer {tok_src!r} gives "
                                 f"{image_token_id}: pass --tokenizer with the release's tokenizer")
    vocab = text_config["vocab_size"]
    if len(tok) > vocab:
        raise ReleaseFormatError(f"tokenizer {tok_src!r} has {len(tok)} tokens, the release's LFM2 only {vocab}")

    config = FireboltConfig(
        vision_config=vision_config, text_config=text_config, image_token_id=image_token_id, fusion_type="cmm",
        output_mode="replace", cmm_heads=4, cmm_head_dim=32, cmm_top_k=SUPPORTED_STRATEGIES[cfg["fuse_strategy"]],
        cmm_dropout=0.1, cmm_ffn_mult=4.0, ssm_type=ssm_type, ssm_config=ssm_config, image_size=pixels["image_size"],
        grid_rows=2, grid_cols=2, tile_size=128, tile_overlap=2, add_global_view=True, view_size=None,
        freeze_vision=True, text_only_bypass=text_only_bypass)
    model = FireboltForConditionalGeneration(config)
    tower = "vision.encoder." + ("vision_model." if any(k.startswith("vision_model.")
                                                         for k in model.vision.encoder.state_dict()) else "")
    ours = {**{f"language_model.{k}": v for k, v in lm_state.items()},
            **{f"{tower}{k}": v.float() for k, v in vision_state.items()},  # fp16 -> fp32: exact
            **{f"cmm.{k}": v for k, v in cmm.items()}}
    target = model.state_dict()
    wrong = [k for k, v in ours.items() if k in target and target[k].shape != v.shape]
    if wrong:
        k = wrong[0]
        raise ReleaseFormatError(f"{src_path}: {k} has shape {tuple(ours[k].shape)}, the referenced configs give "
                                 f"{tuple(target[k].shape)} (do --lm/--vision match the release?)")
    result = model.load_state_dict({k: v.to(target[k].dtype) for k, v in ours.items() if k in target}, strict=False)
    extra = sorted(set(ours) - set(target))
    tied_head = "language_model.lm_head.weight"
    missing = [k for k in result.missing_keys if k != tied_head]
    if extra or missing:
        raise ReleaseFormatError(f"{src_path}: weights do not fit the referenced configs: missing {missing[:3]}, "
                                 f"unexpected {extra[:3]}")
    if tied_head in result.missing_keys:
        head, emb = model.language_model.get_output_embeddings(), model.language_model.get_input_embeddings()
        if head.weight.data_ptr() != emb.weight.data_ptr():
            if not text_config.get("tie_word_embeddings", True):
                raise ReleaseFormatError(f"{src_path}: the LFM2 head is absent but the LFM2 config does not tie it")
            head.weight = emb.weight
    processor = FireboltProcessor(tok, image_size=pixels["image_size"], image_seq_length=1,
                                  image_mean=pixels["image_mean"], image_std=pixels["image_std"],
                                  resample=pixels["resample"])
    report = {"source": str(src), "lm": lm_path, "vision": vision_path, "tokenizer": tok_src,
              "fuse_strategy": cfg["fuse_strategy"], "ssm_type": ssm_type, "ssm_config": ssm_config,
              "l_kernel": int(cmm_state["s4.layer.kernel.l_kernel"].reshape(-1)[0]) if ssm_type == "s4" else None,
              "window": ssm_config.get("window"),
              "image_token_id": image_token_id, "resample": pixels["resample"],
              "dropped": sorted({k.split(".")[0] + "." + k.split(".")[1] for k in state
                                 if k.startswith(UNUSED_PREFIXES)} | ({"text tower"} if any(
                                     k.startswith(VISION_PREFIX + "text_model.") for k in state) else set()))}
    if verbose:
        print(f"converted the release at {src} ({cfg['fuse_strategy']}, {ssm_type} d_state {ssm_config['d_state']}, "
              f"l_kernel {report['l_kernel']}, window {report['window']}); <image> = {image_token_id}")
    return model.eval(), processor, report


def add_convert_release_command_arguments(p):
    p.add_argument("src", help="the release: a local directory or the hub id huyquoctrinh/FireboltVL (online)")
    p.add_argument("--output", required=True, help="firebolt-vl model directory to write (must not exist)")
    p.add_argument("--lm", default=None, help="LFM2 checkpoint (dir or hub id) instead of the config's lm_name_or_path")
    p.add_argument("--vision", default=None,
                   help="SigLIP checkpoint (dir or hub id) instead of the config's vision_ckpt_path")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer with the release's <image> token (default: the release dir's, else the LFM2's)")
    p.add_argument("--no-text-only-bypass", action="store_true",
                   help="run text-only prompts through the CMM (ours) instead of straight into LFM2 (the release)")
    p.add_argument("--no-window", action="store_true",
                   help="keep the S4's untruncated recurrence instead of the release's 512-tap kernel cut (equal up "
                        "to 512 tokens, different after)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")


def convert_release_command(src: str, output: str, lm: str | None = None, vision: str | None = None,
                            tokenizer: str | None = None, no_text_only_bypass: bool = False,
                            no_window: bool = False, overwrite: bool = False) -> int:
    """`firebolt-vl convert-release SRC --output DST`: convert, then write DST atomically (nothing on failure)."""
    from .hub import save_model_dir

    out = Path(output)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: pass --overwrite to replace it")
    if Path(src).exists() and out.resolve() == Path(src).resolve():
        raise ValueError("--output must differ from the release directory")
    model, processor, report = convert_release(src, lm=lm, vision=vision, tokenizer=tokenizer,
                                               text_only_bypass=not no_text_only_bypass,
                                               window=None if no_window else RELEASE_WINDOW)
    save_model_dir(model, processor, out, extra_files={"CONVERSION.json": json.dumps(report, indent=2)})
    n = sum(p.numel() for p in model.parameters())
    print(f"saved {n / 1e6:.1f}M parameters to {out}")
    return 0

__all__ = ["ReleaseFormatError", "is_release_dir", "convert_command", "refusal", "convert_release",
           "convert_release_command", "convert_s4", "convert_s4d", "convert_cmm", "dense_bilinear", "plain_c",
           "release_s4_full_system", "RELEASE_WINDOW"]
