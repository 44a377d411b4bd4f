"""SIGKILL of a random rank at a random point of train, distill, compress, infer (2 processes) and score:
the rerun completes and ends where an uninterrupted run ends, with no row lost or duplicated and no
partial file under a final name. One kill per stage; ``tools/chaos.py --report`` runs many.

The kill points are drawn from ``RECSYS_KD_CHAOS_SEED`` (default 2026), printed on failure."""

import os
import random

import pytest

from tests.faults import scenarios

pytestmark = pytest.mark.multiprocess
SEED = int(os.environ.get("RECSYS_KD_CHAOS_SEED", "2026"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = scenarios.make_workspace(tmp_path_factory.mktemp("kills"))
    scenarios.references(root)
    return root


@pytest.mark.parametrize("stage", scenarios.STAGES)
def test_a_killed_stage_reruns_to_the_uninterrupted_result(workspace, stage):
    rng = random.Random(f"{SEED}:{stage}")
    outcome = scenarios.kill_and_rerun(workspace, stage, rng)
    where = f"{stage}: rank {outcome.rank} killed at {outcome.index} (RECSYS_KD_CHAOS_SEED={SEED})"
    assert outcome.killed, f"{where}: the fault never fired"
    assert not outcome.partial_files, f"{where}: partial files under final names: {outcome.partial_files}"
    assert outcome.rows_lost == 0 and outcome.rows_duplicated == 0, where
    assert outcome.same_result, f"{where}: the rerun ended elsewhere than the uninterrupted run"
