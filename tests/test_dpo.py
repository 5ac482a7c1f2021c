"""DPO: pair encoding (answer tokens only), the loss against a hand computation, the reference left unchanged, the
stage end to end (LoRA and full), and the error for preference records without a rejected answer."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from firebolt_vl.testing import SQUARE_COLORS, square_image
from firebolt_vl.train.collate import IGNORE_INDEX
from firebolt_vl.train.dpo import (
    PairEncodeFn,
    PreferenceDataError,
    collate_pairs,
    dpo_loss,
    pair_step,
    sequence_logps,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def write_pairs(folder: Path, n: int, name: str, offset: int = 0) -> Path:
    """MMPR-style pairs: 'What color is the square?' chosen = the colour, rejected = the next colour."""
    names = list(SQUARE_COLORS)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "w") as f:
        for i in range(n):
            color, wrong = names[(i + offset) % 4], names[(i + offset + 1) % 4]
            f.write(json.dumps({"id": f"p{i}", "image": square_image(folder, color),
                                "question": "What color is the square?",
                                "chosen": f"It is {color}.", "rejected": f"It is {wrong}."}) + "\n")
    return folder / name


@pytest.fixture(scope="module")
def tiny(tiny_dir_factory):
    """A saved tiny model, the start (and reference) of the DPO stages."""
    return tiny_dir_factory(0.1)


def _load(path):
    from firebolt_vl.hub import load_model_dir

    return load_model_dir(path, dtype=torch.float32)


def test_pair_encoding_supervises_only_the_final_answer(tiny):
    _, processor = _load(tiny)
    enc = PairEncodeFn(processor, 128)
    conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "hello"},
            {"from": "human", "value": "Color?"}, {"from": "gpt", "value": "red"}]
    pair = enc({"conversations": conv, "image": None, "index": 3, "meta": {"rejected": {"from": "gpt", "value": "no"}}})
    for ex, answer in ((pair.chosen, "red"), (pair.rejected, "no")):
        sup = np.nonzero(ex.labels != IGNORE_INDEX)[0]
        assert list(sup) == list(range(sup[0], sup[-1] + 1))  # one run: the last turn, not "hello"
        text = processor.tokenizer.decode(ex.input_ids[sup])
        assert text == answer + "<|im_end|>", text
    assert (pair.chosen.input_ids[: pair.chosen.prompt_len] == pair.rejected.input_ids[: pair.chosen.prompt_len]).all()
    assert pair.index == 3
    with pytest.raises(PreferenceDataError, match="record 7: no rejected answer; an `objective: dpo` stage needs"):
        enc({"conversations": conv, "image": None, "index": 7, "id": 7})


def test_dpo_loss_against_hand_computation_on_a_fixed_batch(tiny):
    model, processor = _load(tiny)
    enc = PairEncodeFn(processor, 128)
    img = Image.new("RGB", (40, 32), SQUARE_COLORS["red"])
    recs = [{"conversations": [{"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": "red"}],
             "image": img, "rejected": "blue", "index": 0},
            {"conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi there"}],
             "image": None, "rejected": "go away", "index": 1}]
    batch = collate_pairs([enc(r) for r in recs], processor)
    assert batch["n_pairs"] == 2 and batch["input_ids"].shape[0] == 4

    def by_hand(m):
        """Summed log-probabilities of each row's answer tokens, from the full forward's logits, token by token."""
        with torch.no_grad():
            logits = m(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values")).logits.double()
        out = []
        for r in range(4):
            total = 0.0
            for t in range(1, batch["input_ids"].shape[1]):
                if batch["labels"][r, t] != IGNORE_INDEX:
                    total += float(torch.log_softmax(logits[r, t - 1], -1)[batch["labels"][r, t]])
            out.append(total)
        return out

    policy = by_hand(model)
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(model, batch), torch.tensor(policy, dtype=torch.float32),
                                   atol=1e-4, rtol=1e-5)
    ref = [p + d for p, d in zip(policy, (0.3, -0.2, -0.5, 0.1))]  # a fixed reference, differing from the policy
    beta = 0.5
    expected = [-math.log(1 / (1 + math.exp(-beta * ((policy[i] - ref[i]) - (policy[i + 2] - ref[i + 2])))))
                for i in range(2)]
    loss, stats = pair_step(model, lambda b: torch.tensor(ref, dtype=torch.float32), batch, beta)
    assert abs(float(loss.detach()) - sum(expected)) < 1e-4, (float(loss.detach()), expected)
    # rewards: beta * (policy - ref): chosen -0.15 and 0.25, rejected 0.05 and -0.05
    assert abs(stats["chosen_reward"] - 0.5 * (-0.3 + 0.2)) < 1e-4
    assert abs(stats["rejected_reward"] - 0.5 * (0.5 - 0.1)) < 1e-4
    assert stats["pref_accuracy"] == 1.0  # pair 2's margin 0.25 - (-0.05) > 0, pair 1's -0.15 - 0.25 < 0
    assert abs(stats["chosen_logp"] - (policy[0] + policy[1])) < 1e-3
    assert abs(stats["rejected_logp"] - (policy[2] + policy[3])) < 1e-3
    assert stats["logp_accuracy"] == sum(policy[i] > policy[i + 2] for i in range(2))
    # RPO: + alpha x the chosen answer's mean token NLL (answer tokens counted from the labels by hand)
    n_chosen = [sum(int(batch["labels"][r, t] != IGNORE_INDEX) for t in range(1, batch["labels"].shape[1]))
                for r in range(2)]
    alpha = 0.7
    rpo, _ = pair_step(model, lambda b: torch.tensor(ref, dtype=torch.float32), batch, beta, rpo_alpha=alpha)
    rpo_expected = sum(expected) - alpha * sum(policy[i] / n_chosen[i] for i in range(2))
    assert abs(float(rpo.detach()) - rpo_expected) < 1e-4, (float(rpo.detach()), rpo_expected)
    # the closed form at a known point: equal policy and reference -> log 2
    z = torch.zeros(3)
    assert torch.allclose(dpo_loss(z, z, z, z, 0.1)[0], torch.full((3,), math.log(2)))


def _stage(tmp_path, **extra):
    from firebolt_vl.train.recipe import StageConfig, from_dict

    data = tmp_path / "data"
    write_pairs(data, 16, "train.jsonl")
    write_pairs(data, 8, "val.jsonl", offset=2)
    base = {"name": "dpo", "objective": "dpo", "beta": 0.5, "lr": {"cmm": 1e-2, "language": 1e-2},
            "batch_size": 4, "max_length": 64, "log_every": 2, "max_steps": 8, "eval_every": 4, "save_every": 4,
            "optim": {"warmup_steps": 0, "schedule": "constant"}, "shuffle_buffer": 8,
            "data": {"train": [str(data / "train.jsonl")], "val": [str(data / "val.jsonl")]}}
    return from_dict(StageConfig, {**base, **extra})


def test_lora_dpo_stage_reference_unchanged_and_preference_learned(tmp_path, tiny):
    from firebolt_vl.adapters import adapters_disabled
    from firebolt_vl.train import read_metrics, run_stage
    from firebolt_vl.train.data import open_source
    from firebolt_vl.train.dpo import evaluate_pairs
    from firebolt_vl.train.recipe import RuntimeConfig

    model, processor = _load(tiny)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    stage = _stage(tmp_path, lora={"r": 4, "alpha": 16, "dropout": 0.0})
    res = run_stage(model, processor, stage, tmp_path / "run", runtime=RuntimeConfig(progress=False), seed=0,
                    base_dir=tiny)
    assert res["lora"] and res["objective"] == "dpo" and res["base_dir"] == str(Path(tiny).resolve())
    rows = [r for r in read_metrics(res["metrics_path"]) if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    for r in rows:
        assert {"chosen_reward", "rejected_reward", "reward_margin", "pref_accuracy"} <= set(r)
        assert abs(r["reward_margin"] - (r["chosen_reward"] - r["rejected_reward"])) < 1e-6
    vals = [r for r in read_metrics(res["metrics_path"]) if "val_pref_accuracy" in r]
    assert [r["step"] for r in vals] == [4, 8] and vals[-1]["val_pairs"] == 8

    # the reference (base weights, adapters disabled) is what the stage started from
    sd = model.state_dict()
    for k, v in start.items():
        key = k if k in sd else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(sd[key].cpu(), v), k
    val = [open_source(str(tmp_path / "data" / "val.jsonl"))]

    def ref_fn(b):
        with torch.no_grad(), adapters_disabled(model):
            return sequence_logps(model, b)

    model.eval()
    after = evaluate_pairs(model, processor, val, ref_fn, beta=0.5, max_length=64, batch_size=4)
    with adapters_disabled(model):
        before = evaluate_pairs(model, processor, val, ref_fn, beta=0.5, max_length=64, batch_size=4)
    assert abs(before["val_loss"] - math.log(2)) < 1e-6 and before["val_reward_margin"] == 0.0
    assert after["val_loss"] < before["val_loss"] - 0.05, after
    assert after["val_pref_accuracy"] > 0.5, after


def test_full_dpo_reference_is_a_frozen_copy_of_the_start(tmp_path, tiny):
    from firebolt_vl.train import run_stage
    from firebolt_vl.train.recipe import RuntimeConfig

    model, processor = _load(tiny)
    stage = _stage(tmp_path, max_steps=4, eval_every=0, save_every=2, lr={"cmm": 1e-3})
    res = run_stage(model, processor, stage, tmp_path / "run", runtime=RuntimeConfig(progress=False), seed=0)
    base = tmp_path / "run" / "base"  # in-memory start: saved once as the reference
    assert res["base_dir"] == str(base.resolve()) and not res["lora"]
    ref, _ = _load(base)
    start, _ = _load(tiny)
    for k, v in start.state_dict().items():
        assert torch.equal(ref.state_dict()[k], v), k
    assert not torch.equal(model.state_dict()["cmm.q_proj.weight"].cpu(), start.state_dict()["cmm.q_proj.weight"])
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["base_dir"] == str(base.resolve()) and state["objective"] == "dpo"


def test_dpo_stage_refuses_records_without_rejected(tmp_path, tiny):
    from firebolt_vl.train import run_stage
    from firebolt_vl.train.recipe import RecipeError, RuntimeConfig

    model, processor = _load(tiny)
    data = tmp_path / "conv.jsonl"
    data.write_text(4 * (json.dumps({"conversations": [{"from": "human", "value": "Hi"},
                                                       {"from": "gpt", "value": "hello"}]}) + "\n"))
    stage = _stage(tmp_path, lora={}, data={"train": [str(data)]})
    with pytest.raises(PreferenceDataError, match="no rejected answer"):
        run_stage(model, processor, stage, tmp_path / "run", runtime=RuntimeConfig(progress=False), seed=0)
    with pytest.raises(RecipeError, match="objective: must be one of"):
        _stage(tmp_path, objective="ppo")
    with pytest.raises(RecipeError, match="beta: must be > 0"):
        _stage(tmp_path, beta=0)
