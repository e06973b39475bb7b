"""Returning freed host memory to the operating system between the trainer's phases.

XLA:CPU's compiler and the parameter-init step free hundreds of MB when they finish, but
glibc's malloc keeps freed heap pages resident, so they add to the process's peak RSS
during training. ``malloc_trim(0)`` gives them back. The trainer calls `trim` after
initialising the state and after compiling the update step (ahead of the loop);
`tools/benchmark.py`'s workers do the same. Peak RSS of the 2-row SLiC-HF step (T5 1.1
small, 4 pairs, Li 512 / Lt 64): 2844 MB before (`benchmarks/results_full_run.md`), 2477 MB
after (`benchmarks/results.md`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _libc():
  name = ctypes.util.find_library("c")
  try:
    lib = ctypes.CDLL(name) if name else None
  except OSError:  # pragma: no cover - no C library to load
    return None
  return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def trim() -> bool:
  """Gives freed heap memory back to the OS (glibc ``malloc_trim(0)``).

  Returns whether anything could be done: False where the C library has no
  ``malloc_trim`` (macOS, musl), which is harmless.
  """
  lib = _libc()
  return bool(lib is not None and lib.malloc_trim(0) >= 0)
