"""Which platform a step is traced for: the code paths that differ between CPU, GPU and TPU
(`slic_jax.matmul`'s layouts, the attention kernels, the compiler options) ask here.

`target_platform()` is the platform of the devices of the mesh in context (`jax.set_mesh`,
which `partitioning.Partitioner.activation_rules` enters), else jax's default backend. The
two differ when a step is compiled ahead of time for devices the process does not run on:
`tools/mesh_step_cost.py --topology v5e:2x4` traces the step on a CPU host for a TPU slice,
which must get the TPU's code paths, not the host's.
"""
from __future__ import annotations

import jax


def target_platform() -> str:
  """'cpu', 'gpu', 'tpu', …: the platform of the mesh in context, else jax's default backend.

  Works inside and outside `jax.jit` tracing (`jax.sharding.get_abstract_mesh`). Under
  T5X's legacy ``with Mesh(...)`` context, which sets no abstract mesh, it is the default
  backend: the platform T5X runs the step on.
  """
  device = jax.sharding.get_abstract_mesh().abstract_device
  return device.platform if device is not None else jax.default_backend()
