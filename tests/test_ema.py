"""The weight average of stage 1 (``stage1.ema_decay``): timm's warm-up, what is validated and saved, and resume."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from test_engine import _StopAtStep

import fgvc.engine.stage as stage_module
from fgvc.config import config_from_dict
from fgvc.engine.checkpoint import BEST, LAST, load_checkpoint
from fgvc.engine.ema import WeightAverage
from fgvc.engine.loaders import load_split
from fgvc.engine.stage import run_stage1, run_stage2
from fgvc.errors import ConfigError


def test_the_average_copies_the_first_step_then_follows_the_warm_up_up_to_the_decay() -> None:
    """Decay at update n: min(ema_decay, 1 - n^(-2/3)) counting from the second update (timm's warm-up, gamma 1)."""
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, decay=0.5)
    assert not any(p.requires_grad for p in average.module.parameters())
    torch.nn.init.constant_(model.weight, 1.0)
    average.update()  # the first update copies the weights
    torch.testing.assert_close(average.module.weight, torch.ones(2, 3))
    torch.nn.init.constant_(model.weight, 3.0)
    average.update()
    decay = 1 - 2 ** (-2 / 3)  # 0.37: below 0.5, the warm-up sets it
    torch.testing.assert_close(average.module.weight, torch.full((2, 3), decay * 1.0 + (1 - decay) * 3.0))
    before = average.module.weight.clone()
    for _ in range(8):
        average.updates += 1  # steps on: the warm-up's decay (0.79 at n = 11) is now above 0.5
    torch.nn.init.constant_(model.weight, 5.0)
    average.update()
    torch.testing.assert_close(average.module.weight, 0.5 * before + 0.5 * 5.0)
    assert average.updates == 11


def test_the_average_is_a_stage_1_setting() -> None:
    with pytest.raises(ConfigError, match=r"r.yaml: invalid value for 'stage2': ema_decay averages stage 1's weights"):
        config_from_dict({"stage2": {"ema_decay": 0.999}}, source="r.yaml")
    with pytest.raises(ConfigError, match=r"stage1.ema_decay"):
        config_from_dict({"stage1": {"ema_decay": 1.0}}, source="r.yaml")
    with pytest.raises(ConfigError, match=r"invalid value for 'stage1': ema_decay averages the weights after each"):
        config_from_dict({"stage1": {"ema_decay": 0.999, "tune": "bnstats"}}, source="r.yaml")  # it takes no step


