"""The allocator policies of recsys_kd.memory, each in a fresh process (they are process-wide)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]

# A training step's pattern: allocate a [1024, 256] float activation, write it, free it; counts the
# minor page faults of 40 such steps (after 10 unmeasured ones) under each policy, in the order a training process meets them
# (the reader pins the streaming policy, the trainer then chooses the step policy, a later reader
# must leave it in place).
_SCRIPT = """
import json, resource, torch
from recsys_kd import memory

def step():
    activation = torch.empty(1024, 256)
    activation.fill_(1.0)
    del activation

def faults_of_steps(steps=40, warmup=10):
    for _ in range(warmup):  # the heap grows to its working size over the first steps
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

pinned = memory.pin_mmap_threshold()
streaming = faults_of_steps()
reused = memory.reuse_step_memory()
with_reuse = faults_of_steps()
pinned_again = memory.pin_mmap_threshold()
after_reader = faults_of_steps()
print(json.dumps({"pinned": pinned, "reused": reused, "pinned_again": pinned_again,
                  "streaming": streaming, "step": with_reuse, "after_reader": after_reader}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_step_memory_is_reused_without_page_faults_and_the_streaming_pin_leaves_it():
    done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, cwd=PROJECT,
                          timeout=120, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["pinned"] and result["reused"]
    assert result["pinned_again"] is False  # the training policy stays
    pages_per_block = (1024 * 256 * 4) // 4096
    # streaming: every 1 MiB block is a fresh mmap whose pages all fault on first touch
    assert result["streaming"] >= 40 * pages_per_block * 0.9
    # training: the freed block is reused, its pages already mapped
    assert result["step"] < pages_per_block
    assert result["after_reader"] < pages_per_block
