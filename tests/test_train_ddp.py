"""Two CPU processes (gloo) train in lockstep: identical weights on both ranks, equal to one process with the same
global batch (dropout off), data sharded by rank, one checkpoint with a state file per rank."""

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

STAGE = {"name": "ddp", "lr": {"cmm": 3e-3, "language": 2e-3}, "batch_size": 4, "grad_accum": 2, "max_steps": 3,
         "max_length": 64, "log_every": 1, "save_every": 3, "shuffle": False, "optim": {"warmup_steps": 1}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stage(data: Path):
    from firebolt_vl.train.recipe import StageConfig, from_dict

    return from_dict(StageConfig, {**STAGE, "data": {"train": [str(data)]}})


def _worker(rank: int, world: int, port: int, root: str) -> None:
    """Train the same stage with DDP, then with FSDP, then resume the FSDP run for one more step."""
    import torch.distributed as dist

    from firebolt_vl.presets import build_tiny
    from firebolt_vl.train import run_stage
    from firebolt_vl.train.checkpoint import gather_model_state
    from firebolt_vl.train.recipe import RuntimeConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(1)
    root = Path(root)
    # built before joining the group: transformers' save_pretrained only writes on rank 0 once a group exists
    models = [build_tiny(root / f"parts{rank}_{i}", seed=0, init_std=0.02, cmm_dropout=0.0) for i in range(3)]
    dist.init_process_group("gloo", rank=rank, world_size=world)
    stage = _stage(root / "data" / "train.jsonl")
    try:
        for (model, processor), strategy in zip(models, ["ddp", "fsdp"]):
            res = run_stage(model, processor, stage, root / strategy, seed=0,
                            runtime=RuntimeConfig(device="cpu", progress=False, strategy=strategy))
            state = gather_model_state(model, model, fsdp=strategy == "fsdp")  # FSDP: full on rank 0 only
            torch.save({k: v.detach().clone() for k, v in state.items()}, root / f"{strategy}_rank{rank}.pt")
            torch.save(res, root / f"{strategy}_result{rank}.pt")
        model, processor = models[2]
        longer = type(stage)(**{**stage.__dict__, "max_steps": 4})
        res = run_stage(model, processor, longer, root / "fsdp", seed=0, resume=True,
                        runtime=RuntimeConfig(device="cpu", progress=False, strategy="fsdp"))
        torch.save(res, root / f"fsdp_resumed{rank}.pt")
    finally:
        dist.destroy_process_group()


def _write_data(root: Path) -> Path:
    import json

    from PIL import Image

    (root / "img").mkdir(parents=True, exist_ok=True)
    colors = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220), "pink": (240, 150, 190)}
    with open(root / "train.jsonl", "w") as f:
        for i in range(16):
            name = list(colors)[i % 4]
            Image.new("RGB", (36, 28), colors[name]).save(root / "img" / f"{name}.png")
            f.write(json.dumps({"image": f"img/{name}.png", "conversations": [
                {"from": "human", "value": "<image>\nWhich color?"}, {"from": "gpt", "value": f"It is {name}."}]})
                + "\n")
    return root / "train.jsonl"


def test_two_process_gloo_ddp_and_fsdp_stay_in_sync(tmp_path):
    from firebolt_vl.presets import build_tiny
    from firebolt_vl.train import run_stage
    from firebolt_vl.train.checkpoint import list_checkpoints
    from firebolt_vl.train.recipe import RuntimeConfig

    data = _write_data(tmp_path / "data")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)

    rank0, rank1 = (torch.load(tmp_path / f"ddp_rank{r}.pt") for r in range(2))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # bit-identical replicas
    res0, res1 = (torch.load(tmp_path / f"ddp_result{r}.pt") for r in range(2))
    assert res0["steps"] == res1["steps"] == 3 and res0["samples"] == 12 and res0["world_size"] == 2
    (_, ck), = list_checkpoints(tmp_path / "ddp" / "checkpoints", world_size=2)
    assert (ck / "rank_0.pt").is_file() and (ck / "rank_1.pt").is_file()
    # data sharded by rank: each process consumed 6 entries of its own half of the file
    r1 = torch.load(ck / "rank_1.pt", weights_only=False)
    assert r1["data"]["positions"] == [[0, 6]] and r1["data"]["draws"] == 6

    # one process, same global batch of 4 (entries 0-3, 4-7, 8-11): the same training up to float rounding
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, processor = build_tiny(tmp_path / "single_parts", seed=0, init_std=0.02, cmm_dropout=0.0)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        run_stage(model, processor, _stage(data), tmp_path / "single", runtime=RuntimeConfig(progress=False), seed=0)
    finally:
        torch.set_num_threads(before)
    single = model.state_dict()
    assert any(not torch.equal(single[k], initial[k]) for k in single)  # training moved the weights
    fsdp = torch.load(tmp_path / "fsdp_rank0.pt")
    for k in single:
        torch.testing.assert_close(rank0[k], single[k], rtol=1e-4, atol=2e-5, msg=k)
        torch.testing.assert_close(fsdp[k], single[k], rtol=1e-4, atol=2e-5, msg=k)
    resumed = torch.load(tmp_path / "fsdp_resumed0.pt")
    assert resumed["steps"] == 4 and resumed["samples"] == 16
