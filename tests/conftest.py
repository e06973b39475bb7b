"""Test-wide setup: 8 fake CPU devices for sharding tests, quiet TensorFlow, faster
compiles (LLVM at -O0, one persistent XLA compilation cache for the test session).

XLA reads XLA_FLAGS once, when jax first initialises its backends, and jax reads the
JAX_* variables when it is imported, so this must run before any test module imports jax.

Most of the suite's time is XLA compiling small programs. LLVM at -O0
(`--xla_backend_optimization_level=0`) compiles them faster (the whole suite on this
project's 2-core VM: 719 s -> 523 s; `benchmarks/NOTES.md`, session 17). It does not
change what is computed: the HLO (fusion, layouts, buffer assignment) is XLA's own and
the same, and with XLA:CPU's default `xla_cpu_enable_fast_math=false` LLVM may not
reassociate float arithmetic at any level. What it changes is the speed of the machine
code, which no test measures; the tests that measure a real step's memory in a
subprocess (`test_host_memory`) take the flag off there. `TEST_XLA_FLAGS` below is what
is added.

The compilation cache: many tests compile the same program again (the one-device step
that several mesh tests compare against, a trainer run and its resume). jax's persistent
cache (keyed by the program, the compile options and the jax version) serves the repeats.
The directory is made once per test session, before pytest-xdist starts its workers, so
they share it (they inherit this environment), and removed when the session ends; set
JAX_COMPILATION_CACHE_DIR yourself to keep one instead.
"""
import os
import shutil
import tempfile

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 " + TEST_XLA_FLAGS)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="slic_jax_tests_xla_cache_")
  os.environ["SLIC_JAX_TESTS_OWN_XLA_CACHE"] = "1"  # made here: removed at the end
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


import pytest  # noqa: E402  (after the environment above)


def pytest_unconfigure(config):
  """The session's own cache goes with it (in the xdist controller, after the workers)."""
  if not hasattr(config, "workerinput") and os.environ.get("SLIC_JAX_TESTS_OWN_XLA_CACHE"):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture
def recorded_mallopt(monkeypatch):
  """`host_memory` as if jax had not started: its glibc and jax-config calls are recorded
  (not made) in the returned list, as ``(param, value)`` and ``(flag, value)`` tuples."""
  import jax
  from jax._src import xla_bridge
  from slic_jax import host_memory
  calls = []

  class FakeLibc:
    malloc_trim = None

    def mallopt(self, param, value):
      calls.append((param, value))
      return 1

  monkeypatch.setattr(host_memory, "_libc", lambda: FakeLibc())
  monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
  monkeypatch.setattr(jax.config, "update", lambda *a: calls.append(a))
  return calls


@pytest.fixture
def low_precision_dots():
  """Sets how bf16 dots traced for the CPU run (`platforms.cpu_low_precision_dots`):
  ``low_precision_dots('native' | 'float32', widen_min=None)``; ``widen_min`` replaces
  `matmul.WIDEN_MIN_FLOPS_PER_ELEMENT` (0: every bf16 dot widened in 'float32' mode).
  Both are read when a function is traced and JAX keeps traces in its caches, so they
  are cleared on each change and when the test ends (with the environment and the
  threshold restored)."""
  import jax
  from slic_jax import matmul, platforms
  name = platforms.LOW_PRECISION_DOTS_ENV
  before = os.environ.get(name)
  threshold = matmul.WIDEN_MIN_FLOPS_PER_ELEMENT

  def set_mode(mode: str, widen_min: float | None = None):
    os.environ[name] = mode
    matmul.WIDEN_MIN_FLOPS_PER_ELEMENT = threshold if widen_min is None else widen_min
    jax.clear_caches()

  yield set_mode
  if before is None:
    os.environ.pop(name, None)
  else:
    os.environ[name] = before
  matmul.WIDEN_MIN_FLOPS_PER_ELEMENT = threshold
  jax.clear_caches()
