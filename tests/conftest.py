"""Test-wide setup: 8 fake CPU devices for sharding tests, quiet TensorFlow.

XLA reads XLA_FLAGS once, when jax first initialises its backends, so this must run
before any test module imports jax.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


import pytest  # noqa: E402  (after the environment above)


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
