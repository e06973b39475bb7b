"""Pure loss functions for SFT and SLiC / SLiC-HF preference training.

Every function here is a pure function over arrays: no model, no gin, no flax modules.
All of them are keyword-only (``f(*, logits=..., targets=...)``) and ``jax.jit``-able
(Python-valued options such as ``length_normalize`` or ``direction`` must be static,
e.g. bound with ``functools.partial`` before ``jax.jit``).

Numerics: every log-softmax is taken in float32 -- logits are cast to float32 first,
whatever their dtype (bfloat16 log-softmax is a known source of NaNs in preference
trainers). All returned losses and metrics are float32.

Notation (METHODS.md): ``log P(y|x) = sum_t log p(y_t | y_<t, x)``, a SUM over target
tokens (the papers' choice); length normalisation is an option, off by default.

Conventions:
  * ``B`` batch, ``L`` target length, ``V`` vocabulary, ``m`` candidates per prompt.
  * ``mask`` arguments hold 1 for a real example / candidate and 0 for padding. A masked
    mean is ``sum(x * mask) / max(sum(mask), 1)``, so an all-padding batch gives 0, not NaN.
  * Scores / similarities are data, not functions of the parameters: they only ever pass
    through ``jax.lax.stop_gradient``.
  * Hinges use ``jax.nn.relu`` whose derivative at 0 is 0, so a pair sitting exactly on
    the margin contributes no gradient.
"""
from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp

from slic_jax import matmul

Array = jax.Array

__all__ = [
    "token_log_probs",
    "sequence_log_probs",
    "cross_entropy_loss",
    "rank_calibration_loss",
    "margin_calibration_loss",
    "list_rank_calibration_loss",
    "expected_reward_calibration_loss",
    "cross_entropy_regularizer",
    "token_kl_regularizer",
    "slic_loss",
    "slic_hf_loss",
    "preference_metrics",
    "masked_mean",
]


# ----------------------------------------------------------------------------- helpers


def _f32(x) -> Array:
  return jnp.asarray(x).astype(jnp.float32)


def masked_mean(*, values, mask=None) -> Array:
  """Mean of ``values`` over rows where ``mask`` is 1.

  Args:
    values: ``[...]`` any float array.
    mask: ``[...]`` same shape (or broadcastable), 1 = keep, 0 = drop; None = keep all.

  Returns:
    float32 scalar ``sum(values * mask) / max(sum(mask), 1)``. Dropped rows are removed
    with ``jnp.where``, so a NaN/inf in a padded row does not leak into the mean.
  """
  values = _f32(values)
  if mask is None:
    return jnp.mean(values) if values.size else jnp.zeros((), jnp.float32)
  mask = jnp.broadcast_to(_f32(mask), values.shape)
  total = jnp.sum(jnp.where(mask > 0, values * mask, 0.0))
  return total / jnp.maximum(jnp.sum(mask), 1.0)


# ------------------------------------------------------------------ token / sequence log-probs


def token_log_probs(*, logits, targets) -> Array:
  """Per-token log-probabilities of ``targets`` under ``logits``.

  Args:
    logits: ``[..., L, V]`` any float dtype (cast to float32 first).
    targets: ``[..., L]`` integer token ids in ``[0, V)``.

  Returns:
    ``[..., L]`` float32, ``out[..., t] = log_softmax(float32(logits[..., t, :]))[targets[..., t]]``
    ``= logits[..., t, y_t] − logsumexp(logits[..., t, :])``.

  Gradient (custom VJP): ``∂out_t/∂logits_t = onehot(y_t) − softmax(logits_t)``, computed
  in one elementwise pass from the logits and the saved ``logsumexp``: no ``[..., L, V]``
  log-softmax array is stored for the backward pass and no scatter builds the gradient.
  """
  targets = jnp.asarray(targets).astype(jnp.int32)
  return _target_log_softmax(_f32(logits), targets)


@jax.custom_vjp
def _target_log_softmax(logits: Array, targets: Array) -> Array:
  return _target_log_softmax_fwd(logits, targets)[0]


def _target_log_softmax_fwd(logits, targets):
  # logsumexp, its sum over the vocabulary as a dot with ones on the CPU (XLA:CPU runs a
  # 32k-long reduction as a tree of reduce-windows; `matmul.sum_by_dot`).
  m = jnp.max(logits, axis=-1)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  log_z = m + jnp.log(matmul.sum_by_dot(jnp.exp(logits - m[..., None]), -1))
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return target_logit - log_z, (logits, targets, log_z)


