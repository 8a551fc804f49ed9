"""mfld.resources: handing the C heap's free pages back to the kernel."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mfld import resources

# In a fresh process: 200 MB of 64 KB blocks (below glibc's initial 128 KB mmap threshold, so on
# the heap, one after the other); every other one is freed, which leaves 100 MB of holes between
# blocks in use that free() cannot return from the top of the heap.
_CHILD = """
import ctypes, sys
from mfld import resources

def rss():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))

malloc = ctypes.CDLL(None).malloc
malloc.restype = ctypes.c_void_p
free = ctypes.CDLL(None).free
free.argtypes = [ctypes.c_void_p]
blocks = []
for _ in range(3200):
    p = malloc(64 * 1024)
    ctypes.memset(p, 1, 64 * 1024)  # touch the pages
    blocks.append(p)
for p in blocks[::2]:
    free(p)
before = rss()
released = resources.release_freed_memory()
print(released, before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim and /proc: Linux only")
def test_release_freed_memory_returns_the_heaps_free_pages():
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True).stdout.split()
    if resources._find_malloc_trim() is None:  # a Linux without glibc: nothing to call, nothing claimed
        assert out[0] == "False"
        return
    released, dropped = out[0] == "True", int(out[1])
    assert released
    assert dropped > 80 * 2 ** 20, dropped  # of the 100 MB freed, the whole pages inside the holes
