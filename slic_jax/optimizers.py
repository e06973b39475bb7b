"""optax optimizers and learning-rate schedules, configured from gin.

`create_optimizer()` returns one `optax.GradientTransformation` that the model
carries as ``optimizer_def`` (T5X's name for it):

    clip_by_global_norm(clip_norm) → adafactor | adamw (with schedule) .

With clipping, Adafactor runs as `clipped_adafactor`: the same transformation and state
as ``optax.chain(clip_by_global_norm, optax.adafactor)``, written as one update whose
reductions run as matrix-vector products on the CPU and whose norm comes from the
statistics' own sums (``implementation='fused'``, the default; ``'grouped'``: the arrays of
one shape stacked; ``'cpu_kernels'``: the gradient matrices' reductions as XLA:CPU kernels,
`adafactor_kernels`; ``'optax'`` builds the optax chain itself).

Schedules (``schedule=``), with ``s`` the step, ``w`` warm-up steps, ``lr`` the
base rate and ``T`` the total steps:
  constant:  lr · min(1, (s+1)/w)
  rsqrt:     lr · min(1, (s+1)/w) · sqrt(max(w, 1) / max(s+1, w))   (T5's inverse square root)
  cosine:    lr · min(1, (s+1)/w) · ½(1 + cos(π · min(s, T)/T))
"""
from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import optax
from optax._src import factorized

from slic_jax import adafactor_kernels, matmul


