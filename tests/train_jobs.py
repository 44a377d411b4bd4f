"""Runs several ``recsys-kd train`` (or ``distill``, ``compress``, ``infer``: a job's ``stage``) jobs one
after the other in one process (one rank), each perhaps stopped as a training step starts::

    python -m tests.train_jobs JOBS.json     # [{"config": X.yaml, "overrides": [...], "stop_at": 5}, ...]

A stop raises :class:`Stopped` from the ``train_step`` hook on every rank as global step ``stop_at``
starts, after the previous step's checkpoint: the ranks leave together, as a preempted job does, and
the next job starts (resuming from the disk like a new process). One process for many runs saves
each run the ~5 s a process takes to start. The hook lives here, in the tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

from recsys_kd import cli
from recsys_kd.train import hooks


class Stopped(BaseException):
    """Raised at the chosen step; a BaseException so that no error handling of the stage catches it."""


def run_jobs(jobs: Sequence[Dict[str, Any]]) -> List[str]:
    """Each job's outcome, in order: ``"0"``/``"2"`` (the exit code) or ``"stopped"``."""
    outcomes = []
    for job in jobs:
        stop_at = job.get("stop_at")

        def stop(rank: int, step: int, stop_at=stop_at) -> None:
            if step == stop_at:
                raise Stopped

        remove = hooks.register("train_step", stop)
        try:
            stage = job.get("stage", "train")
            outcomes.append(str(cli.main([stage, "--config", str(job["config"]), *job.get("overrides", [])])))
        except Stopped:
            outcomes.append("stopped")
        finally:
            remove()
    return outcomes


if __name__ == "__main__":
    results = run_jobs(json.loads(Path(sys.argv[1]).read_text()))
    print("outcomes:", json.dumps(results), flush=True)
    sys.exit(0 if all(outcome in ("0", "stopped") for outcome in results) else 1)
