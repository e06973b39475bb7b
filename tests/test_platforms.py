"""platforms.target_platform: the platform a step is traced for decides its code paths.

A step compiled ahead of time for a TPU slice on a CPU host (`tools/mesh_step_cost.py
--topology`) is traced under a mesh of TPU devices while jax's default backend is the
CPU; the abstract mesh below (a TPU device kind, no TPU needed) stands for it.
"""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, Mesh

from slic_jax import compiler_options
from slic_jax import matmul
from slic_jax import platforms


def _tpu_mesh():
  return jax.sharding.use_abstract_mesh(AbstractMesh(
      (1, 1), ("data", "model"), abstract_device=AbstractDevice("TPU v5 lite", 1, "tpu")))


def _primitives(fn, *args) -> set[str]:
  """Names of every primitive in fn's jaxpr, nested jaxprs (custom VJPs, conds) included."""
  names = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      names.add(eqn.primitive.name)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return names


@pytest.mark.filterwarnings("ignore:.*context manager has been deprecated")
def test_the_mesh_in_context_decides_else_the_default_backend():
  assert platforms.target_platform() == jax.default_backend() == "cpu"
  seen = []
  with _tpu_mesh():
    assert platforms.target_platform() == "tpu"
    jax.make_jaxpr(lambda x: seen.append(platforms.target_platform()) or x)(1.0)
  assert seen == ["tpu"]  # inside tracing too
  one = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
  with jax.set_mesh(one):
    assert platforms.target_platform() == "cpu"
  with one:  # T5X's legacy context sets no abstract mesh: the default backend
    assert platforms.target_platform() == "cpu"


def test_compiler_options_are_the_target_platforms():
  assert compiler_options.step_compiler_options()["xla_cpu_scheduler_type"]
  with _tpu_mesh():
    assert compiler_options.step_compiler_options() is None
  assert compiler_options.step_compiler_options(platform="gpu") is None


def test_a_step_traced_for_a_tpu_takes_no_cpu_layouts():
  """The CPU's gradient layouts put a transpose behind a `lax.cond` (`matmul._opaque`);
  traced for a TPU the bf16 matmul and its gradients are plain einsums, the same values."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)

  def loss(x, w):
    y = matmul.einsum("nd,df->nf", x, w, dtype=jnp.bfloat16, out_dtype=jnp.float32)
    return jnp.sum(y ** 2)

  grad = jax.grad(loss, argnums=(0, 1))
  assert "cond" in _primitives(grad, x, w)
  with _tpu_mesh():
    assert "cond" not in _primitives(grad, x, w)
    # Traced for the TPU, run here: the same einsums, so the same gradients.
    tpu_dx, tpu_dw = jax.jit(grad)(x, w)
  dx, dw = jax.jit(grad)(x, w)
  np.testing.assert_allclose(np.asarray(tpu_dx), np.asarray(dx), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(tpu_dw), np.asarray(dw), rtol=1e-6)


def test_first_element_is_an_index_off_the_cpu():
  """On the CPU outside a mesh `first_element` flattens (the form the CPU step was tuned
  with); for a TPU it indexes, under any mesh context, so that the SPMD partitioner takes
  the element from its device (T5X's legacy context included: `tests/test_mesh_step_cost.py`)."""
  v = jnp.arange(24.0).reshape(2, 3, 4) + 5.0
  assert "reshape" in _primitives(matmul.first_element, v)
  with _tpu_mesh():
    assert "reshape" not in _primitives(matmul.first_element, v)
    assert float(jax.jit(matmul.first_element)(v)) == 5.0