def learning_rate_schedule(
    *,
    learning_rate: float = 1e-3,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
) -> optax.Schedule:
  """Returns ``step -> learning rate`` (see the module docstring for the equations)."""
  warmup = max(int(warmup_steps), 0)

  def fn(step):
    s = jnp.asarray(step, jnp.float32) + 1.0
    ramp = jnp.minimum(1.0, s / warmup) if warmup else 1.0
    if schedule == "constant":
      decay = 1.0
    elif schedule == "rsqrt":
      decay = jnp.sqrt(max(warmup, 1) / jnp.maximum(s, max(warmup, 1)))
    elif schedule == "cosine":
      if not total_steps:
        raise ValueError("schedule='cosine' needs total_steps")
      frac = jnp.minimum(s - 1.0, total_steps) / total_steps
      decay = 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    else:
      raise ValueError(f"unknown schedule {schedule!r}; expected constant, rsqrt or cosine")
    return learning_rate * ramp * decay

  return fn


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """``g ← g · min(1, max_norm / ‖g‖₂)``, ‖g‖₂ the norm over all leaves (gradient clipping).

  The same transformation and state (`optax.EmptyState`) as `optax.clip_by_global_norm`,
  written as one multiply by a scalar instead of optax's per-leaf ``select(trigger, g,
  g / ‖g‖ · max_norm)``: XLA then fuses the scale into the optimizer's own passes over
  the gradients instead of first writing a clipped copy of every gradient.
  """

  def update_fn(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def clipped_adafactor(
    learning_rate: optax.ScalarOrSchedule,
    *,
    clip_norm: float = 1.0,
    decay_rate: float = 0.8,
    clipping_threshold: float = 1.0,
    weight_decay_rate: float | None = None,
    min_dim_size_to_factor: int = 128,
    eps: float = 1e-30,
    implementation: str = "fused",
) -> optax.GradientTransformation:
  """``optax.chain(clip_by_global_norm(clip_norm), optax.adafactor(...))`` as one update.

  Same state (its ``init`` is the chain's) and the same updates up to float32 rounding;
  no momentum, no parameter scaling (``multiply_by_parameter_scale=False``). With step
  ``t``, ``β = 1 − (t + 1)^−decay_rate``, for each gradient ``g`` (``n = ‖G‖₂`` over all
  gradients, ``s = min(1, clip_norm / n)``):

      ĝ = s · g
      factored [R, C] (both ≥ min_dim_size_to_factor; d0 the longer axis, d1 the other):
        r ← β r + (1 − β)(mean_{d0} ĝ² + ε),   c ← β c + (1 − β)(mean_{d1} ĝ² + ε)
        u = ĝ ⊙ (r / mean(r))^−½ ⊗ c^−½
      otherwise:  v ← β v + (1 − β)(ĝ² + ε),   u = ĝ ⊙ v^−½
      Δ = −(lr · u / max(1, rms(u) / clipping_threshold) + weight_decay_rate · p)

  How ``implementation='fused'`` (the default) computes it: every matrix's g² is written
  once, unscaled (ĝ² = s² g²), and its column sums Σ_r g² taken by one matrix-vector
  product (`matmul.sum_by_dot`); their totals, and Σ g² of the other arrays, give the
  norm, so no gradient is read for the norm alone. Then per factored matrix the statistic
  along axis 1 (from the column sums) gives its factor f1, and one product g² · [1, f1²]
  ([C, 2], `matmul.sums_by_dot`) the row sums (the other statistic, factor f0) and
  Σ_c g² f1² per row, whose f0²-weighted total is RC · mean(u²): u itself is never
  squared. Δ is one elementwise pass. On the CPU the update starts after the backward
  pass (an optimization barrier, `_after_backward`): started inside it, XLA:CPU's
  scheduler held more buffers at the step's peak (979 → 1181 MB in the bf16 step,
  `tools/step_peak_buffers.sh`, session 13). T5 1.1 small's update alone (77M
  parameters, `tools/profile_step.py --optimizer_only`, the Zen 4 VM, session 48): 75 and
  82 ms against 118 and 110 ms for the formulation before (the norm a sum of squares of
  each gradient, then ĝ² and three matrix-vector products per matrix), 47 and 51 ms for
  'cpu_kernels' (`benchmarks/optimizer_only_session48_amd.txt`);
  in the step 1.8% (float32) and 4.2% (bf16) faster (`benchmarks/NOTES.md`, session 48).

  ``implementation='grouped'`` (``create_optimizer(implementation='grouped')``) stacks the
  arrays of one shape and dtype (the 8 layers' copies of each kernel) and updates each
  stack at once (``jax.vmap`` of the per-array update: the norm a sum of squares per
  gradient, then ĝ² and three reductions per matrix), the gradient norm included: the
  same arithmetic per array in a few large ops instead of many small ones. On an H200
  the per-array update was 1550 of the bf16 step's 2546 kernels and 3.5 of its 19 ms of
  kernel time (T5 1.1 small, 32 pairs; `benchmarks/NOTES.md`, session 25). The stacks
  are copies: one more pass over the gradients, parameters and statistics.

  ``implementation='cpu_kernels'`` (XLA:CPU only) takes the reductions of each factored
  float32 [R, C] gradient from two CPU kernels (`adafactor_kernels`), each one read of g:
  its row and column sums of g² (unscaled: the statistics are s² times them, the norm
  their sum) and Σ g² f0² f1²; the update stays one elementwise pass. The other
  gradients are reduced as in 'grouped', one by one.
  """
  if implementation not in ("fused", "grouped", "cpu_kernels"):
    raise ValueError(f"clipped_adafactor: unknown implementation {implementation!r}; "
                     "expected 'fused', 'grouped' or 'cpu_kernels'")
  cpu_kernels = implementation == "cpu_kernels"
  group_same_shapes = implementation == "grouped"
  norm_from_sums = implementation == "fused"
  reference = optax.chain(
      clip_by_global_norm(clip_norm),
      optax.adafactor(learning_rate=learning_rate, decay_rate=decay_rate,
                      clipping_threshold=clipping_threshold,
                      weight_decay_rate=weight_decay_rate,
                      min_dim_size_to_factor=min_dim_size_to_factor, eps=eps,
                      multiply_by_parameter_scale=False))

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError("clipped_adafactor needs params (as optax.adafactor)")
    clip_state, inner = state
    fstate, lr_state = inner[0], inner[2]
    if cpu_kernels:
      _check_cpu()
      grads = _after_backward(grads)
    elif norm_from_sums:
      grads = _after_backward_on_cpu(grads)
    beta = factorized._decay_rate_pow(fstate.count, decay_rate)  # pylint: disable=protected-access
    if callable(learning_rate):
      lr = learning_rate(lr_state.count)
      lr_state = optax.ScaleByScheduleState(count=optax.safe_increment(lr_state.count))
    else:
      lr = learning_rate
    leaves, treedef = jax.tree.flatten(grads)
    columns = [leaves] + [treedef.flatten_up_to(t) for t in (
        params, fstate.v_row, fstate.v_col, fstate.v)]  # g, p, v_row, v_col, v
    # [(leaf indices, their g, p, v_row, v_col, v: stacked along a new axis 0 or one leaf's)]
    if group_same_shapes:
      groups = collections.defaultdict(list)
      for i, arrays in enumerate(zip(*columns)):
        groups[tuple((a.shape, a.dtype) for a in arrays)].append(i)
      parts = [(idx, [jnp.stack([c[i] for i in idx]) for c in columns])
               for idx in groups.values()]
    else:
      parts = [([i], [c[i] for c in columns]) for i in range(len(leaves))]
    # With cpu_kernels: {leaf index: (sums of g² over axis 0 [C], over axis 1 [R])}; the
    # same calls as the norm's below (`_square_sum`), which XLA computes once.
    sums = {idx[0]: adafactor_kernels.square_sums(arrays[0])[::-1]
            for idx, arrays in parts if cpu_kernels and _kernel_reduces(
                arrays[0], min_dim_size_to_factor)}
    # With norm_from_sums: {leaf index: (g² [R, C] f32, its sums over axis 0 [C])} of each
    # matrix, the same ops as `sums_global_norm`'s (XLA computes them once).
    squares = {idx[0]: _squares_and_sums0(arrays[0]) for idx, arrays in parts
               if norm_from_sums and arrays[0].ndim == 2}
    norm = (_norm_from_sums([squares.get(idx[0], arrays[0]) for idx, arrays in parts])
            if norm_from_sums else
            jnp.sqrt(sum(_square_sum(arrays[0], cpu_kernels) for _, arrays in parts)))
    scale = jnp.where(norm < clip_norm, 1.0, clip_norm / norm)

    def factors(v_row, v_col, d0):
      """(f0 [R], f1 [C]): the factors along axis 0 and axis 1 of an [R, C] matrix whose
      statistic v_row runs along axis 1 − d0 and v_col along d0 (optax's layout):
      (v_row / mean(v_row))^−½ and v_col^−½."""
      row_factor = (v_row / jnp.mean(v_row)) ** -0.5
      col_factor = v_col ** -0.5
      return (row_factor, col_factor) if d0 == 1 else (col_factor, row_factor)

    def factored_update(g, p, f0, f1, mean_u2, g_scale):
      """Δ of a factored [R, C] matrix from its factors along axis 0 (f0 [R]) and axis 1
      (f1 [C]) and mean(u²) of u = ĝ ⊙ f0 ⊗ f1, where ĝ = g_scale · g:
      −lr · u / max(1, sqrt(mean(u²)) / clipping_threshold) − weight_decay_rate · p."""
      k = -lr / jnp.maximum(1.0, jnp.sqrt(mean_u2) / clipping_threshold)
      update = g.astype(jnp.float32) * (f0 * (k * g_scale))[:, None] * f1[None, :]
      if weight_decay_rate:
        update = update - weight_decay_rate * p
      return update.astype(p.dtype)

    def one(g, p, v_row, v_col, v, g_sums=None, g_squares=None):
      dims = factorized._factored_dims(g.shape, True, min_dim_size_to_factor)  # pylint: disable=protected-access
      if g_squares is not None:  # g² (unscaled) and its sums over axis 0: ĝ² = s² g²
        g2, sums0 = g_squares
        d1, d0 = dims
        s2 = scale * scale
        # The statistic along axis 1 (the means over axis 0), its factor f1; then one
        # product g² · [1, f1²] gives the means over axis 1 and Σ_c g² f1² per row.
        stat1 = beta * (v_row if d0 == 0 else v_col) + (1 - beta) * (
            sums0 * s2 / g.shape[0] + eps)
        f1 = (stat1 / jnp.mean(stat1)) ** -0.5 if d0 == 0 else stat1 ** -0.5
        rows, weighted = matmul.sums_by_dot(g2, jnp.stack([jnp.ones_like(f1), f1 * f1], 1))
        stat0 = beta * (v_col if d0 == 0 else v_row) + (1 - beta) * (
            rows * s2 / g.shape[1] + eps)
        f0 = stat0 ** -0.5 if d0 == 0 else (stat0 / jnp.mean(stat0)) ** -0.5
        v_row, v_col = (stat1, stat0) if d0 == 0 else (stat0, stat1)
        mean_u2 = jnp.dot(weighted, f0 * f0, precision=jax.lax.Precision.HIGHEST) * s2 / g.size
        return (factored_update(g, p, f0, f1, mean_u2, scale),
                v_row.astype(p.dtype), v_col.astype(p.dtype), v)
      if g_sums is not None:  # the kernels' sums of the unscaled g²: ĝ² = s² g²
        d1, d0 = dims
        s2 = scale * scale
        v_row = (beta * v_row + (1 - beta) * (g_sums[d0] * s2 / g.shape[d0] + eps)).astype(p.dtype)
        v_col = (beta * v_col + (1 - beta) * (g_sums[d1] * s2 / g.shape[d1] + eps)).astype(p.dtype)
        f0, f1 = factors(v_row, v_col, d0)
        mean_u2 = adafactor_kernels.weighted_square_sum(g, f0 * f0, f1 * f1) * s2 / g.size
        return factored_update(g, p, f0, f1, mean_u2, scale), v_row, v_col, v
      g = g * scale.astype(g.dtype)
      if dims is not None and g.ndim == 2:
        d1, d0 = dims
        g2 = g * g
        mean_d0 = matmul.sum_by_dot(g2, d0) / g.shape[d0]
        mean_d1 = matmul.sum_by_dot(g2, d1) / g.shape[d1]
        v_row = (beta * v_row + (1 - beta) * (mean_d0 + eps)).astype(p.dtype)  # along d1
        v_col = (beta * v_col + (1 - beta) * (mean_d1 + eps)).astype(p.dtype)  # along d0
        f0, f1 = factors(v_row, v_col, d0)
        mean_u2 = jnp.dot(matmul.sum_by_dot(g2, 1, weights=f1 * f1), f0 * f0,
                          precision=jax.lax.Precision.HIGHEST) / g.size
        return factored_update(g, p, f0, f1, mean_u2, 1.0), v_row, v_col, v
      if dims is not None:  # factored, more than 2 axes: optax's own formulation
        d1, d0 = dims
        g2 = g * g + eps
        v_row = (beta * v_row + (1 - beta) * jnp.mean(g2, axis=d0)).astype(p.dtype)
        v_col = (beta * v_col + (1 - beta) * jnp.mean(g2, axis=d1)).astype(p.dtype)
        row_factor = (v_row / jnp.mean(v_row, axis=d1 - 1 if d1 > d0 else d1,
                                        keepdims=True)) ** -0.5
        u = g * jnp.expand_dims(row_factor, d0) * jnp.expand_dims(v_col ** -0.5, d1)
        update = u * (-lr / jnp.maximum(1.0, jnp.sqrt(jnp.mean(u * u)) / clipping_threshold))
      else:
        v = (beta * v + (1 - beta) * (g * g + eps)).astype(p.dtype)
        u = g * v ** -0.5
        update = u * (-lr / jnp.maximum(1.0, jnp.sqrt(jnp.mean(u * u)) / clipping_threshold))
      if weight_decay_rate:
        update = update - weight_decay_rate * p
      return update.astype(p.dtype), v_row, v_col, v

    out = [None] * len(leaves)
    for idx, arrays in parts:
      if group_same_shapes:
        stacked = jax.vmap(one)(*arrays)
        for j, i in enumerate(idx):
          out[i] = tuple(x[j] for x in stacked)
      else:
        factored = _factored_matrix(arrays[0], min_dim_size_to_factor)
        out[idx[0]] = one(*arrays, g_sums=sums.get(idx[0]),
                          g_squares=squares.get(idx[0]) if factored else None)
    unflat = lambda i: treedef.unflatten([o[i] for o in out])
    fstate = factorized.FactoredState(count=optax.safe_increment(fstate.count),
                                      v_row=unflat(1), v_col=unflat(2), v=unflat(3))
    inner = (fstate, inner[1], lr_state) + tuple(inner[3:])
    return unflat(0), (clip_state, inner)

  if cpu_kernels:
    return KernelNormTransformation(reference.init, update_fn)
  if norm_from_sums:
    return SumsNormTransformation(reference.init, update_fn)
  return optax.GradientTransformation(reference.init, update_fn)


class KernelNormTransformation(optax.GradientTransformation):
  """An optax transformation whose update takes the gradients' global norm from the CPU
  kernels (`kernel_global_norm`); its ``global_norm`` is that norm, which the update step
  reports as ``grad_norm`` (`update_step.make_train_step`), so that XLA computes it once."""
  __slots__ = ()

  def global_norm(self, grads) -> jax.Array:
    return kernel_global_norm(_after_backward(grads))


class SumsNormTransformation(optax.GradientTransformation):
  """An optax transformation whose update takes the gradients' global norm from each
  matrix's column sums of g² (`sums_global_norm`); its ``global_norm`` is that norm, which
  the update step reports as ``grad_norm``: the same ops, which XLA computes once."""
  __slots__ = ()

  def global_norm(self, grads) -> jax.Array:
    return sums_global_norm(_after_backward_on_cpu(grads))


def sums_global_norm(tree) -> jax.Array:
  """‖tree‖₂ = sqrt(Σ_leaves Σ x²), a matrix's Σ x² the sum of its column sums of x² (a
  dot on the CPU, `matmul.sum_by_dot`), the other leaves' a plain sum."""
  return _norm_from_sums([_squares_and_sums0(x) if x.ndim == 2 else x
                          for x in jax.tree.leaves(tree)])


def _norm_from_sums(items) -> jax.Array:
  """sqrt(Σ): of each (g², its sums over axis 0) pair the sums' total, of an array Σ x²."""
  return jnp.sqrt(sum(jnp.sum(x[1]) if isinstance(x, tuple) else _square_sum(x, False)
                      for x in items))


def _after_backward(grads):
  """The gradients behind an optimization barrier: the kernels start once the backward
  pass is done. Started inside it (as soon as their gradient was ready) they ran beside
  its matmuls, and the step was no faster (benchmarks/NOTES.md, session 42). The update
  and `KernelNormTransformation.global_norm` put the same barrier on the same gradients,
  which XLA computes once, and so the same kernel calls."""
  return jax.lax.optimization_barrier(grads)


def _after_backward_on_cpu(grads):
  """`_after_backward` where the program runs on XLA:CPU (whose scheduler otherwise starts
  the update's reductions inside the backward pass); the gradients as they are elsewhere."""
  return _after_backward(grads) if jax.default_backend() == "cpu" else grads


def kernel_global_norm(tree) -> jax.Array:
  """‖tree‖₂ = sqrt(Σ_leaves Σ x²), each float32 matrix's Σ x² the sum of its row sums
  of squares from `adafactor_kernels.square_sums` (XLA:CPU), the other leaves' XLA's."""
  return jnp.sqrt(sum(_square_sum(x, True) for x in jax.tree.leaves(tree)))


def _square_sum(x, cpu_kernels: bool) -> jax.Array:
  """Σ x² in float32; with cpu_kernels a float32 matrix's from its kernel row sums."""
  if cpu_kernels and x.ndim == 2 and x.dtype == jnp.float32:
    return jnp.sum(adafactor_kernels.square_sums(x)[0])
  return jnp.sum(jnp.square(x.astype(jnp.float32)))


def _squares_and_sums0(g):
  """(g² [R, C] float32, Σ_r g²[r, :] [C]): the squares written once, summed by a dot."""
  g2 = jnp.square(g.astype(jnp.float32))
  return g2, matmul.sum_by_dot(g2, 0)


def _factored_matrix(g, min_dim_size_to_factor: int) -> bool:
  """Whether Adafactor factors g's second moment and g is a matrix."""
  return g.ndim == 2 and factorized._factored_dims(  # pylint: disable=protected-access
      g.shape, True, min_dim_size_to_factor) is not None


def _check_cpu():
  if jax.default_backend() != "cpu":
    raise ValueError(f"create_optimizer(implementation='cpu_kernels') runs its reductions as "
                     f"XLA:CPU kernels; this program's backend is {jax.default_backend()!r}: "
                     f"use implementation='fused'")


def _kernel_reduces(g, min_dim_size_to_factor: int) -> bool:
  """Whether `clipped_adafactor(implementation='cpu_kernels')` reduces g with the CPU
  kernels: a factored float32 matrix."""
  return g.dtype == jnp.float32 and _factored_matrix(g, min_dim_size_to_factor)


def create_optimizer(
    *,
    name: str = "adafactor",
    learning_rate: optax.ScalarOrSchedule | None = None,
    clip_norm: float | None = 1.0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    decay_rate: float = 0.8,
    multiply_by_parameter_scale: bool = False,
    implementation: str = "fused",
) -> optax.GradientTransformation:
  """The training optimizer.

  Args:
    name: 'adafactor' (T5's default; factored second moments, decay_rate 0.8) or
      'adamw'.
    learning_rate: a float or schedule; default `learning_rate_schedule()` from gin.
    clip_norm: global-norm gradient clipping threshold (None: off).
    weight_decay: decoupled weight decay (AdamW's λ; Adafactor's decay_rate-independent
      weight decay).
    b1, b2, eps: AdamW moments.
    decay_rate, multiply_by_parameter_scale: Adafactor settings. T5X fine-tuning
      uses a constant 1e-3 step without parameter scaling; that is the default.
    implementation: Adafactor with clipping and without parameter scaling as
      `clipped_adafactor` ('fused'; 'grouped': the same with the arrays of one shape
      updated together; 'cpu_kernels': the same with the factored gradients' reductions
      as XLA:CPU kernels, CPU only) or as the optax chain ('optax'); same state, same
      updates up to float32 rounding.
  """
  if implementation not in ("fused", "grouped", "cpu_kernels", "optax"):
    raise ValueError(f"unknown implementation {implementation!r}; expected 'fused', "
                     "'grouped', 'cpu_kernels' or 'optax'")
  lr = learning_rate if learning_rate is not None else learning_rate_schedule()
  fused = name == "adafactor" and clip_norm and not multiply_by_parameter_scale
  if implementation == "cpu_kernels" and not fused:
    raise ValueError(
        "create_optimizer(implementation='cpu_kernels') is Adafactor with clipping and "
        f"without parameter scaling; got name={name!r}, clip_norm={clip_norm!r}, "
        f"multiply_by_parameter_scale={multiply_by_parameter_scale!r}")
  if fused and implementation != "optax":
    return clipped_adafactor(lr, clip_norm=clip_norm, decay_rate=decay_rate,
                             clipping_threshold=1.0, weight_decay_rate=weight_decay or None,
                             implementation=implementation)
  if name == "adafactor":
    opt = optax.adafactor(
        learning_rate=lr,
        decay_rate=decay_rate,
        multiply_by_parameter_scale=multiply_by_parameter_scale,
        clipping_threshold=1.0,
        weight_decay_rate=weight_decay or None,
    )
  elif name == "adamw":
    opt = optax.adamw(learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  else:
    raise ValueError(f"unknown optimizer {name!r}; expected 'adafactor' or 'adamw'")
  if clip_norm:
    opt = optax.chain(clip_by_global_norm(clip_norm), opt)
  return opt
