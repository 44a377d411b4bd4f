"""The installed torch / FBGEMM / TorchRec stack, checked once at startup.

TorchRec calls FBGEMM's compiled operators, and FBGEMM is built against one torch release: a
mismatched pair fails deep inside a forward pass (undefined symbols, missing operators), and a CPU
build on a GPU machine trains silently on the CPU. :func:`check_stack` turns both into one line that
names the installed versions and the command that fixes them; the ``recsys-kd`` command calls it
before every stage. ``RECSYS_KD_SKIP_STACK_CHECK=1`` skips it (for a stack built by hand).

No torch import at module level: the check reads package metadata, and asks torch about CUDA only
when it runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Optional

# FBGEMM release (major.minor) -> the torch release (major.minor) it is built against. FBGEMM's
# compatibility table: each release works with its corresponding torch release only. TorchRec
# major.minor equals FBGEMM's (both are released together).
FBGEMM_TORCH = {"1.8": "2.13", "1.9": "2.14"}
CPU_FIX = "bash tools/setup.sh"
GPU_FIX = "bash tools/setup.sh --gpu"
SKIP_ENV = "RECSYS_KD_SKIP_STACK_CHECK"
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one entry per GPU the NVIDIA driver sees


class StackError(RuntimeError):
    """The installed torch / FBGEMM / TorchRec do not work together on this machine (one line)."""


@dataclass(frozen=True)
class Stack:
    """What is installed: versions as pip reports them (``2.13.0+cpu``), the CUDA version torch was
    built with (None for a CPU build), and whether the machine has an NVIDIA GPU."""

    torch: Optional[str]
    fbgemm: Optional[str]
    fbgemm_cpu: Optional[str]
    torchrec: Optional[str]
    torch_cuda: Optional[str]
    gpu_present: bool

    def describe(self) -> str:
        fbgemm = self.fbgemm or "-"
        if self.fbgemm_cpu:
            fbgemm += f" (fbgemm-gpu-cpu {self.fbgemm_cpu})"
        cuda = f"CUDA {self.torch_cuda}" if self.torch_cuda else "CPU build"
        return f"torch {self.torch or '-'} ({cuda}), fbgemm-gpu {fbgemm}, torchrec {self.torchrec or '-'}"


def installed_stack() -> Stack:
    """Reads the installed versions from package metadata, and torch's CUDA version."""
    import torch

    return Stack(
        torch=_version("torch"), fbgemm=_version("fbgemm-gpu"), fbgemm_cpu=_version("fbgemm-gpu-cpu"),
        torchrec=_version("torchrec"), torch_cuda=torch.version.cuda, gpu_present=gpu_present(),
    )


def gpu_present() -> bool:
    """True when the NVIDIA driver reports a GPU, whether or not this torch build can use it; False
    when CUDA_VISIBLE_DEVICES hides every GPU ("" or -1: a CPU run on a GPU machine, on purpose)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    try:
        return any(NVIDIA_GPUS.iterdir())
    except OSError:
        return False


def check_stack(stack: Optional[Stack] = None) -> Stack:
    """Raises :class:`StackError` (one line: the installed versions and the fixing command) when the
    stack cannot work: a package missing, FBGEMM and TorchRec from different releases, FBGEMM built
    for another torch, a CPU build (of torch or FBGEMM) on a machine with a GPU, or a CUDA torch whose
    driver cannot run it. Returns the stack when it is sound.

    Example::

        check_stack()  # in the CLI, before any stage runs
    """
    if os.environ.get(SKIP_ENV):
        return stack or Stack(None, None, None, None, None, False)
    stack = stack or installed_stack()
    fix = GPU_FIX if stack.gpu_present else CPU_FIX
    problem = _problem(stack)
    if problem:
        raise StackError(f"{problem}; installed: {stack.describe()}; fix: {fix} (or set {SKIP_ENV}=1)")
    return stack


def _problem(stack: Stack) -> Optional[str]:
    missing = [name for name, version in (("torch", stack.torch), ("fbgemm-gpu", stack.fbgemm),
                                          ("torchrec", stack.torchrec)) if version is None]
    if missing:
        return f"{', '.join(missing)} not installed"
    torch_release, fbgemm_release, torchrec_release = (_release(v) for v in (stack.torch, stack.fbgemm, stack.torchrec))
    if fbgemm_release != torchrec_release:
        return f"fbgemm-gpu {fbgemm_release} and torchrec {torchrec_release} are from different releases"
    wanted_torch = FBGEMM_TORCH.get(fbgemm_release)
    if wanted_torch is None:
        known = ", ".join(f"fbgemm {f} + torch {t}" for f, t in FBGEMM_TORCH.items())
        return f"fbgemm-gpu {fbgemm_release} is not a known release (known: {known})"
    if torch_release != wanted_torch:
        return f"fbgemm-gpu {fbgemm_release} is built for torch {wanted_torch}, not {torch_release}"
    cpu_fbgemm = stack.fbgemm_cpu is not None or _local(stack.fbgemm) == "cpu"
    if stack.torch_cuda and cpu_fbgemm:
        return "torch is a CUDA build but fbgemm-gpu is the CPU build (its CUDA kernels are missing)"
    if stack.gpu_present and not stack.torch_cuda:
        return "this machine has an NVIDIA GPU but torch is a CPU build (training would run on the CPU)"
    if stack.gpu_present and cpu_fbgemm:
        return "this machine has an NVIDIA GPU but fbgemm-gpu is the CPU build"
    if stack.gpu_present and not _cuda_usable():
        return (f"torch (CUDA {stack.torch_cuda}) cannot use the GPU: the NVIDIA driver is too old for CUDA "
                f"{stack.torch_cuda} (nvidia-smi shows the driver's CUDA version)")
    return None


def _cuda_usable() -> bool:
    import torch

    return torch.cuda.is_available()


def _version(distribution: str) -> Optional[str]:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _release(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13``."""
    return ".".join(version.split("+")[0].split(".")[:2])


def _local(version: Optional[str]) -> str:
    """The local label: ``1.8.0+cpu`` -> ``cpu``, ``1.8.0`` -> ``""``."""
    return version.partition("+")[2] if version else ""
