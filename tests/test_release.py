"""Converting the authors' released checkpoint: tiny release-format directories written here from the format (keys,
fp16 SigLIP dual encoder, Conv1d S4 output, C~ with l_kernel, config paths), converted, and checked against an
independent float64 computation of the release's forward (its S4 as the dense real 2*N2 system, its CMM op by op)."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from firebolt_vl.hub import ModelDirError, load_model_dir
from firebolt_vl.presets import tiny_text_config, train_tiny_tokenizer
from firebolt_vl.release import ReleaseFormatError, convert_release, convert_release_command
from firebolt_vl.ssm.s4 import hippo_legs_nplr

N2 = 32  # the release's S4: d_state 64 stored as 32 complex modes
CMM = "model.fuser.fuser.model."
VISION = "model.vision_encoder.encoder.model."


# ------------------------------------------------------------------------------------------- the release's S4, float64
def full_system(s4):
    """Stored release S4 tensors -> dt (H,), A (H, 64, 64), b (H, 64), c_stored (H, 64), l_kernel; float64.
    The real 64-dim state in the basis [x, conj x]: A = diag([L, conj L]) - [P, conj P][P, conj P]^*."""
    dt = torch.exp(s4["layer.kernel.inv_dt"].double())[:, 0]
    lam = torch.complex(-torch.exp(s4["layer.kernel.A_real"].double()), -s4["layer.kernel.A_imag"].double())
    c2 = lambda t: torch.view_as_complex(t[0].double().contiguous())  # noqa: E731
    full = lambda z: torch.cat([z, z.conj()], -1)  # noqa: E731
    p = full(c2(s4["layer.kernel.P"]))
    A = torch.diag_embed(full(lam)) - p[:, :, None] * p.conj()[:, None, :]
    return dt, A, full(c2(s4["layer.kernel.B"])), full(c2(s4["layer.kernel.C"])), int(s4["layer.kernel.l_kernel"])


def discretise(dt, A, b):
    eye = torch.eye(A.shape[-1], dtype=A.dtype)
    inv = torch.linalg.inv(eye - (dt / 2)[:, None, None] * A)
    return inv @ (eye + (dt / 2)[:, None, None] * A), (inv @ (dt[:, None] * b).unsqueeze(-1)).squeeze(-1)


def release_s4_kernel(s4, window=512):
    """The release's kernel (H, window): the generating function C~ (I - dA z)^-1 dB at the window-th roots of unity,
    C~ as stored (or made from plain C on the first forward when l_kernel is 0), inverse DFT."""
    dt, A, b, c, n = full_system(s4)
    dA, dB = discretise(dt, A, b)
    eye = torch.eye(A.shape[-1], dtype=A.dtype)
    if n == 0:
        c = (c.unsqueeze(-2) @ (eye - torch.linalg.matrix_power(dA, window))).squeeze(-2)
    z = torch.exp(-2j * math.pi * torch.arange(window, dtype=torch.float64) / window)  # (W,)
    lam, V = torch.linalg.eig(dA)  # dA = V diag(lam) V^-1: the resolvent as a sum over its eigenvalues
    cv = (c.unsqueeze(-2) @ V).squeeze(-2)  # (H, M)
    vb = torch.linalg.solve(V, dB.unsqueeze(-1)).squeeze(-1)  # (H, M)
    k_hat = ((cv * vb)[None] / (1 - z[:, None, None] * lam[None])).sum(-1)  # (W, H): c~ (I - dA z)^-1 dB
    return torch.fft.ifft(k_hat, dim=0).real.T  # (H, W)


def release_s4(s4, u):
    """u (B, T, H) float64 -> the release S4Block's output (B, T, H): conv with the 512-tap kernel, D, GELU, GLU."""
    B, T, H = u.shape
    K = release_s4_kernel(s4)[:, : min(T, 512)]  # (H, W)
    y = torch.zeros_like(u)
    for k in range(K.shape[1]):
        y[:, k:] += K[:, k] * u[:, : T - k]
    y = F.gelu(y + s4["layer.D"].double()[0] * u)
    w, bias = s4["output_linear.0.weight"].double()[..., 0], s4["output_linear.0.bias"].double()
    return F.glu(y @ w.T + bias, dim=-1)


