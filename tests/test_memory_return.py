"""glibc gives freed blocks back to the kernel once ``memory.return_large_frees`` fixed its mmap threshold
(what ``hermesd convert`` does before it writes stages)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# In a fresh interpreter (a clean allocator): free a few 4 MiB blocks (glibc then raises its mmap
# threshold above them), allocate 40 blocks of 3 MiB, keep only the last; print how much RSS stayed.
CHILD = """
import sys
import numpy as np
from hermesd import memory
if sys.argv[1] == "fixed":
    assert memory.return_large_frees()
base = memory.rss_bytes()
big = [np.ones(4 << 20, dtype=np.uint8) for _ in range(2)]
del big
blocks = [np.ones(3 << 20, dtype=np.uint8) for _ in range(40)]
blocks = blocks[-1:]
print((memory.rss_bytes() - base) >> 20)
"""


def kept_mib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_freed_blocks_go_back_to_the_kernel_with_a_fixed_threshold():
    assert kept_mib("default") >= 90  # glibc's adaptive threshold keeps ~117 MiB of freed blocks
    assert kept_mib("fixed") <= 16

