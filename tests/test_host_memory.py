"""slic_jax.host_memory: `trim` gives freed heap pages back (glibc) and is harmless elsewhere;
`reuse_freed_memory` keeps large freed blocks for reuse instead of re-faulting them."""
import ctypes.util
import os
import subprocess
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


_REUSE_PROBE = r"""
import ctypes, resource, sys
from slic_jax import host_memory
applied = host_memory.reuse_freed_memory(enabled=sys.argv[1] == "1")
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = int(sys.argv[2]) * 2 ** 20  # 64 MB: far above glibc's largest mmap threshold (32 MB)

def step():  # what an XLA:CPU call does with its temporaries: allocate, write, free
  p = libc.malloc(size)
  ctypes.memset(p, 1, size)
  libc.free(p)

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
"""


def _probe(enabled: bool, size_mb: int = 64, env=None) -> tuple[bool, float]:
  """(applied, page faults per allocate-write-free of a ``size_mb`` block)."""
  out = subprocess.run([sys.executable, "-c", _REUSE_PROBE, "1" if enabled else "0",
                        str(size_mb)], capture_output=True, text=True, check=True, timeout=300,
                       env={**os.environ, **(env or {})},
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  applied, faults = out.stdout.split()
  return applied == "True", float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux") or host_memory._libc() is None,
                    reason="glibc's mallopt: Linux only")
def test_reuse_freed_memory_stops_refaulting_large_blocks():
  # glibc's default: a 64 MB block is mmap'ed and munmap'ed every time, so each
  # allocate-write-free faults all its 16384 pages in again.
  applied, faults = _probe(False)
  assert applied is False
  assert faults > 8000, faults
  # With reuse_freed_memory the freed block stays in the heap and is reused.
  applied, faults = _probe(True)
  assert applied is True
  assert faults < 100, faults


@pytest.mark.skipif(not sys.platform.startswith("linux") or host_memory._libc() is None,
                    reason="glibc's mallopt: Linux only")
def test_blocks_above_2gb_stay_in_the_heap_too():
  """A step's temporaries above 2 GB (T5 1.1 small at 16 pairs) are not trimmed and
  faulted in again each step: trimming is off, not just raised to 2**31 - 1 (which let
  glibc trim such a block after every free: 563,168 faults per step here). Both ways in:
  `reuse_freed_memory` (mallopt) and `GLIBC_TUNABLES` (what t5x.train gets)."""
  size_mb = 2200  # 563,200 pages of 4 KB
  applied, faults = _probe(True, size_mb)
  assert applied is True
  assert faults < 1000, faults
  applied, faults = _probe(False, size_mb, env={"GLIBC_TUNABLES": host_memory.GLIBC_TUNABLES})
  assert applied is False
  assert faults < 1000, faults


_DISPATCH_PROBE = r"""
import ctypes, functools, sys
from slic_jax import host_memory
arm = sys.argv[1]
if arm != "t5x_flags":  # "t5x_flags": GLIBC_TUNABLES and the jax flag, as t5x.train gets them
  host_memory.reuse_freed_memory(enabled=True)
import jax, jax.numpy as jnp
if arm == "t5x_flags":
  jax.config.parse_flags_with_absl()  # what t5x.train's config_utils does with sys.argv
if arm == "async":  # the malloc settings without inline execution: why both go together
  jax.config.update(host_memory.ASYNC_DISPATCH_FLAG, True)

class MallInfo2(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in ("arena ordblks smblks hblks hblkhd usmblks "
                                             "fsmblks uordblks fordblks keepcost").split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
n = 1 << 23

@functools.partial(jax.jit, donate_argnums=0)
def step(x):  # like a training step: donated state, a large temporary block per call
  return x + jnp.cumsum(jnp.sort(x * 1.0001 + 1.0)) * 1e-9

compiled = step.lower(jnp.zeros(n, jnp.float32)).compile()
temp = compiled.memory_analysis().temp_size_in_bytes
x = jax.block_until_ready(compiled(jnp.arange(n, dtype=jnp.float32)))
before = libc.mallinfo2().arena
ready = 0  # calls whose result was computed when the call returned: inline execution
for _ in range(8):  # dispatched ahead, as slic_jax.train's loop does
  x = compiled(x)
  ready += x.is_ready()
jax.block_until_ready(x)
print(temp, libc.mallinfo2().arena - before, ready)
"""


