"""Learning-rate schedules (each formula against a direct computation; plateau reductions in a real run,
and their resume), evaluation cadence in fractions of an epoch, and fine-tuning that never hands on a
model worse than the one it started from."""

import json
import math

import pytest
import torch

from recsys_kd.compress.stage import FinetuneConfig
from recsys_kd.config import ConfigError, from_dict
from recsys_kd.runs import TrainOutput
from recsys_kd.train import checkpoint
from recsys_kd.train.config import TrainConfig
from recsys_kd.train.schedule import LearningRates, ScheduleConfig, lr_scale, steps_between_evaluations
from tests.trainrun import final_weights, run_ranks, train_on_synthetic, write_recipe

MODEL = {"name": "dnn", "embedding_dim": 8, "mlp_layers": [32, 16]}


def test_each_schedule_is_its_formula():
    constant = ScheduleConfig()
    assert [lr_scale(constant, s, 10, 3) for s in range(4)] == [1.0] * 4
    plateau = ScheduleConfig(kind="plateau", factor=0.1)
    assert [lr_scale(plateau, 7, 10, r) for r in range(3)] == [1.0, 0.1, pytest.approx(0.01)]
    step = ScheduleConfig(kind="step", factor=0.5, step_every=3)
    assert [lr_scale(step, s, 10, 0) for s in range(7)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]
    cosine = ScheduleConfig(kind="cosine")
    for s in range(11):
        assert lr_scale(cosine, s, 10, 0) == pytest.approx((1 + math.cos(math.pi * s / 10)) / 2)
    warm = ScheduleConfig(kind="cosine", warmup_steps=4)
    for s in range(4):
        assert lr_scale(warm, s, 10, 0) == pytest.approx((s + 1) / 4 * (1 + math.cos(math.pi * s / 10)) / 2)
    assert lr_scale(warm, 4, 10, 0) == pytest.approx((1 + math.cos(math.pi * 0.4)) / 2)


def test_learning_rates_scale_every_group_from_its_configured_value_and_floor():
    weights = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.SGD([{"params": [weights[0]], "lr": 0.1}, {"params": [weights[1]], "lr": 1e-7}])
    rates = LearningRates(optimizer, min_lr=1e-6)
    rates.apply(0.5)
    assert rates.current == [pytest.approx(0.05), pytest.approx(1e-7)]  # never below min_lr, nor raised to it
    rates.apply(1e-9)
    assert rates.current == [pytest.approx(1e-6), pytest.approx(1e-7)]
    optimizer.param_groups[0]["lr"] = 123.0  # what a resume loads: the saved, scaled value
    rates.apply(1.0)
    assert rates.current[0] == pytest.approx(0.1)


def test_evaluation_cadence_in_fractions_of_an_epoch_or_samples():
    assert steps_between_evaluations(0, 0.25, 0, steps_per_epoch=40, samples_per_step=256) == 10
    assert steps_between_evaluations(0, 0.25, 0, steps_per_epoch=400, samples_per_step=256) == 100
    assert steps_between_evaluations(0, 0.0, 25_600, steps_per_epoch=400, samples_per_step=256) == 100
    assert steps_between_evaluations(7, 0.0, 0, steps_per_epoch=400, samples_per_step=256) == 7
    with pytest.raises(ConfigError, match="set one evaluation cadence"):
        from_dict(TrainConfig, {"eval_every_steps": 5, "eval_every_epochs": 0.5})
    with pytest.raises(ConfigError, match="set one evaluation cadence"):  # compress's fine-tunings: the same rule
        from_dict(FinetuneConfig, {"eval_every_samples": 5000, "eval_every_epochs": 0.5})
    with pytest.raises(ConfigError, match="eval_every_epochs in"):
        from_dict(FinetuneConfig, {"eval_every_epochs": 2.0})
    with pytest.raises(ConfigError, match="kind 'step' needs step_every"):
        from_dict(TrainConfig, {"schedule": {"kind": "step"}})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_on_synthetic(tmp_path_factory.mktemp("schedule"), {"dnn": MODEL}, rows=6000, seed=3, max_steps=60)


def recipe(root, name, **train):
    return write_recipe(root / f"{name}.yaml", {
        "run_dir": str(root), "prepare": {"format": "synthetic", "output": str(root / "data")},
        "reader": {"batch_size": 128, "shuffle": True},
        "train": {"model": MODEL, "output": str(root / name), "progress": False, **train},
    })


PLATEAU = {"epochs": 2, "eval_every_steps": 3, "patience": 100, "checkpoint_every_steps": 6,
           "optim": {"lr": 0.03, "embedding_lr": 0.3},
           "schedule": {"kind": "plateau", "factor": 0.5, "patience": 1, "min_lr": 0.0}}


def test_plateau_reduces_after_each_stall_and_resumes_on_the_same_sequence(trained):
    assert run_ranks(recipe(trained, "plateau", **PLATEAU), 1) == [0]
    record = TrainOutput(trained / "plateau").record
    history = record["history"]
    assert record["lr_reductions"] >= 1  # a run with stalls, so the rule below is exercised
    for before, after in zip(history, history[1:]):
        expected = before["lr"] * (1.0 if before["improved"] else 0.5)
        assert after["lr"] == pytest.approx(expected, rel=1e-6), (before, after)
    assert record["lr_reductions"] == sum(not h["improved"] for h in history)  # schedule patience 1
    # killed after a few reductions, the rerun continues the same schedule to the same model
    killed_at = next(h["step"] for h in history if h["lr_reductions"] >= 1) + 4
    assert run_ranks(recipe(trained, "plateau_killed", **PLATEAU), 1, fault=f"train_step=0:{killed_at}") != [0]
    assert run_ranks(recipe(trained, "plateau_killed", **PLATEAU), 1) == [0]
    resumed = TrainOutput(trained / "plateau_killed").record
    assert [h["lr"] for h in resumed["history"]] == pytest.approx([h["lr"] for h in history])
    assert resumed["test"] == pytest.approx(record["test"])
    for key, value in final_weights(trained / "plateau", trained / "data", MODEL).items():
        torch.testing.assert_close(final_weights(trained / "plateau_killed", trained / "data", MODEL)[key], value)


def test_fine_tuning_that_loses_hands_on_its_starting_point(trained):
    """An lr far too large makes every fine-tuned evaluation worse than the start: the run's best model
    is then its starting point, evaluated first, bit for bit."""
    assert run_ranks(recipe(trained, "start", epochs=2, eval_every_steps=10, patience=100,
                            optim={"lr": 0.03, "embedding_lr": 0.3}), 1) == [0]
    start = TrainOutput(trained / "start")
    assert start.record["best_valid"] > 0.6  # a model worth keeping
    assert run_ranks(recipe(trained, "ft", epochs=1, eval_every_epochs=0.25, patience=10,
                            init_from=str(start.best), optim={"lr": 3.0, "embedding_lr": 30.0}), 1) == [0]
    record = TrainOutput(trained / "ft").record
    first, later = record["history"][0], record["history"][1:]
    assert first["step"] == 0 and first["improved"]
    assert later and all(h["valid"]["auc"] < first["valid"]["auc"] for h in later)  # training lost
    assert record["best_step"] == 0 and record["best_valid"] == first["valid"]["auc"]
    assert len(later) == 4  # every quarter of the epoch
    handed_on = checkpoint.load_model(TrainOutput(trained / "ft")).state_dict()
    for key, value in checkpoint.load_model(start).state_dict().items():
        torch.testing.assert_close(handed_on[key], value, rtol=0, atol=0)
    assert json.loads((trained / "ft" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 0
