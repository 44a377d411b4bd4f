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