def test_the_average_is_what_stage_1_validates_and_saves_and_stage_2_adapts(
    tiny_demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    validated: list[dict[str, torch.Tensor]] = []
    predict_probs = stage_module.predict_probs

    def recording(model: torch.nn.Module, *args: object, **kwargs: object) -> object:
        validated.append({k: v.clone() for k, v in model.state_dict().items()})
        return predict_probs(model, *args, **kwargs)

    monkeypatch.setattr(stage_module, "predict_probs", recording)
    cfg = tiny_config(tiny_demo_root, tmp_path, stage1={"epochs": 2, "ema_decay": 0.9})
    assert run_stage1(cfg, progress=False).interrupted_by is None
    stage_dir = cfg.run_dir() / "stage1"
    last, best = load_checkpoint(stage_dir / LAST), load_checkpoint(stage_dir / BEST)
    steps = len(load_split(cfg, "train")) // cfg.stage1.batch_size
    assert last["ema_updates"] == 2 * steps == last["scheduler"]["last_epoch"]  # one update per optimiser step
    assert len(validated) == 2
    for name, tensor in last["model"].items():  # epoch 2's validation ran on the saved average
        assert torch.equal(validated[-1][name], tensor), name
    weights = [name for name, t in last["model"].items() if t.is_floating_point() and "running" not in name]
    assert any(not torch.equal(last["model"][n], last["trained"][n]) for n in weights)  # not the optimiser's own
    assert "trained" not in best and "ema_updates" not in best  # best.pt holds the model alone
    assert any(all(torch.equal(seen[n], best["model"][n]) for n in best["model"]) for seen in validated)

    def starts_from(model: torch.nn.Module, *args: object, **kwargs: object) -> object:
        validated.append({k: v.clone() for k, v in model.state_dict().items()})
        return predict_probs(model, *args, **kwargs)

    validated.clear()
    monkeypatch.setattr(stage_module, "predict_probs", starts_from)
    assert run_stage2(cfg.run_dir(), {"stage2.res": 40}, progress=False).interrupted_by is None
    before_adaptation = validated[0]  # stage 2's first validation: the stage-1 model it starts from
    for name, tensor in best["model"].items():
        assert torch.equal(before_adaptation[name], tensor), name


def test_an_interrupted_run_goes_on_averaging_where_it_stopped(
    tiny_demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM in the middle of epoch 2, then resume (with two micro-batches a step): the average and the weights are
    those of an unbroken run."""
    settings = {"epochs": 2, "ema_decay": 0.9, "batch_size": 4, "grad_accum": 2}
    straight = tiny_config(tiny_demo_root, tmp_path / "straight", stage1=settings)
    run_stage1(straight, progress=False)
    resumed = tiny_config(tiny_demo_root, tmp_path / "resumed", stage1=settings)
    batches = len(load_split(resumed, "train")) // resumed.stage1.batch_size
    with monkeypatch.context() as patch:
        _StopAtStep(patch, signal.SIGTERM, at=batches + 3)  # the stop comes at the end of the step: 4 micro-batches
        assert run_stage1(resumed, progress=False).interrupted_by == signal.SIGTERM
    stopped = load_checkpoint(resumed.run_dir() / "stage1" / LAST)
    assert (stopped["epoch"], stopped["micro_step"]) == (1, 4)
    assert stopped["ema_updates"] == stopped["scheduler"]["last_epoch"] == -(-batches // 2) + 2
    assert run_stage1(resumed, progress=False).interrupted_by is None
    a = load_checkpoint(straight.run_dir() / "stage1" / LAST)
    b = load_checkpoint(resumed.run_dir() / "stage1" / LAST)
    assert a["ema_updates"] == b["ema_updates"] == a["scheduler"]["last_epoch"]
    for entry in ("model", "trained"):
        for name, tensor in a[entry].items():
            assert torch.equal(tensor, b[entry][name]), (entry, name)


def _stage1_on_rank(rank: int, init_file: str, data_root: str, out: str) -> None:
    """One rank of a two-process gloo stage 1 with a weight average; saves the average each rank last validated."""
    import os

    import torch.distributed as dist

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    predict_probs = stage_module.predict_probs
    validated: dict[str, torch.Tensor] = {}

    def recording(model: torch.nn.Module, *args: object, **kwargs: object) -> object:
        validated.update({k: v.clone() for k, v in model.state_dict().items()})
        return predict_probs(model, *args, **kwargs)

    stage_module.predict_probs = recording
    cfg = tiny_config(Path(data_root), Path(out), stage1={"epochs": 1, "batch_size": 4, "ema_decay": 0.9},
                      runtime={"device": "cpu"})  # fmt: skip
    run_stage1(cfg, progress=False)
    torch.save(validated, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_under_ddp_every_rank_validates_the_same_average(tiny_demo_root: Path, tmp_path: Path) -> None:
    """Each rank's average takes in the BN statistics of its own shard: they are averaged over the ranks at the end of
    an epoch, as the model's are, before the ranks validate their shares of the val split with it."""
    import torch.multiprocessing as mp

    mp.spawn(_stage1_on_rank, args=(str(tmp_path / "init"), str(tiny_demo_root), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert any("running_mean" in name for name in ranks[0])
    for name, tensor in ranks[0].items():
        assert torch.equal(tensor, ranks[1][name]), name
    saved = load_checkpoint(tmp_path / "demo-timm-test_resnet-32" / "stage1" / LAST)["model"]
    for name, tensor in saved.items():
        assert torch.equal(tensor, ranks[0][name]), name


RUNS = ("straight", "resumed")


def _stopped_stage1_on_rank(rank: int, init_file: str, data_root: str, out: str) -> None:
    """One rank of a two-process gloo stage 1 with a weight average: an unbroken run, then one stopped at its second
    step (SIGTERM on both ranks, as a scheduler sends it) and resumed."""
    import os

    import torch.distributed as dist

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    for name in RUNS:
        cfg = tiny_config(Path(data_root), Path(out) / name, stage1={"epochs": 1, "batch_size": 4, "ema_decay": 0.9},
                          runtime={"device": "cpu"})  # fmt: skip
        if name == "resumed":
            with pytest.MonkeyPatch.context() as patch:
                _StopAtStep(patch, signal.SIGTERM, at=2)
                assert run_stage1(cfg, progress=False).interrupted_by == signal.SIGTERM
        assert run_stage1(cfg, progress=False).interrupted_by is None
    dist.destroy_process_group()


def test_under_ddp_a_resumed_epoch_ends_with_the_average_an_unbroken_one_has(
    tiny_demo_root: Path, tmp_path: Path
) -> None:
    """Each rank's average holds its own BN statistics until the epoch ends; a stop inside the epoch saves their mean
    (the update is linear: the epoch's end then averages to the same statistics), not rank 0's alone."""
    import torch.multiprocessing as mp

    mp.spawn(_stopped_stage1_on_rank, args=(str(tmp_path / "init"), str(tiny_demo_root), str(tmp_path)), nprocs=2)
    a, b = (load_checkpoint(tmp_path / run / "demo-timm-test_resnet-32" / "stage1" / LAST) for run in RUNS)
    assert a["ema_updates"] == b["ema_updates"] == a["scheduler"]["last_epoch"]
    for entry in ("model", "trained"):
        for name, tensor in a[entry].items():
            torch.testing.assert_close(b[entry][name], tensor, rtol=0, atol=1e-6, msg=f"{entry} {name}")