def release_s4d(s4, u):
    B, T, H = u.shape
    dt = torch.exp(s4["kernel.log_dt"].double())
    A = torch.complex(-torch.exp(s4["kernel.log_A_real"].double()), s4["kernel.A_imag"].double())
    C = torch.view_as_complex(s4["kernel.C"].double().contiguous()) * (torch.exp(dt[:, None] * A) - 1) / A
    K = 2 * torch.einsum("hn,hnl->hl", C, torch.exp(dt[:, None, None] * A[..., None] * torch.arange(T))).real
    y = torch.zeros_like(u)
    for k in range(T):
        y[:, k:] += K[:, k] * u[:, : T - k]
    y = F.gelu(y + s4["D"].double() * u)
    w, bias = s4["output_linear.0.weight"].double()[..., 0], s4["output_linear.0.bias"].double()
    return F.glu(y @ w.T + bias, dim=-1)


def release_cmm(w, x_t, x_v, mask=None):
    """The release's TokenGridCorrFiLMS4 (eval mode), float64, from its stored tensors: x_t (B, T, D), x_v (B, 5, Dv).
    `mask` (B, T) reproduces *our* padding handling on the reference (zero context and the SSM skipping padding)."""
    g = {k: v.double() for k, v in w.items() if not k.startswith("s4.")}
    B, T, D = x_t.shape
    q = (x_t @ g["q_proj.weight"].T).view(B, T, 4, 32).transpose(1, 2)
    k = (x_v @ g["k_proj.weight"].T).view(B, -1, 4, 32).transpose(1, 2)
    s = q @ k.transpose(-1, -2) / math.sqrt(32)  # (B, 4, T, 5)
    top = s.topk(4, dim=-1)
    s = torch.full_like(s, float("-inf")).scatter(-1, top.indices, top.values).softmax(-1).mean(1)  # (B, T, 5)
    c = s @ (x_v @ g["v_proj.weight"].T)
    ln = lambda x, n: F.layer_norm(x, (D,), g[f"{n}.weight"], g[f"{n}.bias"])  # noqa: E731
    a = g["mod_gate"]
    si, bi = (c @ g["film_in.weight"].T + g["film_in.bias"]).chunk(2, -1)
    x = ln(x_t, "norm_in") * (1 + a * si) + a * bi
    s4 = {k[3:]: v for k, v in w.items() if k.startswith("s4.")}
    y = (release_s4 if "layer.D" in s4 else release_s4d)(s4, x)
    so, bo = (c @ g["film_out.weight"].T + g["film_out.bias"]).chunk(2, -1)
    h = x_t + y * (1 + a * so) + a * bo
    f = F.gelu(ln(h, "ffn.0") @ g["ffn.1.weight"].T + g["ffn.1.bias"]) @ g["ffn.4.weight"].T + g["ffn.4.bias"]
    return ln(h + f, "norm_out")


def release_views(pixels):
    """The release's GridVisionEncoder views: whole image (bilinear to 256: identity at 256), then 128 px tiles at
    offsets 0/126, row-major."""
    glob = F.interpolate(pixels, size=(256, 256), mode="bilinear", align_corners=False)
    return [glob] + [pixels[:, :, y : y + 128, x : x + 128] for y in (0, 126) for x in (0, 126)]