def _target_log_softmax_bwd(residuals, g):
  logits, targets, log_z = residuals
  onehot = targets[..., None] == jnp.arange(logits.shape[-1], dtype=targets.dtype)
  d_logits = g[..., None] * (onehot.astype(logits.dtype) - jnp.exp(logits - log_z[..., None]))
  return d_logits, None


_target_log_softmax.defvjp(_target_log_softmax_fwd, _target_log_softmax_bwd)


def sequence_log_probs(*, logits, targets, weights, length_normalize: bool = False) -> Array:
  """Sequence log-probability ``log P(y|x)`` from decoder logits.

  Args:
    logits: ``[..., L, V]`` any float dtype.
    targets: ``[..., L]`` int.
    weights: ``[..., L]`` loss weights (1 real target token, 0 padding); None = all ones.
    length_normalize: static bool. METHODS.md: the papers use the plain sum (default).

  Returns:
    ``[...]`` float32,
    ``S = sum_t w_t · log p(y_t)``; if ``length_normalize``: ``S / max(sum_t w_t, 1)``.
  """
  tok = token_log_probs(logits=logits, targets=targets)
  if weights is None:
    weights = jnp.ones_like(tok)
  weights = _f32(weights)
  # where() so that -inf log-probs on padded positions (weight 0) do not give NaN.
  total = jnp.sum(jnp.where(weights != 0, tok * weights, 0.0), axis=-1)
  if length_normalize:
    total = total / jnp.maximum(jnp.sum(weights, axis=-1), 1.0)
  return total


def cross_entropy_loss(*, logits, targets, weights=None, z_loss: float = 0.0,
                       label_smoothing: float = 0.0) -> Tuple[Array, Array, Array]:
  """Token-level SFT cross-entropy, summed over tokens, as T5X ``compute_weighted_cross_entropy``.

  Per token t, with ``log_z_t = logsumexp(float32(logits_t))``, ``V`` the vocabulary size,
  ``c = 1 − label_smoothing``, ``u = label_smoothing / (V − 1)`` and the soft target
  ``q_t = c·onehot(y_t) + u·(1 − onehot(y_t))``:

    ``ce_t  = −sum_v q_t[v] · log_softmax(logits_t)[v] − K``,
        ``K = −(c·log c + (V−1)·u·log(u + 1e-20))`` (the entropy of q; 0 when no smoothing,
        so that the minimum of ce_t is 0 as in T5X);
    ``zl_t  = z_loss · log_z_t²``;
    ``loss_t = ce_t + zl_t``.

  Args:
    logits: ``[..., L, V]`` any float dtype (math in float32).
    targets: ``[..., L]`` int.
    weights: ``[..., L]`` per-token weights; None = all ones.
    z_loss: coefficient of the log-partition penalty (T5X default 1e-4 in its configs; 0 here).
    label_smoothing: in ``[0, 1)``.

  Returns:
    ``(loss_sum, z_loss_sum, weight_sum)``, float32 scalars:
    ``loss_sum = sum_t w_t · loss_t`` (INCLUDES the z-loss term, as in T5X),
    ``z_loss_sum = sum_t w_t · zl_t`` (reported separately), ``weight_sum = sum_t w_t``.
    The caller normalises (e.g. ``loss_sum / weight_sum`` or a fixed loss-normalising factor).
  """
  logits = _f32(logits)
  targets = jnp.asarray(targets).astype(jnp.int32)
  vocab = logits.shape[-1]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  logp = logits - log_z[..., None]
  tok_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  if label_smoothing:
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    normalizing_constant = -(confidence * jnp.log(confidence)
                             + (vocab - 1) * low * jnp.log(low + 1e-20))
    # sum_v q[v] logp[v] = c·logp[y] + u·(sum_v logp[v] − logp[y])
    soft_logp = confidence * tok_logp + low * (jnp.sum(logp, axis=-1) - tok_logp)
    ce = -soft_logp - normalizing_constant
  else:
    ce = -tok_logp
  zl = z_loss * jnp.square(log_z)
  loss = ce + zl
  if weights is None:
    weights = jnp.ones_like(loss)
  weights = _f32(weights)
  keep = weights != 0
  loss_sum = jnp.sum(jnp.where(keep, loss * weights, 0.0))
  z_loss_sum = jnp.sum(jnp.where(keep, zl * weights, 0.0))
  return loss_sum, z_loss_sum, jnp.sum(weights)


