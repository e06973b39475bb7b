"""XLA compiler options for slic_jax's jitted update and eval steps, per backend.

They go to ``jax.jit(..., compiler_options=...)``, so they apply to these steps only
(no process-wide ``XLA_FLAGS``) and are overridable from gin:
``--gin.compiler_options.step_compiler_options.overrides="{...}"`` (an empty dict
value, e.g. ``{'xla_cpu_experimental_ynn_fusion_type': ''}``, leaves XLA's default).

CPU defaults:

* YNNPACK for individual dots only
  (``xla_cpu_experimental_ynn_fusion_type = LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT``).
  XLA 0.10's default also routes reductions through YNNPACK fusions; in the SLiC-HF
  step these include the batch/layer sums of the relative-position-bias gradient
  (8 × [B, H, Li, Li] → [H, Li, Li]: 260 ms in one profiled 3.38 s step,
  ``tools/profile_step.py --reg_target chosen --xla_default``), the optimizer's statistics
  and the gradient norm. With these options the same profile gives 3.11 s, its other
  (non-matmul) ops 1282 instead of 1867 ms. YNNPACK takes only the dots whose operands
  are already in its [M, K] × [K, N] layout; the others go to XLA's Eigen path. Eigen
  for all dots (``LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION``: no dot in YNNPACK) was
  slower in the float32 step: median step 3.16 against 2.93 s over 8 alternating
  processes each, 70 MB more peak RSS (`benchmarks/NOTES.md`, session 23).
* the memory-optimized scheduler (``xla_cpu_scheduler_type =
  CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED``).
* fast min/max (``xla_cpu_enable_fast_min_max = True``): max/min reductions skip the
  NaN checks. The step's max reductions are the shifts of its softmaxes and log-softmaxes
  (over the keys and the 32k vocabulary); with the option the bf16 step's reduce-window
  ops took 193 instead of 255 ms (one profiled step, `tools/profile_step.py --size small
  --dtype bfloat16 --logits_dtype bfloat16 [--xla_option
  xla_cpu_enable_fast_min_max=True]`; `benchmarks/NOTES.md`, session 14). A NaN then may not win a
  max, but it still reaches the loss through the exp and the sums that follow
  (`tests/test_compiler_options.py`); elementwise ``jnp.maximum`` keeps propagating NaN.

``tools/benchmark.py --levers`` times the step with and without these options (lever
``xla_default``): T5 1.1 small, 4 pairs, Li 512 / Lt 64, 3 rows: XLA temporaries 2244 →
1691 MB, peak RSS 3597 → 3055 MB, step time the same within noise (3.90 vs 3.97 s;
`benchmarks/results_full_run.md`). Other backends get no options.
"""
from __future__ import annotations

from typing import Any, Mapping

import gin

from slic_jax import platforms

CPU_OPTIONS: Mapping[str, Any] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    "xla_cpu_enable_fast_min_max": True,
}


@gin.configurable(module="compiler_options")
def step_compiler_options(
    platform: str | None = None, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
  """Options for ``jax.jit(compiler_options=...)`` on ``platform`` (default: the platform
  the step is traced for, `platforms.target_platform`).

  Returns None when there is nothing to set. ``overrides`` are merged over the
  defaults; an override whose value is '' removes that option (XLA's default).
  """
  platform = platform or platforms.target_platform()
  options = dict(CPU_OPTIONS) if platform == "cpu" else {}
  options.update(overrides or {})
  options = {k: v for k, v in options.items() if v != ""}
  return options or None