def release_logits(src: Path, input_ids, pixels):
    """The release's forward (use_cache=False) in float64, from its directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, SiglipModel

    cfg = json.loads((src / "config.json").read_text())
    state = load_file(str(src / "model.safetensors"))
    siglip = SiglipModel(AutoConfig.from_pretrained(cfg["vision_ckpt_path"])).double().eval()
    siglip.load_state_dict({k[len(VISION):]: v.double() for k, v in state.items() if k.startswith(VISION)})
    lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg["lm_name_or_path"])).double().eval()
    lm.load_state_dict({k[8:]: v.double() for k, v in state.items() if k.startswith("base_lm.")}, strict=False)
    lm.tie_weights()
    text = lm.get_input_embeddings()(input_ids)
    with torch.no_grad():
        if pixels is None:
            return lm(inputs_embeds=text, use_cache=False).logits
        x_v = torch.stack([siglip.get_image_features(v.double(), interpolate_pos_encoding=True).pooler_output
                           for v in release_views(pixels.double())], 1)  # (B, 5, Dv)
        fused = release_cmm({k[len(CMM):]: v for k, v in state.items() if k.startswith(CMM)}, text, x_v)
        return lm(inputs_embeds=fused, use_cache=False).logits


# ------------------------------------------------------------------------------------------- writing a tiny release
_TOKENIZER = []


def _tokenizer():
    """The tiny tokenizer (trained once per session; a copy per release)."""
    import copy

    if not _TOKENIZER:
        _TOKENIZER.append(train_tiny_tokenizer())
    return copy.deepcopy(_TOKENIZER[0])


def write_components(root: Path, seed=0):
    """A tiny LFM2 (+ tokenizer with <image>) and a tiny SigLIP dual encoder at 256 px with its preprocessor config."""
    from transformers import AutoConfig, AutoModelForCausalLM, SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    tok = _tokenizer()
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_text_config(len(tok), tokenizer=tok,
                                                                                  initializer_range=0.15)))
    lm.save_pretrained(root / "lfm2")
    tok.save_pretrained(root / "lfm2")
    vcfg = SiglipConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=64, max_position_embeddings=8,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=256, patch_size=32))
    SiglipModel(vcfg).save_pretrained(root / "siglip")
    (root / "siglip" / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": 256, "width": 256},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    return lm, SiglipModel.from_pretrained(root / "siglip"), tok


def s4_tensors(H, l_kernel, gen):
    """The release S4Block's tensors: HiPPO-LegS DPLR init perturbed like a trained layer; C~ when l_kernel > 0."""
    lam, p, b = hippo_legs_nplr(2 * N2)  # (N2,) each
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    lam = torch.complex(lam.real * torch.exp(0.3 * rnd(H, N2)), lam.imag * (1 + 0.1 * rnd(H, N2)))
    p = p * (1 + 0.2 * torch.complex(rnd(H, N2), rnd(H, N2)))
    b = b * (1 + 0.2 * torch.complex(rnd(H, N2), rnd(H, N2)))
    b = torch.complex(b.real, b.imag.clamp(-2, 2))  # B_clip
    c = torch.complex(rnd(H, N2), rnd(H, N2)) * 0.5
    inv_dt = math.log(1e-3) + torch.rand(H, 1, generator=gen, dtype=torch.float64) * math.log(100)
    out = {"layer.kernel.inv_dt": inv_dt, "layer.kernel.A_real": torch.log(-lam.real),
           "layer.kernel.A_imag": -lam.imag}
    r = lambda z: torch.view_as_real(z)[None].float().contiguous()  # noqa: E731
    out = {k: v.float() for k, v in out.items()}
    out.update({"layer.kernel.P": r(p), "layer.kernel.B": r(b), "layer.D": torch.randn(1, H, generator=gen)})
    if l_kernel:  # what the release's first forward does: C <- C (I - dA^512) over the full 64-dim system
        dt, A, bf, _, _ = full_system({**out, "layer.kernel.C": r(c), "layer.kernel.l_kernel": torch.tensor(0)})
        dA, _ = discretise(dt, A, bf)
        cf = torch.cat([c, c.conj()], -1).unsqueeze(-2) @ (torch.eye(2 * N2) - torch.linalg.matrix_power(dA, l_kernel))
        c = cf.squeeze(-2)[:, :N2]
    out["layer.kernel.C"] = r(c)
    out["layer.kernel.l_kernel"] = torch.tensor(l_kernel)
    return out


