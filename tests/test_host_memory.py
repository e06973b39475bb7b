"""slic_jax.host_memory.trim gives freed heap pages back (glibc) and is harmless elsewhere."""
import ctypes.util
import sys

import numpy as np
import pytest

from slic_jax import host_memory


def _resident_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * 4096 / 2 ** 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and glibc: Linux only")
def test_trim_returns_freed_small_allocations():
  if host_memory._libc() is None:  # pylint: disable=protected-access
    assert host_memory.trim() is False
    return
  # Many small (heap, not mmap) allocations, freed: resident until trimmed.
  chunks = [np.ones(16 * 1024, np.uint8) for _ in range(12_000)]  # ~190 MB in 16 KB blocks
  del chunks[:-1]
  before = _resident_mb()
  assert host_memory.trim() is True
  after = _resident_mb()
  assert after < before - 50, (before, after)
