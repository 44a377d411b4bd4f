"""The startup version guard (recsys_kd/stack.py): mismatched torch / FBGEMM / TorchRec and CPU builds on
a GPU machine are one line naming the installed versions and the fixing command."""

import pytest

from recsys_kd import stack
from recsys_kd.cli import main
from recsys_kd.stack import CPU_FIX, GPU_FIX, Stack, StackError, check_stack

CPU_STACK = Stack(torch="2.13.0+cpu", fbgemm="1.8.0+cpu", fbgemm_cpu="1.8.0", torchrec="1.8.0", torch_cuda=None,
                  gpu_present=False)
GPU_STACK = Stack(torch="2.13.0+cu130", fbgemm="1.8.0", fbgemm_cpu=None, torchrec="1.8.0", torch_cuda="13.0",
                  gpu_present=True)


@pytest.fixture(autouse=True)
def guard_on(monkeypatch):
    monkeypatch.delenv(stack.SKIP_ENV, raising=False)
    monkeypatch.setattr(stack, "_cuda_usable", lambda: True)


def test_the_pinned_stacks_pass():
    assert check_stack(CPU_STACK) is CPU_STACK
    assert check_stack(GPU_STACK) is GPU_STACK
    assert check_stack().torch is not None  # this environment's own stack


@pytest.mark.parametrize("changes, problem, fix", [
    ({"torchrec": "1.9.0"}, "fbgemm-gpu 1.8 and torchrec 1.9 are from different releases", CPU_FIX),
    ({"torch": "2.14.0+cpu"}, "fbgemm-gpu 1.8 is built for torch 2.13, not 2.14", CPU_FIX),
    ({"fbgemm": "1.2.0", "fbgemm_cpu": None, "torchrec": "1.2.0"}, "fbgemm-gpu 1.2 is not a known release", CPU_FIX),
    ({"torchrec": None}, "torchrec not installed", CPU_FIX),
    ({"gpu_present": True}, "this machine has an NVIDIA GPU but torch is a CPU build", GPU_FIX),
])
def test_cpu_stack_problems(changes, problem, fix):
    with pytest.raises(StackError) as raised:
        check_stack(Stack(**{**CPU_STACK.__dict__, **changes}))
    message = str(raised.value)
    assert "\n" not in message and message.startswith(problem)
    assert f"fix: {fix} " in message and "installed: torch " in message


def test_gpu_stack_problems(monkeypatch):
    cpu_fbgemm = Stack(**{**GPU_STACK.__dict__, "fbgemm": "1.8.0+cpu", "fbgemm_cpu": "1.8.0"})
    with pytest.raises(StackError, match="torch is a CUDA build but fbgemm-gpu is the CPU build.*fix: bash tools/setup.sh --gpu"):
        check_stack(cpu_fbgemm)
    monkeypatch.setattr(stack, "_cuda_usable", lambda: False)
    with pytest.raises(StackError, match=r"cannot use the GPU: the NVIDIA driver is too old for CUDA 13.0.*"
                                         r"installed: torch 2.13.0\+cu130 \(CUDA 13.0\), fbgemm-gpu 1.8.0, torchrec 1.8.0"):
        check_stack(GPU_STACK)


def test_the_cli_stops_with_one_line_and_can_skip_the_check(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(stack, "installed_stack", lambda: Stack(**{**CPU_STACK.__dict__, "torchrec": "1.7.0"}))
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("recsys-kd inspect: error: fbgemm-gpu 1.8 and torchrec 1.7")
    monkeypatch.setenv(stack.SKIP_ENV, "1")
    assert main(["inspect", str(tmp_path)]) == 2  # past the guard: now the dataset is missing
    assert "schema.json: not found" in capsys.readouterr().err


def test_gpus_hidden_on_purpose_are_not_a_gpu_machine(monkeypatch, tmp_path):
    gpus = tmp_path / "gpus"
    (gpus / "0000:01:00.0").mkdir(parents=True)
    monkeypatch.setattr(stack, "NVIDIA_GPUS", gpus)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert stack.gpu_present()
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert not stack.gpu_present()
    monkeypatch.setattr(stack, "NVIDIA_GPUS", tmp_path / "no-driver")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert not stack.gpu_present()
