"""Bad inputs to ``prepare`` and to the configuration get one line, never a traceback or a lost run: a
runaway field is quarantined like any bad row; empty, truncated or unreadable inputs, a full or
read-only disk, and invalid config values are one ``recsys-kd <cmd>: error: ...`` line naming the file
or key (exit 2); a failed or killed prepare leaves nothing a rerun trips over."""

import errno
import gzip
import json
import math
import os
from pathlib import Path

import pytest

from recsys_kd.cli import main
from recsys_kd.config import ConfigError
from recsys_kd.data.prepare import PrepareConfig, prepare
from recsys_kd.data.quarantine import Quarantine, TooManyBadRows
from recsys_kd.recipe import load_recipe
from tests.faults.common import one_line_error, write_recipe

LONG = 3 << 20  # a 3 MiB field: Arrow's CSV parser refuses rows longer than its 1 MiB block


def _run(tmp_path, format, inputs, name="ds", **options):
    config = PrepareConfig(format=format, inputs=[str(p) for p in inputs], output=str(tmp_path / name),
                           progress=False, **options)
    return prepare(config), tmp_path / name


def _with_long_field(lines, index, field, separator):
    fields = lines[index].rstrip(b"\n").split(separator)
    fields[field] = b"a" * LONG
    return [*lines[:index], separator.join(fields) + b"\n", *lines[index + 1:]]


# --- one runaway field ---------------------------------------------------------------------------


@pytest.mark.parametrize("block_bytes", [16 << 20, 1 << 16], ids=["line-in-block", "line-over-block"])
def test_a_3mb_criteo_field_is_quarantined_and_the_rest_converted(tmp_path, criteo_lines, block_bytes):
    path = tmp_path / "train.txt"
    path.write_bytes(b"".join(_with_long_field(criteo_lines, 5, 20, b"\t")))
    record, dataset = _run(tmp_path, "criteo", [path], block_bytes=block_bytes)
    assert record["quarantined"] == {"field_too_long": 1}
    assert sum(record["rows"].values()) == len(criteo_lines) - 1
    [entry] = [json.loads(line) for line in (dataset / "quarantine.jsonl").read_text().splitlines()]
    assert entry["line"] == 6 and entry["reason"] == "field_too_long" and len(entry["text"]) <= 2000


@pytest.mark.parametrize("block_bytes", [16 << 20, 1 << 16], ids=["line-in-block", "line-over-block"])
def test_a_3mb_avazu_field_is_quarantined_and_the_rest_converted(tmp_path, avazu_lines, block_bytes):
    path = tmp_path / "train.csv"
    lines = _with_long_field(avazu_lines, 9, 5, b",")
    path.write_bytes(b"".join(_with_long_field(lines, len(lines) - 1, 6, b",")))  # the last line too
    record, dataset = _run(tmp_path, "avazu", [path], block_bytes=block_bytes)
    assert record["quarantined"] == {"field_too_long": 2}
    assert sum(record["rows"].values()) == len(avazu_lines) - 1 - 2  # header, two long lines
    lines = [json.loads(line)["line"] for line in (dataset / "quarantine.jsonl").read_text().splitlines()]
    assert lines == [10, len(avazu_lines)]


# --- unusable inputs: one line ----------------------------------------------------------------------


def _prepare_cli(tmp_path, format, inputs, capsys, **prepare_section):
    recipe = write_recipe(tmp_path / "recipe.yaml", {"prepare": {
        "format": format, "inputs": [str(p) for p in inputs], "output": str(tmp_path / "ds"), "progress": False,
        **prepare_section}})
    code = main(["prepare", "-c", str(recipe)])
    return code, capsys.readouterr()


@pytest.mark.parametrize("format,content", [
    ("criteo", b""),
    ("avazu", b""),
    ("avazu", b"HEADER"),
], ids=["criteo-empty", "avazu-empty", "avazu-header-only"])
def test_an_empty_or_header_only_log_is_one_line(tmp_path, capsys, avazu_lines, format, content):
    path = tmp_path / "log.txt"
    path.write_bytes(avazu_lines[0] if content == b"HEADER" else content)
    code, captured = _prepare_cli(tmp_path, format, [path], capsys)
    assert code == 2
    one_line_error(captured, "recsys-kd prepare: error:", path)
    assert not (tmp_path / "ds").exists()


def test_a_header_only_recbole_ratings_file_is_one_line(tmp_path, capsys, shared_data):
    source = shared_data / "movielens-100k-recbole"
    folder = tmp_path / "ml"
    folder.mkdir()
    for name in ("ml-100k.user", "ml-100k.item"):
        (folder / name).write_bytes((source / name).read_bytes())
    (folder / "ml-100k.inter").write_bytes((source / "ml-100k.inter").read_bytes().splitlines(keepends=True)[0])
    code, captured = _prepare_cli(tmp_path, "movielens", [folder], capsys)
    assert code == 2
    one_line_error(captured, "ml-100k.inter")


