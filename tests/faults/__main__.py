"""Runs ``recsys-kd`` with a fault injected through the library's hooks (recsys_kd.train.hooks):

    python -m tests.faults train_step=1:10 train --config X.yaml   # SIGKILL rank 1 as step 10 starts
    python -m tests.faults infer_part=1:2 infer --config X.yaml    # SIGKILL rank 1 as it begins its 2nd part

The hook lives here, in the tests: the production loops only announce where they are.
"""

import os
import signal
import sys

from recsys_kd import cli
from recsys_kd.train import hooks


def kill_at(point: str, spec: str) -> None:
    rank, _, index = spec.partition(":")

    def kill(at_rank: int, at_index: int) -> None:
        if at_rank == int(rank) and at_index == int(index):
            os.kill(os.getpid(), signal.SIGKILL)

    hooks.register(point, kill)


if __name__ == "__main__":
    point, _, spec = sys.argv[1].partition("=")
    kill_at(point, spec)
    sys.exit(cli.main(sys.argv[2:]))
