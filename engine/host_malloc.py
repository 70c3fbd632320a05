"""Keep freed host memory in the process (glibc ``mallopt``): the CPU training step's biggest non-matmul cost.

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and returns it to the
kernel on free, and trims the heap top whenever more than the trim threshold is free. A ViT-B/16 step allocates and
frees activations of 30-60 MB hundreds of times, so each one comes back as untouched pages: every elementwise op
that writes a fresh output (QuickGELU's ``mul``/``sigmoid``, ``copy_``, ``fill_``) then pays a page fault per 4 kB.
Measured on the 2-core dev CPU (ViT-B/16 stage-1 training step, 2 videos x 12 frames, bench/bench_train.py): fp32
25.0 -> 11.0 s, amp_bf16 15.9 -> 4.0 s once the heap has grown (a few steps), for +7-35% peak RSS (fp32 6.7 -> 9.0
GB; freed blocks are reused, not returned).

:func:`keep_freed_memory` sets ``M_MMAP_MAX = 0`` (large blocks come from the heap and are reused),
``M_TRIM_THRESHOLD`` to -1 (free memory is never handed back; the int maximum, 2 GB, is not enough: a bf16 ViT-B/16
step frees more than that at the heap top) and ``M_TOP_PAD`` to 256 MB (the heap grows in
large steps). It is what ``--host_malloc keep`` does; ``auto`` (the default) does it when no CUDA device is
visible, where the host allocator carries the model's activations. The settings hold for the process and the
DataLoader workers it forks. Other C libraries (musl, macOS) have no ``mallopt``: the call is a no-op there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

logger = logging.getLogger(__name__)

# glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
NEVER_TRIM = -1  # mallopt(3): "the value -1 disables trimming completely"
TOP_PAD = 256 << 20
CHOICES = ("auto", "keep", "system")


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:  # pragma: no cover - a Linux without a loadable libc
        return None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring); True when the settings were applied."""
    libc = _glibc()
    if libc is None:
        logger.info("host malloc: not glibc (%s), settings left as they are", platform.libc_ver()[0] or "unknown")
        return False
    applied = all(
        libc.mallopt(param, value) == 1
        for param, value in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER_TRIM), (M_TOP_PAD, TOP_PAD))
    )
    logger.info("host malloc: freed memory kept in the process (mmap off, no trim): %s", applied)
    return applied


def configure_host_malloc(choice: str, cuda: bool) -> bool:
    """Apply ``--host_malloc``: ``keep`` always, ``auto`` when ``cuda`` is False, ``system`` never. True if applied."""
    if choice not in CHOICES:
        raise ValueError(f"host_malloc must be one of {CHOICES}, not {choice!r}")
    if choice == "keep" or (choice == "auto" and not cuda):
        return keep_freed_memory()
    return False
