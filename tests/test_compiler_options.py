"""slic_jax.compiler_options: which XLA options the jitted steps get, and that they apply."""
import re

import jax
import jax.numpy as jnp
import numpy as np

from slic_jax import compiler_options


def test_defaults_per_platform_and_overrides():
  cpu = compiler_options.step_compiler_options("cpu")
  assert cpu == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
                 "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
  assert compiler_options.step_compiler_options("gpu") is None
  assert compiler_options.step_compiler_options("tpu") is None
  # '' removes an option (XLA's default); other overrides are merged in.
  assert compiler_options.step_compiler_options(
      "cpu", {"xla_cpu_experimental_ynn_fusion_type": ""}) == {
          "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
  assert compiler_options.step_compiler_options(
      "cpu", {k: "" for k in compiler_options.CPU_OPTIONS}) is None
  assert compiler_options.step_compiler_options("gpu", {"xla_gpu_foo": True}) == {
      "xla_gpu_foo": True}


def _ynn_fusions(compiled) -> int:
  return len(re.findall(r"__ynn_fusion", compiled.as_text()))


def test_cpu_option_takes_reductions_out_of_ynnpack_with_the_same_result():
  """The option reaches XLA: the reduction of a gradient-like sum is no YNN fusion."""
  if jax.default_backend() != "cpu":
    return
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 64, 64))
  f = lambda x: jnp.sum(x * x, axis=0)  # the relative-position-bias gradient's shape of sum
  default = jax.jit(f).lower(x).compile()
  ours = jax.jit(f, compiler_options=compiler_options.step_compiler_options()).lower(x).compile()
  assert _ynn_fusions(default) >= 1
  assert _ynn_fusions(ours) == 0
  np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(default(x)), rtol=1e-6)