def test_a_truncated_gz_day_file_is_one_line(tmp_path, capsys, criteo_lines):
    packed = gzip.compress(b"".join(criteo_lines))
    path = tmp_path / "day_0.gz"
    path.write_bytes(packed[: len(packed) // 2])
    code, captured = _prepare_cli(tmp_path, "criteo", [path], capsys)
    assert code == 2
    one_line_error(captured, "day_0.gz")
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds.*"))


@pytest.mark.parametrize("code_name", ["ENOSPC", "EROFS"])
def test_a_full_or_read_only_output_is_one_line_and_leaves_nothing(tmp_path, capsys, criteo_lines, monkeypatch,
                                                                   code_name):
    """Renames fail as on a full or read-only disk, with no file named (as Arrow's write errors); so
    does the cleanup's removal of the staging directory, which must not hide the first error."""
    path = tmp_path / "train.txt"
    path.write_bytes(b"".join(criteo_lines))
    number = getattr(errno, code_name)

    def fail(*args, **kwargs):
        raise OSError(number, os.strerror(number))

    monkeypatch.setattr(os, "replace", fail)
    removed = []
    real_rmtree = __import__("shutil").rmtree

    def rmtree_then_fail(target, *args, **kwargs):
        real_rmtree(target)
        removed.append(target)
        raise OSError(number, os.strerror(number), str(target))

    monkeypatch.setattr("shutil.rmtree", rmtree_then_fail)
    code, captured = _prepare_cli(tmp_path, "criteo", [path], capsys)
    assert code == 2
    line = one_line_error(captured, os.strerror(number), tmp_path / "ds")
    assert ".tmp" not in line and removed  # the cleanup ran; its error (naming the staging) is not the one reported
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds.*"))


def test_quarantine_jsonl_is_one_line_per_row_whatever_the_text(tmp_path):
    """Found by the parser fuzzing: JSON leaves U+0085, U+2028 and U+2029 raw, and line readers
    (str.splitlines among them) break lines there."""
    texts = ["a\x85b", "c\u2028d", "e\u2029f", "caf\u00e9\x1c\x0bg"]
    quarantine = Quarantine(tmp_path / "quarantine.jsonl")
    for line, text in enumerate(texts, 1):
        quarantine.add("raw.txt", line, "bad_token:x", text)
    quarantine.close()
    lines = (tmp_path / "quarantine.jsonl").read_text("utf-8").splitlines()
    assert [json.loads(line)["text"] for line in lines] == texts


def test_too_many_bad_rows_names_a_quarantine_file_that_exists(tmp_path, criteo_lines):
    lines = list(criteo_lines)
    for index in (3, 30, 60):
        lines[index] = b"2" + lines[index][1:]  # label 2
    path = tmp_path / "train.txt"
    path.write_bytes(b"".join(lines))
    with pytest.raises(TooManyBadRows) as raised:
        _run(tmp_path, "criteo", [path], max_bad_fraction=0.001)
    named = Path(str(raised.value).rsplit("see ", 1)[1])
    assert named.exists(), str(raised.value)
    assert [json.loads(line)["line"] for line in named.read_text().splitlines()] == [4, 31, 61]
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds.*"))
    # a later successful run removes the kept quarantine of the failed one
    _run(tmp_path, "criteo", [path], max_bad_fraction=0.5)
    assert not named.exists()


def test_a_rerun_removes_what_a_killed_prepare_left(tmp_path, criteo_lines):
    path = tmp_path / "train.txt"
    path.write_bytes(b"".join(criteo_lines))
    stale = tmp_path / ".ds.k1ll3d_0.tmp"  # a staging directory as tempfile.mkdtemp names it
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "part-00000.parquet").write_bytes(b"partial")
    others = [tmp_path / ".ds2.abcdefgh.tmp", tmp_path / ".ds.v2.abcdefgh.tmp", tmp_path / "keep.tmp"]
    for other in others:
        other.mkdir()
    _run(tmp_path, "criteo", [path])
    assert not stale.exists()
    assert all(other.exists() for other in others)  # other outputs' staging, and anything else, stay


# --- configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key,value", [
    ("train.optim.lr", ".nan"), ("train.optim.lr", "-0.01"), ("train.optim.embedding_lr", ".inf"),
    ("train.optim.embedding_lr", "-1"), ("train.optim.l2_dense", "-0.00001"), ("train.optim.eps", "0"),
])
def test_a_nan_or_negative_learning_rate_is_one_line(tmp_path, capsys, key, value):
    recipe = write_recipe(tmp_path / "recipe.yaml", {"prepare": {"output": str(tmp_path / "missing")}})
    assert main(["train", "-c", str(recipe), f"{key}={value}"]) == 2
    one_line_error(capsys.readouterr(), "recsys-kd train: error:", recipe, key.rsplit(".", 1)[1])


def test_1e_minus_3_is_a_float_in_yaml_and_in_overrides(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  optim:\n    lr: 1e-3\n    embedding_lr: 5E-2\n")
    loaded = load_recipe(recipe)
    assert loaded.train.optim.lr == 1e-3 and loaded.train.optim.embedding_lr == 0.05
    loaded = load_recipe(recipe, ["train.optim.lr=3e-4", "prepare.max_bad_fraction=1e-2"])
    assert loaded.train.optim.lr == 3e-4 and loaded.prepare.max_bad_fraction == 0.01
    for text in ("fast", "nan", "1e-3x", "0x1p-3"):
        with pytest.raises(ConfigError, match="train.optim.lr: expected a number"):
            load_recipe(recipe, [f"train.optim.lr={text}"])
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load_recipe(recipe, ["train.epochs=1e3"])  # no float text for integer fields
    assert not math.isnan(loaded.train.optim.lr)


def test_a_non_utf8_config_file_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"prepare:\n  output: caf\xe9\n")
    assert main(["prepare", "-c", str(recipe)]) == 2
    one_line_error(capsys.readouterr(), recipe, "UTF-8")


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_serve_on_a_port_outside_0_65535_is_refused_by_the_parser(tmp_path, capsys, port):
    artifact = tmp_path / "model.pt"
    artifact.write_bytes(b"not reached")
    with pytest.raises(SystemExit) as raised:
        main(["serve", str(artifact), "--port", port])
    assert raised.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.splitlines()[-1].startswith("recsys-kd serve: error: argument --port:")
    assert port in captured.err and "0..65535" in captured.err