def s4d_tensors(H, gen):
    return {"D": torch.randn(H, generator=gen),
            "kernel.log_dt": math.log(1e-3) + torch.rand(H, generator=gen) * math.log(100),
            "kernel.log_A_real": torch.log(0.5 * torch.ones(H, N2)) + 0.3 * torch.randn(H, N2, generator=gen),
            "kernel.A_imag": math.pi * torch.arange(N2).float().repeat(H, 1),
            "kernel.C": 0.5 * torch.randn(H, N2, 2, generator=gen)}


def write_release(root: Path, ssm="s4", l_kernel=512, seed=0, strategy="cossm", config_overrides=None) -> Path:
    """A tiny directory in the release's save_pretrained format, written from the format description."""
    root.mkdir(parents=True, exist_ok=True)
    lm, siglip, tok = write_components(root, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    D, Dv = lm.config.hidden_size, siglip.config.vision_config.hidden_size
    lin = lambda o, i: torch.randn(o, i, generator=gen) / math.sqrt(i)  # noqa: E731
    vec = lambda n, s=0.1: s * torch.randn(n, generator=gen)  # noqa: E731
    cmm = {"q_proj.weight": lin(128, D) * 3, "k_proj.weight": lin(128, Dv) * 3, "v_proj.weight": lin(D, Dv),
           "film_in.weight": lin(2 * D, D), "film_in.bias": vec(2 * D), "film_out.weight": lin(2 * D, D),
           "film_out.bias": vec(2 * D), "mod_gate": torch.tensor(0.7)}
    for n in ("norm_in", "norm_out", "ffn.0"):
        cmm[f"{n}.weight"], cmm[f"{n}.bias"] = 1 + vec(D), vec(D)
    cmm.update({"ffn.1.weight": lin(4 * D, D), "ffn.1.bias": vec(4 * D), "ffn.4.weight": lin(D, 4 * D),
                "ffn.4.bias": vec(D)})
    s4 = s4_tensors(D, l_kernel, gen) if ssm == "s4" else s4d_tensors(D, gen)
    s4["output_linear.0.weight"], s4["output_linear.0.bias"] = lin(2 * D, D)[..., None], vec(2 * D)  # Conv1d(H, 2H, 1)
    cmm.update({f"s4.{k}": v for k, v in s4.items()})
    state = {f"base_lm.{k}": v for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    state.update({f"{VISION}{k}": v.half() for k, v in siglip.state_dict().items()})  # the whole dual encoder, fp16
    state.update({f"{CMM}{k}": v for k, v in cmm.items()})
    state.update({"model.fuser.fuser.importance.weight": lin(1, D), "model.fuser.fuser.importance.bias": vec(1),
                  "model.projector.projector.fc.weight": lin(D, Dv), "model.projector.projector.fc.bias": vec(D)})
    src = root / "release"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(src / "model.safetensors"))
    config = {"model_type": "fireboltlm", "architectures": ["FireboltLMForCausalLM"],
              "lm_name_or_path": str(root / "lfm2"), "vision_ckpt_path": str(root / "siglip"),
              "fuse_strategy": strategy, "fuse_heads": 8, "projector_type": "residual_ffn", "vision_hidden_size": Dv,
              "image_token_id": tok.convert_tokens_to_ids("<image>"), "vocab_size": lm.config.vocab_size,
              "tie_word_embeddings": True, **(config_overrides or {})}
    (src / "config.json").write_text(json.dumps(config))
    return src


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    cache = {}

    def get(**kw):
        key = tuple(sorted(kw.items()))
        if key not in cache:
            cache[key] = write_release(tmp_path_factory.mktemp("rel"), **kw)
        return cache[key]

    return get


def picture():
    img = Image.new("RGB", (300, 220), (200, 210, 240))
    d = ImageDraw.Draw(img)
    d.ellipse((20, 30, 120, 130), fill=(220, 20, 20))
    d.rectangle((180, 100, 280, 200), fill=(20, 160, 40))
    return img


def release_inputs(src: Path, question: str, image):
    """input_ids and pixel_values exactly as the release's infer.py builds them."""
    from transformers import AutoTokenizer, SiglipImageProcessor

    cfg = json.loads((src / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(cfg["lm_name_or_path"])
    ids = tok.apply_chat_template([{"role": "user", "content": f"<image>\n{question}"}], add_generation_prompt=True,
                                  tokenize=True, return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    pixels = SiglipImageProcessor.from_pretrained(cfg["vision_ckpt_path"])(images=[image], return_tensors="pt")
    return ids, pixels["pixel_values"]


# ------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("ssm,l_kernel", [("s4", 512), ("s4", 0), ("s4d", 0)])
def test_converted_logits_equal_the_release_forward(releases, ssm, l_kernel):
    src = releases(ssm=ssm, l_kernel=l_kernel)
    model, processor, report = convert_release(src, verbose=False)
    assert report["ssm_type"] == ssm and model.config.ssm_config["d_state"] == (128 if ssm == "s4" else 64)
    short = "What color is the circle?"
    long = " ".join(["what color is the shape in the top left quadrant of the picture"] * 25)
    img = picture()
    for question in (short, long):
        ids, pixels = release_inputs(src, question, img)
        ours = processor(processor.build_prompt(question, True), images=img)
        assert torch.equal(ours["input_ids"], ids)  # the release's chat template and <image> handling
        assert (ours["pixel_values"] - pixels).abs().max() < 1e-5  # its SigLIP processor (BICUBIC 256, 0.5/0.5)
        assert ids.shape[1] <= 512 and (question == short or ids.shape[1] > 400)
        want = release_logits(src, ids, pixels)
        with torch.no_grad():
            got = model(ours["input_ids"], pixel_values=ours["pixel_values"]).logits
        err = (got.double() - want).abs().max().item()
        assert err < 1e-4, f"{ssm} l_kernel={l_kernel} T={ids.shape[1]}: max abs {err:.2e}"
        assert want.abs().max() > 1.0  # logits of a real size: the bound is not trivially met


def test_naive_half_mode_copy_is_not_the_release(releases):
    """The reason for d_state 128: copying the 32 stored modes into a 32-mode S4 (2 Re readout, correction within
    the half) gives another system; the full-pair system is what the release computes."""
    from firebolt_vl.ssm.s4 import S4Block

    src = releases(ssm="s4", l_kernel=0)
    s4 = {k[len(CMM) + 3:]: v for k, v in load_file(str(src / "model.safetensors")).items() if k.startswith(CMM + "s4.")}
    H = s4["layer.D"].shape[1]
    naive = S4Block(H, d_state=2 * N2).eval()
    k = s4
    with torch.no_grad():
        naive.log_dt.copy_(k["layer.kernel.inv_dt"][:, 0])
        naive.inv_A_real.copy_(k["layer.kernel.A_real"])
        naive.A_imag.copy_(-k["layer.kernel.A_imag"])
        for n in "PBC":
            getattr(naive, n).copy_(k[f"layer.kernel.{n}"][0])
    want = release_s4_kernel(s4)[:, :64]
    assert (naive.kernel(64).double() - want).abs().max() > 1e-2
    model, _, _ = convert_release(src, verbose=False)
    assert (model.cmm.ssm.kernel(64).double() - want).abs().max() < 1e-4


def test_text_only_bypass_and_padding(releases):
    src = releases(ssm="s4", l_kernel=512)
    model, processor, _ = convert_release(src, verbose=False)
    assert model.config.text_only_bypass
    enc = processor(processor.build_prompt("Describe a red circle", False))
    want = release_logits(src, enc["input_ids"], None)  # the release: raw embeddings into LFM2
    with torch.no_grad():
        got = model(**enc).logits
        assert (got.double() - want).abs().max() < 1e-4
        cached = model.generate(**enc, max_new_tokens=6, ignore_eos=True)
        recomputed = model.generate(**enc, max_new_tokens=6, ignore_eos=True, use_cache=False)
    assert torch.equal(cached, recomputed)
    model.config.text_only_bypass = False  # ours: through the CMM with a zero context
    with torch.no_grad():
        assert (model(**enc).logits.double() - want).abs().max() > 1e-3
    model.config.text_only_bypass = True
    # a batch mixing an image row and a padded text-only row: each row as if alone
    img = picture()
    prompts = [processor.build_prompt("What color is the circle?", True), processor.build_prompt("Hi there", False)]
    batch = processor(prompts, images=[img, None])
    with torch.no_grad():
        out = model(**batch).logits
        alone = model(**processor(prompts[1])).logits
    n = alone.shape[1]
    assert (out[1, -n:] - alone[0]).abs().max() < 1e-4


def test_convert_save_load_generate_round_trip(releases, tmp_path):
    from firebolt_vl.cli import main

    src = releases(ssm="s4", l_kernel=512)
    dst = tmp_path / "converted"
    assert main(["convert-release", str(src), "--output", str(dst)]) == 0
    assert json.loads((dst / "CONVERSION.json").read_text())["l_kernel"] == 512
    model, processor = load_model_dir(dst)
    assert processor.resample == 3 and model.config.text_only_bypass
    ref, _, _ = convert_release(src, verbose=False)
    img = picture()
    enc = processor(processor.build_prompt("What color is the circle?", True), images=img)
    with torch.no_grad():
        a = model.generate(**enc, max_new_tokens=12, ignore_eos=True)
        b = ref.generate(**enc, max_new_tokens=12, ignore_eos=True)
        c = model.generate(**enc, max_new_tokens=12, ignore_eos=True, use_cache=False)  # the release's decoding
    assert torch.equal(a, b) and torch.equal(a, c)
    assert len(set(a[0, enc["input_ids"].shape[1]:].tolist())) > 1
    assert main(["convert-release", str(src), "--output", str(dst)]) == 2  # exists, no --overwrite


def test_loaders_refuse_a_release_dir_with_the_convert_command(releases):
    from firebolt_vl import FireboltForConditionalGeneration

    src = releases(ssm="s4", l_kernel=512)
    command = f"firebolt-vl convert-release {src} --output {src}-firebolt-vl"
    with pytest.raises(ModelDirError, match="convert-release") as e:
        load_model_dir(src)
    assert command in str(e.value)
    with pytest.raises(ValueError) as e:
        FireboltForConditionalGeneration.from_pretrained(src)
    assert command in str(e.value)


def _copy_release(src: Path, dst: Path, **config_changes) -> Path:
    dst.mkdir()
    (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config_changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_error_paths_leave_nothing_at_the_output(releases, tmp_path):
    src = releases(ssm="s4", l_kernel=512)
    out = tmp_path / "out"
    cases = []
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "lfm2"}))
    cases.append((plain, "not a Firebolt-VL release directory"))
    cases.append((tmp_path / "nowhere", "release directory not found"))
    cases.append((_copy_release(src, tmp_path / "prepend", fuse_strategy="prepend"), "fuse_strategy 'prepend'"))
    cases.append((_copy_release(src, tmp_path / "nolm", lm_name_or_path="/gone/lfm2"), "pass --lm"))
    cases.append((_copy_release(src, tmp_path / "novis", vision_ckpt_path="./pretrained/siglip2_base_16_256/"),
                  "pass --vision"))
    cases.append((_copy_release(src, tmp_path / "badid", image_token_id=7), "trained with <image> = id 7"))
    trunc = _copy_release(src, tmp_path / "trunc")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) - 1000])
    cases.append((trunc, "truncated"))
    for bad, message in cases:
        with pytest.raises(ReleaseFormatError, match=message.replace("(", r"\(").replace("<", "<")):
            convert_release_command(str(bad), str(out))
        assert not out.exists() and not list(tmp_path.glob(".out*"))
    # the overrides repair a missing reference
    cfg = json.loads((src / "config.json").read_text())
    assert convert_release_command(str(tmp_path / "nolm"), str(out), lm=cfg["lm_name_or_path"]) == 0
    assert (out / "model.safetensors").is_file()