# ------------------------------------------------------------------- SLiC calibration family


def rank_calibration_loss(*, positive_logps, negative_logps, beta=1.0) -> Array:
  """SLiC rank calibration (and the SLiC-HF hinge with ``beta = δ``).

  Args:
    positive_logps: ``[B]`` ``log P(ŷ+|x)``.
    negative_logps: ``[B]`` ``log P(ŷ−|x)``.
    beta: margin β.

  Returns:
    ``[B]`` float32, ``L = max(0, β − log P(ŷ+|x) + log P(ŷ−|x))``.
  """
  return jax.nn.relu(beta - _f32(positive_logps) + _f32(negative_logps))


def margin_calibration_loss(*, positive_logps, negative_logps, positive_scores,
                            negative_scores, beta=1.0) -> Array:
  """SLiC margin calibration.

  Args:
    positive_logps, negative_logps: ``[B]`` sequence log-probs.
    positive_scores, negative_scores: ``[B]`` similarity/reward s(ŷ) (no gradient).
    beta: margin scale β.

  Returns:
    ``[B]`` float32, ``L = max(0, β·(s+ − s−) − log P(ŷ+|x) + log P(ŷ−|x))``.
  """
  gap = jax.lax.stop_gradient(_f32(positive_scores) - _f32(negative_scores))
  return jax.nn.relu(beta * gap - _f32(positive_logps) + _f32(negative_logps))


def _score_ranks(scores: Array, valid: Array) -> Array:
  """Rank (0 = best) of each candidate among the valid ones, by score descending.

  Ties are broken by candidate index (lower index ranks first), i.e. exactly the order of a
  stable descending sort. Invalid candidates get a rank but are never used.
  ``rank_i = #{j valid: s_j > s_i} + #{j valid: s_j == s_i, j < i}``.
  """
  m = scores.shape[-1]
  s_i = scores[..., :, None]
  s_j = scores[..., None, :]
  idx = jnp.arange(m)
  above = (s_j > s_i) | ((s_j == s_i) & (idx[None, :] < idx[:, None]))
  above = above & valid[..., None, :]
  return jnp.sum(above.astype(jnp.int32), axis=-1)


def list_rank_calibration_loss(*, logps, scores, beta=1.0, mask=None) -> Array:
  """SLiC list-rank calibration.

  Candidates of each example are ranked by score descending (rank 0 = best; ties broken by
  candidate index, as a stable sort would); masked candidates are dropped before ranking,
  so the valid ones hold ranks ``0 .. n_valid−1``. With ``r(k)`` the rank of candidate k:

    ``L = sum_{a,b valid, r(a) < r(b)} max(0, β·(r(b) − r(a)) − lp_a + lp_b)``

  i.e. ``sum_{i<j} max(0, β·|i−j| − log P(ŷ_i|x) + log P(ŷ_j|x))`` over sorted positions.

  Args:
    logps: ``[B, m]`` (or ``[..., m]``) candidate sequence log-probs.
    scores: ``[B, m]`` candidate scores (only their order is used; no gradient).
    beta: per-rank margin β.
    mask: ``[B, m]`` 1 valid candidate, 0 padding; None = all valid.

  Returns:
    ``[B]`` float32 per-example losses (0 for an example with < 2 valid candidates).
  """
  logps = _f32(logps)
  scores = jax.lax.stop_gradient(_f32(scores))
  valid = jnp.ones(logps.shape, bool) if mask is None else (jnp.asarray(mask) > 0)
  ranks = _score_ranks(scores, valid)
  r_a = ranks[..., :, None]
  r_b = ranks[..., None, :]
  pair = valid[..., :, None] & valid[..., None, :] & (r_a < r_b)
  gap = (r_b - r_a).astype(jnp.float32)
  # Zero out masked log-probs before the hinge so padding (maybe -inf/NaN) cannot leak.
  lp = jnp.where(valid, logps, 0.0)
  hinge = jax.nn.relu(beta * gap - lp[..., :, None] + lp[..., None, :])
  return jnp.sum(jnp.where(pair, hinge, 0.0), axis=(-2, -1))


