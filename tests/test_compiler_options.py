"""slic_jax.compiler_options: which XLA options the jitted steps get, and that they apply."""
import re

import jax
import jax.numpy as jnp
import numpy as np

from slic_jax import compiler_options


def test_defaults_per_platform_and_overrides():
  cpu = compiler_options.step_compiler_options("cpu")
  assert cpu == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
                 "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
                 "xla_cpu_enable_fast_min_max": True}
  assert compiler_options.step_compiler_options("gpu") is None
  assert compiler_options.step_compiler_options("tpu") is None
  # '' removes an option (XLA's default); other overrides are merged in.
  assert compiler_options.step_compiler_options(
      "cpu", {"xla_cpu_experimental_ynn_fusion_type": ""}) == {
          "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
          "xla_cpu_enable_fast_min_max": True}
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


def test_fast_min_max_keeps_nan_in_softmax_and_log_softmax_results():
  """With fast min/max a NaN may lose a max reduction, but the softmax, logsumexp and
  the SLiC-HF token log-probs built on it still come out NaN (the exp and sum carry it);
  elementwise maximum (the hinge's relu) keeps NaN; finite inputs give the same values."""
  if jax.default_backend() != "cpu":
    return
  from slic_jax import losses
  opts = compiler_options.step_compiler_options()
  assert opts["xla_cpu_enable_fast_min_max"] is True
  x = jnp.array([[jnp.nan, 1.0, -1.0, 0.5] * 16, [0.1, 2.0, -3.0, 0.25] * 16])
  targets = jnp.array([1, 2])

  def f(x):
    return (jax.nn.softmax(x), jax.nn.logsumexp(x, -1), jax.nn.relu(x),
            losses.token_log_probs(logits=x, targets=targets))

  fast = jax.jit(f, compiler_options=opts)(x)
  plain = jax.jit(f)(x)
  for a, b in zip(fast, plain):
    np.testing.assert_array_equal(np.isnan(np.asarray(a)), np.isnan(np.asarray(b)))
    np.testing.assert_allclose(np.asarray(a)[1], np.asarray(b)[1], rtol=1e-6)
  assert np.isnan(np.asarray(fast[3])[0]) and np.isnan(np.asarray(fast[1])[0])