def test_film_strategy_keeps_one_grid(releases, tmp_path):
    src = _copy_release(releases(ssm="s4", l_kernel=512), tmp_path / "film", fuse_strategy="film")
    model, _, _ = convert_release(src, verbose=False)
    assert model.config.cmm_top_k == 1


# ------------------------------------------------------------------------------------------- the 512-tap window
def test_window_matches_the_release_past_512_tokens(releases):
    """The release's S4 sees the last 512 inputs only (kernel cut at l_max): the converted model (window 512) equals
    its forward past 512 tokens too; the untruncated recurrence (--no-window) differs there."""
    src = releases(ssm="s4", l_kernel=512)
    model, processor, report = convert_release(src, verbose=False)
    exact, _, _ = convert_release(src, window=None, verbose=False)
    assert report["window"] == 512 and model.config.ssm_config == {"d_state": 128, "window": 512}
    assert "window" not in exact.config.ssm_config
    question = " ".join(["what color is the shape in the top left quadrant of the picture"] * 30)
    ids, pixels = release_inputs(src, question, picture())
    assert ids.shape[1] > 560
    want = release_logits(src, ids, pixels)
    with torch.no_grad():
        got = model(ids, pixel_values=pixels).logits.double()
        got_exact = exact(ids, pixel_values=pixels).logits.double()
        model.cmm.ssm.scan_max_tokens = 0  # the parallel (FFT) form as well as the scan
        got_fft = model(ids, pixel_values=pixels).logits.double()
    assert (got - want).abs().max() < 1e-4  # the scan (what a CPU uses at batch 1)
    assert (got_fft - want).abs().max() < 2e-4  # fp32 FFTs of length 2 (512 + T)
    assert (got_exact - want)[:, :512].abs().max() < 1e-4 and (got_exact - want)[:, 512:].abs().max() > 1e-2