def expected_reward_calibration_loss(*, logps, scores, mask=None) -> Array:
  """SLiC expected-reward calibration.

  ``L = − sum_i s_i · P(ŷ_i|x) / sum_j P(ŷ_j|x) = − sum_i s_i · softmax(lp)_i``,
  the softmax taken over the valid candidates of each example only.

  Args:
    logps: ``[B, m]`` candidate sequence log-probs.
    scores: ``[B, m]`` candidate scores (no gradient).
    mask: ``[B, m]`` 1 valid, 0 padding; None = all valid.

  Returns:
    ``[B]`` float32 (0 for an example with no valid candidate).
  """
  logps = _f32(logps)
  scores = jax.lax.stop_gradient(_f32(scores))
  if mask is None:
    probs = jax.nn.softmax(logps, axis=-1)
    return -jnp.sum(scores * probs, axis=-1)
  valid = jnp.asarray(mask) > 0
  neg = jnp.finfo(jnp.float32).min
  lp = jnp.where(valid, logps, neg)
  lp = lp - jax.lax.stop_gradient(jnp.max(lp, axis=-1, keepdims=True))
  e = jnp.where(valid, jnp.exp(lp), 0.0)
  probs = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
  return -jnp.sum(jnp.where(valid, scores * probs, 0.0), axis=-1)


# ------------------------------------------------------------------------------ regularisers


def cross_entropy_regularizer(*, reference_logps) -> Array:
  """Cross-entropy regulariser on the reference/target sequence.

  Args:
    reference_logps: ``[B]`` ``log P(ȳ|x)`` (the SFT target, or the best-ranked decode).

  Returns:
    ``[B]`` float32, ``L_reg = −log P(ȳ|x)``.
  """
  return -_f32(reference_logps)


def token_kl_regularizer(*, logits, reference_logits, weights,
                         direction: str = "forward") -> Array:
  """Token-level KL between the frozen fine-tuned (reference) model and the current one.

  Along the reference sequence ȳ (both logits computed with teacher forcing on ȳ), with
  ``P_ref = softmax(float32(reference_logits))``, ``P_θ = softmax(float32(logits))``:

    direction="forward" (default; METHODS.md [open]):
        ``L = sum_t w_t · KL(P_ref(·|t) ‖ P_θ(·|t)) = sum_t w_t sum_v P_ref[v]·(log P_ref[v] − log P_θ[v])``
    direction="reverse":
        ``L = sum_t w_t · KL(P_θ(·|t) ‖ P_ref(·|t))``

  ``reference_logits`` pass through ``stop_gradient`` (the reference model is frozen).

  Args:
    logits: ``[B, L, V]`` (or ``[..., L, V]``) current-model logits, any float dtype.
    reference_logits: same shape, frozen-model logits.
    weights: ``[B, L]`` per-token weights; None = all ones.
    direction: static, "forward" | "reverse".

  Returns:
    ``[B]`` float32 per-sequence KL sums (≥ 0 up to rounding).
  """
  logp = jax.nn.log_softmax(_f32(logits), axis=-1)
  ref_logp = jax.nn.log_softmax(jax.lax.stop_gradient(_f32(reference_logits)), axis=-1)
  if direction == "forward":
    p, log_p, log_q = jnp.exp(ref_logp), ref_logp, logp
  elif direction == "reverse":
    p, log_p, log_q = jnp.exp(logp), logp, ref_logp
  else:
    raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
  # 0·log 0 = 0 (e.g. vocab entries masked with -inf logits).
  kl_tok = jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)
  if weights is None:
    weights = jnp.ones_like(kl_tok)
  weights = _f32(weights)
  return jnp.sum(jnp.where(weights != 0, kl_tok * weights, 0.0), axis=-1)


# ------------------------------------------------------------------------------ full losses


def slic_loss(*, calibration_losses, regularizer_losses, reg_weight,
              mask=None) -> Tuple[Array, Dict[str, Array]]:
  """Combine per-example SLiC terms: ``loss = mean_b(L_cal[b] + λ·L_reg[b])``.

  The papers write ``sum_batch``; we take the (masked) mean so the scale does not depend on
  the batch size (a constant factor, absorbed by the learning rate).

  Args:
    calibration_losses: ``[B]`` per-example calibration losses.
    regularizer_losses: ``[B]`` per-example regulariser losses (or None = no regulariser).
    reg_weight: λ.
    mask: ``[B]`` 1 real example, 0 padding example; None = all real.

  Returns:
    ``(loss, metrics)``; float32 scalar loss and metrics
    ``{'loss', 'calibration_loss', 'regularizer_loss'}`` (masked means; the regulariser
    reported unweighted).
  """
  cal = _f32(calibration_losses)
  reg = jnp.zeros_like(cal) if regularizer_losses is None else _f32(regularizer_losses)
  per_example = cal + reg_weight * reg
  loss = masked_mean(values=per_example, mask=mask)
  metrics = {
      "loss": loss,
      "calibration_loss": masked_mean(values=cal, mask=mask),
      "regularizer_loss": masked_mean(values=reg, mask=mask),
  }
  return loss, metrics


