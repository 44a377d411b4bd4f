"""tools/setup.sh builds a fresh .venv when the existing one has the other stack (CPU <-> GPU): pip
alone would keep it, since `torch 2.13.0+cpu` satisfies `torch==2.13.0`."""

import shutil
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def fake_project(root: Path) -> Path:
    """The files setup.sh reads, with requirement files that install nothing (no network, seconds)."""
    (root / "tools" / "fbgemm-gpu-cpu-shim").mkdir(parents=True)
    shutil.copy(PROJECT / "tools" / "setup.sh", root / "tools" / "setup.sh")
    shutil.copy(PROJECT / "setup.cfg", root / "setup.cfg")
    shutil.copy(PROJECT / "tools" / "fbgemm-gpu-cpu-shim" / "pyproject.toml", root / "tools" / "fbgemm-gpu-cpu-shim")
    for flavour in ("cpu", "gpu"):
        (root / "tools" / f"requirements-{flavour}.txt").write_text(f"# {flavour} stack (empty in this test)\n")
    return root


def fake_venv(root: Path, torch_build: str) -> None:
    """A .venv whose python answers setup.sh's question 'which torch build?' with ``torch_build``."""
    python = root / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"#!/bin/sh\necho {torch_build}\n")
    python.chmod(0o755)
    (root / ".venv" / "marker").write_text("the old venv")


def setup(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "tools/setup.sh", *args], cwd=root, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=300)


def test_switching_flavour_builds_a_fresh_venv(tmp_path):
    root = fake_project(tmp_path)
    fake_venv(root, "gpu")
    run = setup(root)  # CPU asked for, the venv has the CUDA stack
    assert run.returncode == 0, run.stderr
    assert "has the gpu stack, cpu was asked for: building a fresh .venv" in run.stdout
    assert not (root / ".venv" / "marker").exists() and (root / ".venv" / ".recsys_kd-installed").exists()


def test_same_flavour_keeps_the_venv(tmp_path):
    root = fake_project(tmp_path)
    fake_venv(root, "gpu")
    run = setup(root, "--gpu")  # the fake python also answers setup.sh's pip calls: they "succeed"
    assert run.returncode == 0, run.stderr
    assert "building a fresh .venv" not in run.stdout
    assert (root / ".venv" / "marker").exists() and (root / ".venv" / ".recsys_kd-installed").exists()
