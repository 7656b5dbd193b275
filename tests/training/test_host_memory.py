"""`sharded.return_large_frees_to_os`: after it, a large host buffer freed by FSDP leaves the
RSS instead of staying in glibc's heap (measured through mallinfo2 in a fresh process)."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import ctypes, ctypes.util, sys

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                    "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "fixed":
        from retro.components.training.sharded import return_large_frees_to_os
        assert return_large_frees_to_os()
    libc.free(libc.malloc(8 << 20))          # one unit's gathered weights, freed
    before = libc.mallinfo2().hblkhd
    libc.malloc(2 << 20)                     # the next, smaller gather
    print((libc.mallinfo2().hblkhd - before) >> 20)
""")


def _mmapped_mib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or not ctypes.util.find_library("c"),
                    reason="glibc only")
def test_fixed_mmap_threshold_maps_buffers_that_glibc_would_keep_in_the_heap():
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallinfo2
    except AttributeError:
        pytest.skip("glibc < 2.33 has no mallinfo2")
    # glibc's dynamic threshold rose to 8 MiB with the free: the 2 MiB buffer comes from the
    # heap, and would stay there once freed
    assert _mmapped_mib("default") == 0
    assert _mmapped_mib("fixed") == 2