def preference_metrics(*, chosen_logps, rejected_logps, chosen_lengths=None,
                       rejected_lengths=None, mask=None) -> Dict[str, Array]:
  """Pairwise diagnostics (masked means over the batch, float32 scalars).

  Args:
    chosen_logps, rejected_logps: ``[B]`` sequence log-probs.
    chosen_lengths, rejected_lengths: optional ``[B]`` token counts.
    mask: ``[B]`` 1 real example, 0 padding.

  Returns:
    ``{'pair_accuracy': mean[chosen > rejected], 'margin': mean(chosen − rejected),
       'chosen_logps': mean chosen, 'rejected_logps': mean rejected}``, plus
    ``'chosen_length'`` / ``'rejected_length'`` (means) when the lengths are given.
  """
  chosen = _f32(chosen_logps)
  rejected = _f32(rejected_logps)
  out = {
      "pair_accuracy": masked_mean(values=(chosen > rejected).astype(jnp.float32), mask=mask),
      "margin": masked_mean(values=chosen - rejected, mask=mask),
      "chosen_logps": masked_mean(values=chosen, mask=mask),
      "rejected_logps": masked_mean(values=rejected, mask=mask),
  }
  if chosen_lengths is not None:
    out["chosen_length"] = masked_mean(values=chosen_lengths, mask=mask)
  if rejected_lengths is not None:
    out["rejected_length"] = masked_mean(values=rejected_lengths, mask=mask)
  return out


def slic_hf_loss(*, chosen_logps, rejected_logps, reference_logps, delta=1.0,
                 reg_weight=0.5, mask=None) -> Tuple[Array, Dict[str, Array]]:
  """SLiC-HF loss (Zhao et al. 2023, arXiv 2305.10425).

  Per example b:
    ``ℓ_b = max(0, δ − log π(y+|x) + log π(y−|x)) − λ · log π(y_ref|x)``
  and ``loss = sum_b mask_b ℓ_b / max(sum_b mask_b, 1)`` (the mean over real examples).

  Gradients (real example b, n = number of real examples): ``∂loss/∂reference_b = −λ/n``;
  ``∂loss/∂chosen_b = −1/n`` and ``∂loss/∂rejected_b = +1/n`` while the hinge is active
  (``chosen − rejected < δ``), 0 otherwise.

  Args:
    chosen_logps: ``[B]`` ``log π(y+|x)``.
    rejected_logps: ``[B]`` ``log π(y−|x)``.
    reference_logps: ``[B]`` ``log π(y_ref|x)`` (SFT target or best-ranked decode).
    delta: ranking margin δ (paper: 1.0).
    reg_weight: λ (open in the paper; 0.5 default here).
    mask: ``[B]`` 1 real example, 0 padding example; None = all real.

  Returns:
    ``(loss, metrics)``; metrics are float32 scalars (masked means):
    ``'loss'``, ``'calibration_loss'`` (mean hinge), ``'regularizer_loss'`` (mean −reference),
    ``'pair_accuracy'`` (mean[chosen > rejected]), ``'margin'`` (mean chosen − rejected),
    ``'chosen_logps'``, ``'rejected_logps'``, ``'reference_logps'`` (means),
    ``'hinge_active_fraction'`` (fraction of examples with hinge > 0).
  """
  hinge = rank_calibration_loss(positive_logps=chosen_logps, negative_logps=rejected_logps,
                                beta=delta)
  reg = cross_entropy_regularizer(reference_logps=reference_logps)
  loss, metrics = slic_loss(calibration_losses=hinge, regularizer_losses=reg,
                            reg_weight=reg_weight, mask=mask)
  metrics.update(preference_metrics(chosen_logps=chosen_logps,
                                    rejected_logps=rejected_logps, mask=mask))
  metrics["reference_logps"] = masked_mean(values=reference_logps, mask=mask)
  metrics["hinge_active_fraction"] = masked_mean(
      values=(hinge > 0).astype(jnp.float32), mask=mask)
  return loss, metrics
