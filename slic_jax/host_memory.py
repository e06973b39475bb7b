"""Host (glibc) memory of the CPU-hosted step: reuse it within the loop, trim between phases.

**Reuse** (`reuse_freed_memory`). XLA:CPU allocates each executable's temporaries as one
block per call (777 MB for the bf16 2-row SLiC-HF step on T5 1.1 small at Li 512; 1474 MB
in float32). glibc serves a block that large with ``mmap`` and gives it back with
``munmap`` when it is freed (it does so for any block above its mmap threshold, at most
32 MB, and for any block a worker thread's arena cannot hold), so every step faults the
whole block in again, page by page. `benchmarks/results_session5_final.md` (session 5; T5
1.1 small, 2 rows, 4 pairs, Li 512): with glibc's defaults, 202,065 minor page faults and 0.38 s of
kernel time per bf16 step (1.55 s), 412,576 and 0.69 s per float32 step (3.12 s); with
the settings below, 0 faults and 0.01-0.02 s, at 1.36 s and 2.84 s per step.

`reuse_freed_memory` sets glibc's ``mallopt`` so that freed blocks stay in one heap and
the next step reuses them: no ``mmap`` (``M_MMAP_MAX = 0``), one arena for all threads
(``M_ARENA_MAX = 1``; a thread arena would still ``mmap`` what it cannot hold) and no
automatic trim of the free heap top (``M_TRIM_THRESHOLD = -1``, which glibc documents as
"disables trimming completely"). Until session 11 the threshold was 2 GB (``2**31 - 1``,
the largest positive int): a step whose temporaries exceed it was trimmed and faulted in
again every step. T5 1.1 small at 16 pairs, Li 512, 2 rows (`benchmarks/results_b16*.md`):
bf16 (2807 MB of temporaries) 748,600 page faults and 2.70 s of kernel time per 7.63 s
step before, 21 faults, 0.03 s and 5.64 s with trimming off; float32 1,619,468 faults,
6.01 s and 16.41 s before, 5,268 faults, 0.08 s and 13.28 s after; the same peak RSS
(3746 / 3742 and 6871 / 6884 MB). It also makes XLA:CPU
run each step inline in the calling thread (``jax_cpu_enable_async_dispatch = False``):
with asynchronous dispatch, a queued step starts on XLA's thread as soon as its inputs
are ready and allocates its temporaries before the previous step's are freed, so 2-4
blocks are live at once; glibc's default unmaps them again, but under the settings above
they would stay resident. ``python -m slic_jax.train``, whose loop dispatches ahead,
peaked at 4319 and 6122 MB without the inline mode and at 2585 and 2586 MB with it, and ran
1.60 instead of 2.33 seqs/s (T5 1.1 small in bf16, 4 pairs, Li 512 / Lt 64;
`benchmarks/NOTES.md`, session 7); inline, a step frees its block before it returns.
Both must be set before jax starts its backend (threads that have already allocated keep
their arenas; the CPU client reads the dispatch flag when it is created);
`slic_jax.train` calls it first, where the step runs on the CPU (gin:
``host_memory.reuse_freed_memory.enabled``, default None: `step_runs_on_cpu`). The
same settings for ``python -m t5x.train``: the environment variable ``GLIBC_TUNABLES`` =
`GLIBC_TUNABLES` and the command-line flag `INLINE_DISPATCH_ARG` (jax reads its flags
from the command line there, not from the environment). ``tools/benchmark.py`` reports
page faults and kernel time per step (``--host_malloc default``: glibc's defaults and
asynchronous dispatch).

**Trim** (`trim`). XLA:CPU's compiler and the parameter-init step free hundreds of MB when
they finish, but glibc's malloc keeps freed heap pages resident, so they add to the
process's peak RSS during training. ``malloc_trim(0)`` gives them back. The trainer calls
`trim` after initialising the state and after compiling the update step (ahead of the
loop); `tools/benchmark.py`'s workers do the same. Peak RSS of the 2-row SLiC-HF step (T5
1.1 small, 4 pairs, Li 512 / Lt 64): 2844 MB before (`benchmarks/results_full_run.md`),
2477 MB after (`benchmarks/results_session2_final.md`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.util
import os
import pkgutil

import gin
from absl import logging

# glibc <malloc.h> mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# mallopt(M_TRIM_THRESHOLD, -1): never trim the heap top automatically (glibc's
# documented value; mallopt takes an int, and -1 becomes SIZE_MAX inside).
NO_TRIM = -1
# The same as environment settings, for a process that does not call this module
# (python -m t5x.train): the tunable takes a size_t, so "never" is SIZE_MAX.
GLIBC_TUNABLES = ("glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:"
                  f"glibc.malloc.trim_threshold={2 ** 64 - 1}")
# jax's flag for XLA:CPU's asynchronous dispatch; False: each call runs inline.
ASYNC_DISPATCH_FLAG = "jax_cpu_enable_async_dispatch"
# The same for a process that parses jax's absl flags (python -m t5x.train does).
INLINE_DISPATCH_ARG = f"--{ASYNC_DISPATCH_FLAG}=false"


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


def step_runs_on_cpu() -> bool:
  """Whether jax will run the step on the CPU, told without starting jax's backend.

  ``JAX_PLATFORMS`` decides when set (its first entry); otherwise the step runs on the
  CPU unless an accelerator plugin is installed: ``libtpu``, or a PJRT plugin module
  under ``jax_plugins`` or in the ``jax_plugins`` entry-point group (CUDA, ROCm, ...).
  """
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  if importlib.util.find_spec("libtpu") is not None:
    return False
  if importlib.metadata.entry_points(group="jax_plugins"):
    return False
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top
  except ImportError:
    return True
  return next(pkgutil.iter_modules(jax_plugins.__path__), None) is None


@gin.configurable(module="host_memory")
def reuse_freed_memory(enabled: bool | None = None, single_arena: bool = True) -> bool:
  """Keeps freed blocks in the heap for reuse instead of unmapping them (see module doc).

  ``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_ARENA_MAX, 1)``,
  ``mallopt(M_TRIM_THRESHOLD, -1)``, and ``jax_cpu_enable_async_dispatch = False``
  so that one step's temporaries are freed before the next step allocates its own. Call
  it before jax initialises its backend. Memory that is freed stays resident (`trim`
  still gives it back on request, as the trainer does after init and after compiling);
  each step reuses the same blocks, and peak RSS was lower with the settings than
  without in `benchmarks/results.md`.

  enabled: True / False; None (default): only where the step runs on the CPU
    (`step_runs_on_cpu`). On a TPU or GPU host the step's temporaries live on the device,
    and one arena for all threads could slow a many-threaded input pipeline instead.
  single_arena: also ``M_ARENA_MAX = 1`` (default). False leaves glibc's arenas per
    thread: the step's block is still allocated by the calling thread (inline dispatch),
    i.e. from the main heap, but XLA's worker threads no longer share one malloc lock.
    T5 1.1 small, bf16, 2 rows, 4 pairs, Li 512, two alternated pairs of
    ``tools/benchmark.py --_worker slic --host_malloc reuse|reuse_arenas``
    (`benchmarks/NOTES.md`, session 11): compilation 22.3 / 24.1 s → 18.0 / 19.4 s, step
    time the same within noise, page faults per step 0 → 2-3, peak RSS 1688 / 1687 →
    1761 / 1747 MB. The default keeps the lower peak; where many threads compile (many
    cores) the single lock may cost more.

  Returns whether the settings were applied: False when disabled, where the C library
  has no ``mallopt`` (not glibc) or refused a setting, or (with a logged warning) where
  the dispatch mode cannot be set -- jax's backend already running, or a jax without the
  flag: without it the malloc settings could keep several steps' temporaries resident,
  so glibc's defaults stay.
  """
  if enabled is None:
    enabled = step_runs_on_cpu()
  lib = _libc()
  if not enabled or lib is None or not hasattr(lib, "mallopt"):
    return False
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top  (no public API)
  if ASYNC_DISPATCH_FLAG not in jax.config.values or xla_bridge.backends_are_initialized():
    logging.warning(
        "host_memory.reuse_freed_memory: cannot make XLA:CPU run steps inline (%s); "
        "glibc's malloc defaults are left as they are. Call it before the first "
        "jax.devices() or computation.",
        "jax's backend is already initialised" if ASYNC_DISPATCH_FLAG in jax.config.values
        else f"this jax has no {ASYNC_DISPATCH_FLAG}")
    return False
  ok = True
  settings = [(_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, NO_TRIM)]
  settings += [(_M_ARENA_MAX, 1)] if single_arena else []
  for param, value in settings:
    ok = bool(lib.mallopt(param, value)) and ok
  jax.config.update(ASYNC_DISPATCH_FLAG, False)
  return ok
