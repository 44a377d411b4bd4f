import os
from pathlib import Path

import pytest
import torch

PROJECT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RECSYS_KD_SHARED_DATA", PROJECT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real data samples not found at {SHARED_DATA} (set RECSYS_KD_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_pipeline_run(tmp_path_factory):
    """A finished run of every pipeline stage on a tiny recipe, made once for the tests that read one:
    (the recipe's path, the pipeline's record)."""
    from recsys_kd.pipeline import run_pipeline
    from recsys_kd.recipe import load_recipe
    from tests.helpers import tiny_pipeline_recipe

    config = tiny_pipeline_recipe(tmp_path_factory.mktemp("tiny_run"))
    return config, run_pipeline(load_recipe(config))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads; on a busy machine their spin waits made
    model-level tests ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def seeded():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _no_process_group_left_behind():
    """Stages run in-process create a one-process default group; later modules (forked ranks
    among them) must start without it."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
