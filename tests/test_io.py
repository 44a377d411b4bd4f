import os
import stat

import pytest

from recsys_kd.io import atomic_write_json, prefetch, staged_directory


def test_prefetch_yields_all_items_in_order_and_reraises():
    assert list(prefetch(iter(range(100)), depth=3)) == list(range(100))

    def failing():
        yield 1
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        list(prefetch(failing()))
    # Abandoning the consumer early stops the producer thread (no hang).
    consumer = prefetch(iter(range(10_000)), depth=1)
    assert next(consumer) == 0
    consumer.close()


def test_staged_directory_publishes_only_on_success(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_directory(target) as staging:
            (staging / "part").write_text("partial")
            raise RuntimeError("crash mid-write")
    assert not target.exists() and os.listdir(tmp_path) == []
    with staged_directory(target) as staging:
        (staging / "part").write_text("complete")
    assert (target / "part").read_text() == "complete"
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~_umask()
    with pytest.raises(FileExistsError):
        with staged_directory(target):
            pass
    with pytest.raises(RuntimeError):
        with staged_directory(target, overwrite=True) as staging:
            raise RuntimeError("crash while replacing")
    assert (target / "part").read_text() == "complete"
    with staged_directory(target, overwrite=True) as staging:
        (staging / "part").write_text("new")
    assert (target / "part").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["out"]


def test_atomic_write_json_replaces_whole_file(tmp_path):
    path = tmp_path / "a" / "record.json"
    atomic_write_json(path, {"x": 1})
    atomic_write_json(path, {"x": 2})
    assert path.read_text().strip().endswith("}") and '"x": 2' in path.read_text()
    assert os.listdir(path.parent) == ["record.json"]


def _umask():
    current = os.umask(0)
    os.umask(current)
    return current
