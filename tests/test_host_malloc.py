"""--host_malloc: with freed memory kept (glibc mallopt), a large activation-sized buffer that is freed and allocated
again comes back without page faults; glibc's default hands it back to the kernel and faults it in every time."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from engine.host_malloc import configure_host_malloc
from tests.conftest import REPO

PROGRAM = """
import json, resource, sys
import torch
from engine.host_malloc import configure_host_malloc
applied = configure_host_malloc(sys.argv[1], cuda=sys.argv[2] == "cuda")
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # one 64 MB activation: allocate, write (as an elementwise op's output), free
    x = torch.empty(16 << 20)
    x.fill_(1.0)
    del x
for _ in range(16):  # the heap first grows through its 256 MB top pad, then reuses the freed blocks
    step()
before = faults()
for _ in range(4):
    step()
print(json.dumps({"applied": applied, "faults": faults() - before}))
"""
PAGES_PER_BUFFER = (64 << 20) // 4096


def _faults(choice: str, device: str = "cpu") -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, choice, device], cwd=REPO, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_kept_memory_is_reused_without_page_faults():
    system, keep, auto = _faults("system"), _faults("keep"), _faults("auto")
    assert not system["applied"] and keep["applied"] and auto["applied"]  # auto keeps on a CPU-only run
    assert system["faults"] >= 4 * PAGES_PER_BUFFER * 0.9  # every reuse faults the whole buffer in again
    assert keep["faults"] < PAGES_PER_BUFFER * 0.05 and auto["faults"] < PAGES_PER_BUFFER * 0.05
    assert _faults("auto", "cuda")["applied"] is False  # with a GPU, the host allocator is left alone


def test_choices_are_checked():
    assert configure_host_malloc("system", cuda=False) is False
    with pytest.raises(ValueError, match="host_malloc must be one of"):
        configure_host_malloc("jemalloc", cuda=False)