def _dispatch_probe(arm: str) -> tuple[int, int, int]:
  """(temp block bytes, heap growth over 8 queued calls, calls computed when they returned)."""
  env, argv = dict(os.environ), [arm]
  # A real step's machine code (conftest's LLVM -O0 only speeds up the suite's compiles).
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_backend_optimization_level=0", "")
  if arm == "t5x_flags":
    env["GLIBC_TUNABLES"] = host_memory.GLIBC_TUNABLES
    argv.append(host_memory.INLINE_DISPATCH_ARG)
  out = subprocess.run([sys.executable, "-c", _DISPATCH_PROBE, *argv], capture_output=True,
                       text=True, check=True, timeout=300, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  temp, growth, ready = out.stdout.split()[-3:]
  return int(temp), int(growth), int(ready)


def _inline_probe(arm: str, tries: int = 2) -> tuple[int, int, int]:
  """`_dispatch_probe(arm)` until the heap grew by at most two blocks, at most `tries`
  runs; the last (temp, growth, ready)."""
  for _ in range(tries):
    temp, growth, ready = _dispatch_probe(arm)
    if growth <= 2 * temp:
      break
  return temp, growth, ready


@pytest.mark.skipif(not sys.platform.startswith("linux") or host_memory._libc() is None,
                    reason="glibc's mallopt and mallinfo2: Linux only")
def test_reuse_freed_memory_keeps_the_heap_flat_when_steps_are_dispatched_ahead():
  # Inline execution: every call has computed its result, and freed its temporaries,
  # when it returns, so over 8 queued steps the heap grows by few blocks (usually by
  # nothing; fragmentation leaves one block in one or two runs in ten, and now and then
  # two, as in a CI run of session 31: counts in NOTES.md). So an inline arm gets a
  # second probe when the first kept more than two blocks.
  temp, growth, ready = _inline_probe("inline")
  assert temp >= 32 * 2 ** 20, temp  # above glibc's mmap threshold: the case at hand
  assert ready == 8, ready
  assert growth <= 2 * temp, (temp, growth)
  # The same for python -m t5x.train: GLIBC_TUNABLES and jax's command-line flag.
  temp, growth, ready = _inline_probe("t5x_flags")
  assert ready == 8, ready
  assert growth <= 2 * temp, (temp, growth)
  # With asynchronous dispatch a call returns before its step has run, and a queued step
  # starts (and allocates) before the previous step's block is freed; with no mmap and no
  # trim the heap keeps the extra blocks (2 to 7 blocks in 10 runs, never fewer than 2).
  temp, growth, ready = _dispatch_probe("async")
  assert ready < 8, ready
  assert growth >= 2 * temp, (temp, growth)


def test_reuse_freed_memory_after_jax_started_leaves_the_defaults():
  import jax
  jax.devices()  # the backend is up: too late for the dispatch mode
  assert host_memory.reuse_freed_memory(enabled=True) is False
  assert host_memory.INLINE_DISPATCH_ARG == "--jax_cpu_enable_async_dispatch=false"


def test_reuse_freed_memory_disabled_is_a_no_op():
  assert host_memory.reuse_freed_memory(enabled=False) is False
  assert "mmap_max=0" in host_memory.GLIBC_TUNABLES


def test_reuse_freed_memory_gin_switch():
  import gin
  name = "host_memory.reuse_freed_memory.enabled"
  with gin.unlock_config():
    gin.bind_parameter(name, False)
  try:
    assert host_memory.reuse_freed_memory() is False  # the gin binding turns it off
  finally:
    with gin.unlock_config():
      gin.bind_parameter(name, None)  # the default: auto (step_runs_on_cpu)


def test_step_runs_on_cpu_reads_jax_platforms_and_accelerator_plugins(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_memory.step_runs_on_cpu() is True
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  assert host_memory.step_runs_on_cpu() is False
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert host_memory.step_runs_on_cpu() is False
  # Unset: an installed libtpu means the step runs on a TPU; the default then does nothing.
  monkeypatch.delenv("JAX_PLATFORMS")
  real_find_spec = host_memory.importlib.util.find_spec
  monkeypatch.setattr(host_memory.importlib.util, "find_spec",
                      lambda name, *a: object() if name == "libtpu" else real_find_spec(name, *a))
  assert host_memory.step_runs_on_cpu() is False
  assert host_memory.reuse_freed_memory() is False


@pytest.mark.parametrize("single_arena", [True, False])
def test_reuse_freed_memory_single_arena_switch(recorded_mallopt, single_arena):
  """The calls made: M_ARENA_MAX = 1 only with single_arena (the default)."""
  assert host_memory.reuse_freed_memory(enabled=True, single_arena=single_arena) is True
  expected = [(host_memory._M_MMAP_MAX, 0),
              (host_memory._M_TRIM_THRESHOLD, host_memory.NO_TRIM)]
  expected += [(host_memory._M_ARENA_MAX, 1)] if single_arena else []
  expected += [(host_memory.ASYNC_DISPATCH_FLAG, False)]
  assert sorted(recorded_mallopt, key=str) == sorted(expected, key=str)