@pytest.mark.parametrize("window", [32, 512])
def test_cached_decoding_equals_the_release_decoding_across_the_window(releases, window):
    """Greedy decoding with the CMM recurrence (its window buffer in the state) gives the tokens of the release's
    decoding (use_cache=False: every step recomputes vision, CMM and LFM2 over the whole prefix), the prompt plus
    answer crossing the window: window 32 with a batch of two left-padded prompts over 40 tokens, and the real
    window 512 with a 509-token prompt."""
    src = releases(ssm="s4", l_kernel=512)
    model, processor, _ = convert_release(src, window=window, verbose=False)
    img = picture()
    if window == 32:
        questions, new = ["What color is the circle?", " ".join(["which shape is on the left side"] * 4)], 40
    else:
        questions, new = [" ".join(["what color is the shape in the top left quadrant of the picture"] * 26)], 16
    enc = processor([processor.build_prompt(q, True) for q in questions], images=[img] * len(questions))
    lens = enc["attention_mask"].sum(1)
    # the short prompt fits the window, the long one exceeds it (prefill across it); both answers cross it
    assert int(lens.min()) < window < int(lens.max()) if window == 32 else int(lens.max()) < 512 < int(lens.max()) + new
    with torch.no_grad():
        cached = model.generate(**enc, max_new_tokens=new, ignore_eos=True)
        recomputed = model.generate(**enc, max_new_tokens=new, ignore_eos=True, use_cache=False)
    assert torch.equal(cached, recomputed)
    answers = cached[:, enc["input_ids"].shape[1]:]
    assert all(len(set(a.tolist())) > 3 for a in answers)
