"""Observation points in the stages' loops, for code outside the library.

A loop announces where it is (``train_step``: a training step is about to run, with its global step;
``infer_part`` and ``score_part``: this process begins its n-th output part); whatever was registered
for that point is called with (rank, index). The library registers nothing: the fault-injection tests register a hook
that kills a rank at a chosen step, a profiler could time steps. Registration is process-wide.

Example::

    remove = register("train_step", lambda rank, step: print(rank, step))
    ...
    remove()
"""

from __future__ import annotations

from typing import Callable, Dict, List

Hook = Callable[[int, int], None]
POINTS = ("train_step", "infer_part", "score_part")
_hooks: Dict[str, List[Hook]] = {point: [] for point in POINTS}


def register(point: str, hook: Hook) -> Callable[[], None]:
    """Calls ``hook(rank, index)`` each time a loop reaches ``point``; returns a function that removes it."""
    if point not in _hooks:
        raise ValueError(f"unknown hook point {point!r} (known: {', '.join(POINTS)})")
    _hooks[point].append(hook)
    return lambda: _hooks[point].remove(hook)


def reached(point: str, rank: int, index: int) -> None:
    """Called by the loops: runs the hooks registered for ``point``."""
    for hook in _hooks[point]:
        hook(rank, index)
