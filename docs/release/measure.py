"""Measure the known differences between the release's behaviour and a converted model (tiny release-format model
written by tests/test_release.py's helpers, plus the S4 alone at the real width H = 1024 with the release's init).

    python docs/release/measure.py
"""
import sys
from pathlib import Path
import tempfile

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import test_release as T  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from firebolt_vl.release import convert_release  # noqa: E402
from firebolt_vl.ssm.s4 import S4Block  # noqa: E402

torch.manual_seed(0)
root = Path(tempfile.mkdtemp())
src = T.write_release(root, ssm="s4", l_kernel=512)
model, proc, _ = convert_release(src, verbose=False)
state = load_file(str(src / "model.safetensors"))
img = T.picture()

# 1. window: the converted model (S4 window 512, the default) and the untruncated recurrence (--no-window) against
#    the release's 512-tap kernel, past 512 tokens (tiny model, logits); then cached decoding across the window
q = " ".join(["what color is the shape in the top left quadrant of the picture"] * 40)
ids, px = T.release_inputs(src, q, img)
want = T.release_logits(src, ids, px)
exact, _, _ = convert_release(src, window=None, verbose=False)
for name, m in (("window 512 (default)", model), ("--no-window", exact)):
    with torch.no_grad():
        got = m(ids, pixel_values=px).logits.double()
    d = (got - want).abs().amax(-1)[0]
    print(f"{name}, tiny model, T={ids.shape[1]}: max |logit diff| tokens <512: {d[:512].max():.2e}, "
          f"tokens >=512: {d[512:].max():.2e} (logit scale {want.abs().max():.1f}); "
          f"argmax agreement past 512: {(got.argmax(-1) == want.argmax(-1))[0, 512:].float().mean():.3f}")
q = " ".join(["what color is the shape in the top left quadrant of the picture"] * 26)  # 509 prompt tokens
enc = proc(proc.build_prompt(q, True), images=img)
with torch.no_grad():
    cached = model.generate(**enc, max_new_tokens=24, ignore_eos=True)
    recomputed = model.generate(**enc, max_new_tokens=24, ignore_eos=True, use_cache=False)
print(f"window 512: greedy cached vs the release's recompute decoding, prompt {enc['input_ids'].shape[1]} + 24 tokens: "
      f"identical {torch.equal(cached, recomputed)}")

# 2. the same at the real width: S4 of the release's init (HiPPO-LegS, dt log-uniform [1e-3, 1e-1]), H = 1024
s4 = S4Block(1024, d_state=128).eval()
u = torch.randn(1, 1024, 1024)
with torch.no_grad():
    K = s4.kernel(1024)
    Kw = K.clone()
    Kw[:, 512:] = 0
    from firebolt_vl.ssm.base import fft_causal_conv
    uu = u.transpose(1, 2)
    y, yw = fft_causal_conv(uu, K), fft_causal_conv(uu, Kw)
    print(f"window, S4 at H=1024 (init scale), tokens 512..1023: max |SSM out diff| {(y - yw)[..., 512:].abs().max():.3e}"
          f" vs |SSM out| {y.abs().max():.2f}; tail |K_k|, k>=512: {K[:, 512:].abs().max():.2e}")
    # our windowed S4 (window 512) at the same width: its recurrence (scan) against the W-tap convolution
    s4w = S4Block(1024, d_state=128, window=512).eval()
    s4w.load_state_dict(s4.state_dict())
    ref = s4w._output((yw + s4.D[:, None] * uu).transpose(1, 2))
    print(f"window, S4 at H=1024 with window=512: recurrence vs 512-tap convolution, 1024 tokens: max |diff| "
          f"{(s4w(u)[0] - ref).abs().max():.2e} (block output scale {ref.abs().max():.2f})")

# 3. padding: the release has no mask in the CMM: a left-padded row vs the same row alone (LFM2 masked either way)
from firebolt_vl.release import CMM_PREFIX  # noqa: E402
prompts = [proc.build_prompt("What color is the circle? Answer with a single word please.", True),
           proc.build_prompt("What color?", True)]
batch = proc(prompts, images=[img, img])
alone = proc(prompts[1], images=img)
n = alone["input_ids"].shape[1]
cmm_w = {k[len(CMM_PREFIX):]: v for k, v in state.items() if k.startswith(CMM_PREFIX)}
with torch.no_grad():
    ours_b = model(**batch).logits[1, -n:].double()
    ours_a = model(**alone).logits[0].double()
    lm = model.language_model.double()
    emb = lm.get_input_embeddings()(batch["input_ids"])
    x_v = model.encode_images(batch["pixel_values"]).double()
    model.cmm.double()
    fused = T.release_cmm(cmm_w, emb, x_v)  # no mask: padding goes through the S4
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    rel_b = lm(inputs_embeds=fused, attention_mask=batch["attention_mask"], position_ids=pos).logits[1, -n:]
print(f"padding: {batch['input_ids'].shape[1] - n} pad tokens on the left; ours padded vs alone "
      f"{(ours_b - ours_a).abs().max():.2e}; release (no CMM mask) padded vs alone {(rel_b - ours_a).abs().max():.2e}")
