"""Which platform a step is traced for: the code paths that differ between CPU, GPU and TPU
(`slic_jax.matmul`'s layouts, the attention kernels, the compiler options) ask here.

`target_platform()` is the platform of the devices of the mesh in context (`jax.set_mesh`,
which `partitioning.Partitioner.activation_rules` enters), else jax's default backend. The
two differ when a step is compiled ahead of time for devices the process does not run on:
`tools/mesh_step_cost.py --topology v5e:2x4` traces the step on a CPU host for a TPU slice,
which must get the TPU's code paths, not the host's.

`cpu_low_precision_dots()` says whether the CPU's bf16 × bf16 → float32 dots run as
written or with their operands widened to float32 (a CPU without a bf16 dot instruction).
"""
from __future__ import annotations

import functools
import os

import jax


def target_platform() -> str:
  """'cpu', 'gpu', 'tpu', …: the platform of the mesh in context, else jax's default backend.

  Works inside and outside `jax.jit` tracing (`jax.sharding.get_abstract_mesh`). Under
  T5X's legacy ``with Mesh(...)`` context, which sets no abstract mesh, it is the default
  backend: the platform T5X runs the step on.
  """
  device = jax.sharding.get_abstract_mesh().abstract_device
  return device.platform if device is not None else jax.default_backend()


# Mode names of `cpu_low_precision_dots` and the environment variable that overrides it.
LOW_PRECISION_DOTS_ENV = "SLIC_JAX_CPU_LOW_PRECISION_DOTS"
_LOW_PRECISION_DOTS_MODES = ("auto", "native", "float32")
# CPU flags (x86 /proc/cpuinfo "flags", Arm "Features") of a native bfloat16 dot product.
_NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool | None:
  """Whether the host CPU has a bfloat16 dot-product instruction; None if unknown.

  Reads the first ``flags`` (x86) or ``Features`` (Arm) line of ``cpuinfo`` (default:
  ``/proc/cpuinfo``): AVX512_BF16 or AMX-BF16 on x86, BF16 on Arm. None where that file is
  missing (not Linux) or has no such line.
  """
  if cpuinfo is None:
    try:
      with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    except OSError:
      return None
  for line in cpuinfo.splitlines():
    key, _, value = line.partition(":")
    if key.strip().lower() in ("flags", "features"):
      return bool(_NATIVE_BF16_FLAGS & set(value.split()))
  return None


def cpu_low_precision_dots() -> str:
  """How a bfloat16/float16 × same → float32 dot runs when traced for the CPU.

  'native': as it is written, bf16 operands (XLA:CPU gives it to YNNPACK, which runs it on
  AVX512_BF16 / AMX-BF16 at up to several times its float32 rate). 'float32': the rounded
  operands of a dot with enough FLOPs per operand element (`matmul._widens`) are widened
  to float32 first and the dot is a float32 one, the same products (a bf16 or f16 product
  is exact in float32) summed in float32: on a CPU without a bf16 dot instruction
  XLA:CPU's mixed dot runs at 60–75% of its float32 rate (`tools/benchmark.py`'s matmul
  peaks; `benchmarks/NOTES.md`, session 38); the other dots stay mixed.

  ``$SLIC_JAX_CPU_LOW_PRECISION_DOTS`` = 'native' | 'float32' | 'auto' (default) decides;
  'auto' is 'native' where `cpu_has_native_bf16` says yes or cannot tell, else 'float32'.
  Read when a step is traced (set it before the first one: JAX keeps traces in its
  caches, `jax.clear_caches()` drops them); only the CPU's code path asks
  (`slic_jax.matmul`). float16 follows the bf16 flags.
  """
  mode = os.environ.get(LOW_PRECISION_DOTS_ENV, "auto").strip().lower() or "auto"
  if mode not in _LOW_PRECISION_DOTS_MODES:
    raise ValueError(f"${LOW_PRECISION_DOTS_ENV}={mode!r}: expected one of "
                     f"{', '.join(_LOW_PRECISION_DOTS_MODES)}")
  if mode == "auto":
    mode = "float32" if _host_has_native_bf16() is False else "native"
  return mode


@functools.lru_cache(maxsize=1)
def _host_has_native_bf16() -> bool | None:
  return cpu_has_native_bf16()
