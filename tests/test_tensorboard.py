"""The trainer's TensorBoard scalars (``<output>/tensorboard``, written when the ``tensorboard``
package is installed, as the ``test`` extra installs it) hold the same values as its metrics log."""

from pathlib import Path

import pytest

from recsys_kd.report import stage_models


def scalars(directory: Path):
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        pytest.fail("tensorboard is not installed; it is a test extra: pip install -e '.[test]' "
                    "(or pip install -r tools/requirements-cpu.txt)")
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.multiprocess
def test_every_trained_model_writes_its_metrics_log_as_tensorboard_scalars(tiny_pipeline_run):
    _, record = tiny_pipeline_run
    trained = [model.output for model in stage_models(record) if model.output.metrics()]
    assert len(trained) >= 3
    for output in trained:
        entries = output.metrics()
        logged = scalars(output.path / "tensorboard")
        training = [entry for entry in entries if "loss" in entry]
        evaluations = [entry for entry in entries if "valid" in entry]
        assert training and evaluations, output
        assert logged["train/loss"] == [(e["step"], pytest.approx(e["loss"], rel=1e-6)) for e in training]
        assert logged["train/samples_per_second"] == [(e["step"], pytest.approx(e["samples_per_second"], rel=1e-6))
                                                      for e in training]
        # the learning rate of every training entry and evaluation, in the order they were logged
        rates = sorted(entries, key=lambda e: (e["step"], "valid" in e))
        assert logged["train/lr"] == [(e["step"], pytest.approx(e["lr"], rel=1e-6)) for e in rates]
        for metric in ("auc", "logloss"):
            assert logged[f"valid/{metric}"] == [(e["step"], pytest.approx(e["valid"][metric], rel=1e-6))
                                                 for e in evaluations], (output, metric)
