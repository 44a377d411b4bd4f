"""Helpers of the fault tests: recipes for ``recsys_kd.cli.main``, and the check that a failed command
printed one line and no traceback."""

from pathlib import Path
from typing import Dict

import yaml


def write_recipe(path: Path, sections: Dict) -> Path:
    path.write_text(yaml.safe_dump(sections))
    return path


def one_line_error(captured, *names: str) -> str:
    """The single stderr line of a failed command; it must name each of ``names``."""
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert "Traceback" not in captured.err, captured.err
    assert len(lines) == 1, captured.err
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]
