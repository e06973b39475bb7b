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


X86_FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni {extra}\n"


@pytest.mark.parametrize("cpuinfo,native", [
    (X86_FLAGS.format(extra="avx512_bf16"), True),                # Zen 4, Cooper Lake
    (X86_FLAGS.format(extra="amx_bf16 amx_tile"), True),          # Sapphire Rapids
    (X86_FLAGS.format(extra="avx512_vbmi2"), False),              # Ice Lake, or AMX hidden
    ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),  # Arm Neoverse V1
    ("processor\t: 0\nFeatures\t: fp asimd\n", False),
    ("processor\t: 0\nmodel name\t: ?\n", None),                  # no flags line
])
def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo, native):
  assert platforms.cpu_has_native_bf16(cpuinfo) is native


@pytest.mark.parametrize("env,host,mode", [
    ("native", False, "native"), ("float32", True, "float32"),   # the variable decides
    (None, False, "float32"), ("auto", True, "native"),          # auto: the host's flags
    ("", None, "native"),                                        # unknown: as written
])
def test_low_precision_dots_follow_the_environment_then_the_host(monkeypatch, env, host, mode):
  if env is None:
    monkeypatch.delenv(platforms.LOW_PRECISION_DOTS_ENV, raising=False)
  else:
    monkeypatch.setenv(platforms.LOW_PRECISION_DOTS_ENV, env)
  monkeypatch.setattr(platforms, "_host_has_native_bf16", lambda: host)
  assert platforms.cpu_low_precision_dots() == mode


def test_a_bad_low_precision_dots_setting_is_named(monkeypatch):
  monkeypatch.setenv(platforms.LOW_PRECISION_DOTS_ENV, "bf16")
  with pytest.raises(ValueError, match=r"SLIC_JAX_CPU_LOW_PRECISION_DOTS='bf16'.*auto, native"):
    platforms.cpu_low_precision_dots()


def test_dots_traced_for_a_tpu_are_never_widened(low_precision_dots):
  """The widening is the CPU's: a step traced for a TPU keeps its bf16 dots (the CPU
  widens this small dot too with the threshold 0)."""
  low_precision_dots("float32", widen_min=0)
  a = jnp.ones((4, 8), jnp.bfloat16)
  b = jnp.ones((8, 2), jnp.bfloat16)

  def dot_operand_dtypes(fn):
    jaxpr = jax.make_jaxpr(fn)(a, b).jaxpr
    return [[str(v.aval.dtype) for v in e.invars] for e in jaxpr.eqns
            if e.primitive.name == "dot_general"]

  fn = lambda a, b: matmul.accumulate("mk,kn->mn", a, b)
  assert dot_operand_dtypes(fn) == [["float32", "float32"]]
  with _tpu_mesh():
    assert dot_operand_dtypes(fn) == [["bfloat16", "bfloat16"]]
