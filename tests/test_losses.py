"""Tests for slic_jax.losses: hand-computed values, seeded property loops, jit, bf16."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slic_jax import losses

N_DRAWS = 50  # seeded random draws per property test (no hypothesis in .venv)

# Property loops call jitted wrappers on fixed shapes (sizes varied through masks), so each
# loop compiles once instead of dispatching (and compiling) op by op for every new shape.
_jit_list_rank = jax.jit(lambda lp, s, beta, mask: losses.list_rank_calibration_loss(
    logps=lp, scores=s, beta=beta, mask=mask))
_jit_list_rank_nomask = jax.jit(lambda lp, s, beta: losses.list_rank_calibration_loss(
    logps=lp, scores=s, beta=beta))
_jit_expected_reward = jax.jit(lambda lp, s, mask: losses.expected_reward_calibration_loss(
    logps=lp, scores=s, mask=mask))
_jit_expected_reward_nomask = jax.jit(
    lambda lp, s: losses.expected_reward_calibration_loss(logps=lp, scores=s))
_jit_rank = jax.jit(lambda p, n, beta: losses.rank_calibration_loss(
    positive_logps=p, negative_logps=n, beta=beta))
_jit_margin = jax.jit(lambda p, n, sp, sn, beta: losses.margin_calibration_loss(
    positive_logps=p, negative_logps=n, positive_scores=sp, negative_scores=sn, beta=beta))
_jit_slic_hf = jax.jit(lambda c, r, f, d, lam, mask: losses.slic_hf_loss(
    chosen_logps=c, rejected_logps=r, reference_logps=f, delta=d, reg_weight=lam, mask=mask))
_jit_slic_hf_nomask = jax.jit(lambda c, r, f, d, lam: losses.slic_hf_loss(
    chosen_logps=c, rejected_logps=r, reference_logps=f, delta=d, reg_weight=lam))


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _close(a, b, atol=1e-5, rtol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                             atol=atol, rtol=rtol)


# ------------------------------------------------------------------ token / sequence log-probs


def test_token_log_probs_hand_values():
  # Uniform row over V=4: log p = -log 4. Row [0, log 3, 0, 0]: Z = 1+3+1+1 = 6.
  logits = jnp.array([[[0.0, 0.0, 0.0, 0.0], [0.0, np.log(3.0), 0.0, 0.0]]])
  targets = jnp.array([[2, 1]])
  out = losses.token_log_probs(logits=logits, targets=targets)
  assert out.shape == (1, 2) and out.dtype == jnp.float32
  _close(out, [[-np.log(4.0), np.log(3.0 / 6.0)]])


def test_token_log_probs_matches_numpy_random():
  rng = np.random.default_rng(0)
  for _ in range(10):
    logits = rng.normal(size=(2, 3, 5, 11)) * 3
    targets = rng.integers(0, 11, size=(2, 3, 5))
    out = losses.token_log_probs(logits=jnp.asarray(logits, jnp.float32), targets=targets)
    ref = np.take_along_axis(_np_log_softmax(logits), targets[..., None], -1)[..., 0]
    assert out.shape == (2, 3, 5)
    _close(out, ref, atol=1e-4)


def test_sequence_log_probs_sum_and_normalised():
  # token log-probs: -log4 (uniform over 4) at each of 3 positions; weights [1, 1, 0].
  logits = jnp.zeros((1, 3, 4))
  targets = jnp.array([[0, 1, 2]])
  weights = jnp.array([[1.0, 1.0, 0.0]])
  s = losses.sequence_log_probs(logits=logits, targets=targets, weights=weights)
  _close(s, [-2 * np.log(4.0)])
  n = losses.sequence_log_probs(logits=logits, targets=targets, weights=weights,
                                length_normalize=True)
  _close(n, [-np.log(4.0)])
  # all-zero weights: sum 0, normalised divides by max(0, 1) = 1 -> 0.
  z = losses.sequence_log_probs(logits=logits, targets=targets, weights=jnp.zeros((1, 3)),
                                length_normalize=True)
  _close(z, [0.0])
  # weights=None means all ones.
  _close(losses.sequence_log_probs(logits=logits, targets=targets, weights=None),
         [-3 * np.log(4.0)])


def test_sequence_log_probs_random_vs_numpy():
  rng = np.random.default_rng(1)
  for _ in range(10):
    logits = rng.normal(size=(4, 6, 9)) * 2
    targets = rng.integers(0, 9, size=(4, 6))
    weights = (rng.random((4, 6)) > 0.3).astype(np.float32)
    tok = np.take_along_axis(_np_log_softmax(logits), targets[..., None], -1)[..., 0]
    ref = (tok * weights).sum(-1)
    out = losses.sequence_log_probs(logits=jnp.asarray(logits, jnp.float32),
                                    targets=targets, weights=weights)
    _close(out, ref, atol=1e-4)
    outn = losses.sequence_log_probs(logits=jnp.asarray(logits, jnp.float32),
                                     targets=targets, weights=weights, length_normalize=True)
    _close(outn, ref / np.maximum(weights.sum(-1), 1), atol=1e-4)


def test_bf16_logits_give_float32_close_to_f32():
  rng = np.random.default_rng(2)
  for _ in range(2):
    logits32 = jnp.asarray(rng.normal(size=(3, 7, 50)) * 4, jnp.float32)
    logits16 = logits32.astype(jnp.bfloat16)
    # Compare against f32 math on the bf16-rounded logits: the only error is the rounding
    # of the inputs, none from bf16 arithmetic.
    logits16_as32 = logits16.astype(jnp.float32)
    targets = rng.integers(0, 50, size=(3, 7))
    weights = jnp.ones((3, 7))
    t16 = losses.token_log_probs(logits=logits16, targets=targets)
    assert t16.dtype == jnp.float32
    _close(t16, losses.token_log_probs(logits=logits16_as32, targets=targets), atol=1e-6)
    s16 = losses.sequence_log_probs(logits=logits16, targets=targets, weights=weights)
    assert s16.dtype == jnp.float32
    _close(s16, losses.sequence_log_probs(logits=logits16_as32, targets=targets,
                                          weights=weights), atol=1e-5)
    # and within bf16 input-rounding tolerance of the f32 logits.
    _close(s16, losses.sequence_log_probs(logits=logits32, targets=targets, weights=weights),
           atol=0.5, rtol=2e-2)
    ce16 = losses.cross_entropy_loss(logits=logits16, targets=targets, weights=weights)
    assert all(x.dtype == jnp.float32 for x in ce16)
    kl16 = losses.token_kl_regularizer(logits=logits16, reference_logits=logits16,
                                       weights=weights)
    assert kl16.dtype == jnp.float32
    _close(kl16, np.zeros(3), atol=1e-5)


def test_large_logits_no_nan():
  logits = jnp.array([[[1e4, -1e4, 0.0]]], jnp.bfloat16)
  out = losses.token_log_probs(logits=logits, targets=jnp.array([[1]]))
  assert np.isfinite(np.asarray(out)).all()


# ------------------------------------------------------------------------- cross-entropy


def test_cross_entropy_hand_values():
  # Two tokens over V=4 uniform logits: CE = log 4 each; weights [1, 0.5] -> 1.5 log 4.
  logits = jnp.zeros((1, 2, 4))
  targets = jnp.array([[0, 3]])
  weights = jnp.array([[1.0, 0.5]])
  loss, zl, ws = losses.cross_entropy_loss(logits=logits, targets=targets, weights=weights)
  _close(loss, 1.5 * np.log(4.0))
  _close(zl, 0.0)
  _close(ws, 1.5)
  # z-loss: log_z = log 4 -> z * log(4)^2 per token, included in loss_sum.
  loss, zl, ws = losses.cross_entropy_loss(logits=logits, targets=targets, weights=weights,
                                           z_loss=0.1)
  _close(zl, 1.5 * 0.1 * np.log(4.0) ** 2)
  _close(loss, 1.5 * np.log(4.0) + 1.5 * 0.1 * np.log(4.0) ** 2)


def test_cross_entropy_label_smoothing_vs_numpy():
  rng = np.random.default_rng(3)
  V, ls = 7, 0.1
  ce_fn = jax.jit(functools.partial(losses.cross_entropy_loss, label_smoothing=ls))
  for _ in range(10):
    logits = rng.normal(size=(2, 5, V)) * 2
    targets = rng.integers(0, V, size=(2, 5))
    weights = (rng.random((2, 5)) > 0.2).astype(np.float32)
    c, u = 1 - ls, ls / (V - 1)
    q = np.full((2, 5, V), u)
    np.put_along_axis(q, targets[..., None], c, -1)
    K = -(c * np.log(c) + (V - 1) * u * np.log(u + 1e-20))
    ce = -(q * _np_log_softmax(logits)).sum(-1) - K
    loss, _, ws = ce_fn(logits=jnp.asarray(logits, jnp.float32), targets=targets,
                        weights=weights)
    _close(loss, (ce * weights).sum(), atol=1e-4)
    _close(ws, weights.sum())
  # Smoothed loss is minimised (= 0) when the model predicts q exactly.
  q_logits = np.log(np.where(np.eye(V)[[2]] > 0, c, u))[None]
  loss, _, _ = losses.cross_entropy_loss(logits=jnp.asarray(q_logits, jnp.float32),
                                         targets=jnp.array([[2]]), label_smoothing=ls)
  _close(loss, 0.0, atol=1e-5)


def test_cross_entropy_equals_minus_sequence_logps():
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(3, 4, 6)), jnp.float32)
  targets = rng.integers(0, 6, size=(3, 4))
  weights = jnp.asarray((rng.random((3, 4)) > 0.3), jnp.float32)
  loss, _, _ = losses.cross_entropy_loss(logits=logits, targets=targets, weights=weights)
  seq = losses.sequence_log_probs(logits=logits, targets=targets, weights=weights)
  _close(loss, -jnp.sum(seq), atol=1e-5)


# ---------------------------------------------------------------------------- SLiC-HF loss


def test_slic_hf_loss_hand_values():
  # delta=1, lambda=0.5.
  # ex0: chosen -1, rejected -3: margin 2 >= 1 -> hinge 0.   ref -2 -> reg 2.
  # ex1: chosen -2, rejected -2.5: margin .5 -> hinge .5.     ref -4 -> reg 4.
  # ex2: chosen -5, rejected -3: margin -2 -> hinge 3.        ref -6 -> reg 6.
  # per-example: 0+1=1, .5+2=2.5, 3+3=6 -> mean 9.5/3.
  chosen = jnp.array([-1.0, -2.0, -5.0])
  rejected = jnp.array([-3.0, -2.5, -3.0])
  ref = jnp.array([-2.0, -4.0, -6.0])
  loss, m = losses.slic_hf_loss(chosen_logps=chosen, rejected_logps=rejected,
                                reference_logps=ref, delta=1.0, reg_weight=0.5)
  _close(loss, 9.5 / 3)
  expected = {
      "loss": 9.5 / 3,
      "calibration_loss": 3.5 / 3,
      "regularizer_loss": 12.0 / 3,
      "pair_accuracy": 2.0 / 3,
      "margin": (2.0 + 0.5 - 2.0) / 3,
      "chosen_logps": -8.0 / 3,
      "rejected_logps": -8.5 / 3,
      "reference_logps": -12.0 / 3,
      "hinge_active_fraction": 2.0 / 3,
  }
  assert set(m) == set(expected)
  for k, v in expected.items():
    assert m[k].dtype == jnp.float32 and m[k].shape == (), k
    _close(m[k], v)


def test_slic_hf_loss_mask_excludes_rows():
  chosen = jnp.array([-1.0, -2.0, -5.0, np.nan])
  rejected = jnp.array([-3.0, -2.5, -3.0, 100.0])
  ref = jnp.array([-2.0, -4.0, -6.0, -np.inf])
  mask = jnp.array([1, 0, 1, 0])
  loss, m = losses.slic_hf_loss(chosen_logps=chosen, rejected_logps=rejected,
                                reference_logps=ref, mask=mask)
  # rows 0, 2 only: (1 + 6) / 2
  _close(loss, 3.5)
  _close(m["pair_accuracy"], 0.5)
  _close(m["hinge_active_fraction"], 0.5)
  _close(m["reference_logps"], -4.0)
  _close(m["margin"], 0.0)
  g = jax.grad(lambda c, r, f: losses.slic_hf_loss(
      chosen_logps=c, rejected_logps=r, reference_logps=f, mask=mask)[0],
               argnums=(0, 1, 2))(chosen, rejected, ref)
  for gi in g:
    assert np.isfinite(np.asarray(gi)).all()
    _close(np.asarray(gi)[[1, 3]], [0.0, 0.0])
  # all-padding batch -> 0, not NaN.
  loss0, m0 = losses.slic_hf_loss(chosen_logps=chosen, rejected_logps=rejected,
                                  reference_logps=ref, mask=jnp.zeros(4))
  _close(loss0, 0.0)
  assert all(np.isfinite(np.asarray(v)) for v in m0.values())


def test_slic_hf_mask_property_equals_subset():
  rng = np.random.default_rng(5)
  for _ in range(N_DRAWS):
    B = 8
    c, r, f = (rng.normal(size=B).astype(np.float32) * 3 for _ in range(3))
    mask = (rng.random(B) > 0.4).astype(np.float32)
    if mask.sum() == 0:
      mask[0] = 1
    keep = mask > 0
    delta, lam = float(rng.uniform(0.1, 2)), float(rng.uniform(0, 1))
    loss, m = _jit_slic_hf(c, r, f, delta, lam, mask)
    # the subset, padded back to B with garbage rows and an explicit mask, must agree with
    # the unmasked loss over the subset (checked eagerly on a few draws: new shapes compile).
    if _ == 0:
      loss_s, m_s = losses.slic_hf_loss(chosen_logps=c[keep], rejected_logps=r[keep],
                                        reference_logps=f[keep], delta=delta, reg_weight=lam)
      _close(loss, loss_s)
      for k in m:
        _close(m[k], m_s[k])
    garbage = np.where(keep, 0.0, np.float32(rng.normal() * 1e3)).astype(np.float32)
    loss_g, m_g = _jit_slic_hf(c + garbage, r - garbage, f + garbage, delta, lam, mask)
    _close(loss_g, loss)
    for k in m:
      _close(m_g[k], m[k])
    # numpy reference
    ref = np.mean(np.maximum(0, delta - c[keep] + r[keep]) - lam * f[keep])
    _close(loss, ref, atol=1e-5)


def test_slic_hf_gradient_properties():
  rng = np.random.default_rng(6)
  grad_fn = jax.jit(jax.grad(lambda c, r, f, d, lam: losses.slic_hf_loss(
      chosen_logps=c, rejected_logps=r, reference_logps=f, delta=d, reg_weight=lam)[0],
                             argnums=(0, 1, 2)))
  for i in range(N_DRAWS):
    B = (1, 4, 7)[i % 3]
    c, r, f = (jnp.asarray(rng.normal(size=B) * 3, jnp.float32) for _ in range(3))
    delta, lam = float(rng.uniform(0.1, 2)), float(rng.uniform(0, 1))
    gc, gr, gf = grad_fn(c, r, f, delta, lam)
    assert (np.asarray(gc) <= 0).all() and (np.asarray(gr) >= 0).all()
    _close(gf, np.full(B, -lam / B), atol=1e-7)
    active = np.asarray(delta - c + r) > 0
    _close(gc, np.where(active, -1.0 / B, 0.0), atol=1e-7)
    _close(gr, np.where(active, 1.0 / B, 0.0), atol=1e-7)


def test_hinge_zero_with_zero_gradient_beyond_margin():
  rng = np.random.default_rng(7)
  grad_fn = jax.jit(jax.grad(lambda c_, r_, d: jnp.sum(losses.rank_calibration_loss(
      positive_logps=c_, negative_logps=r_, beta=d)), argnums=(0, 1)))
  B = 6
  for _ in range(N_DRAWS):
    # Multiples of 1/8 keep every float32 sum exact, so "margin == delta" is exact.
    delta = float(rng.integers(1, 24)) / 8
    r = rng.integers(-80, 80, size=B) / 8
    # margin >= delta, including exactly delta (relu'(0) = 0).
    extra = np.where(rng.random(B) < 0.3, 0, rng.integers(0, 24, size=B)) / 8
    c = jnp.asarray(r + delta + extra, jnp.float32)
    r = jnp.asarray(r, jnp.float32)
    hinge = _jit_rank(c, r, delta)
    _close(hinge, np.zeros(B), atol=0)
    g = grad_fn(c, r, delta)
    _close(g[0], np.zeros(B), atol=0)
    _close(g[1], np.zeros(B), atol=0)
    loss, m = _jit_slic_hf_nomask(c, r, jnp.zeros(B), delta, 0.5)
    _close(m["calibration_loss"], 0.0, atol=0)
    _close(m["hinge_active_fraction"], 0.0, atol=0)
    _close(m["pair_accuracy"], 1.0)


# ------------------------------------------------------------------- SLiC calibration family


def test_rank_and_margin_hand_values():
  lp_pos = jnp.array([-1.0, -4.0])
  lp_neg = jnp.array([-2.0, -3.0])
  # rank, beta=2: max(0, 2 + (-1 is lp+ -> 2 - (-1) + (-2)) = 1), max(0, 2 + 4 - 3) = 3
  _close(losses.rank_calibration_loss(positive_logps=lp_pos, negative_logps=lp_neg, beta=2.0),
         [1.0, 3.0])
  # margin, beta=2, s+ - s- = [0.25, 1.0]: max(0, .5 + 1 - 2) = 0, max(0, 2 + 4 - 3) = 3
  _close(losses.margin_calibration_loss(positive_logps=lp_pos, negative_logps=lp_neg,
                                        positive_scores=jnp.array([0.75, 1.0]),
                                        negative_scores=jnp.array([0.5, 0.0]), beta=2.0),
         [0.0, 3.0])


def test_margin_loss_no_gradient_to_scores():
  g = jax.grad(lambda s: jnp.sum(losses.margin_calibration_loss(
      positive_logps=jnp.array([-5.0]), negative_logps=jnp.array([0.0]),
      positive_scores=s, negative_scores=jnp.array([0.0]))))(jnp.array([1.0]))
  _close(g, [0.0], atol=0)


def test_list_rank_hand_values():
  # scores [0.1, 0.9, 0.5] -> order (best first): cand1 (rank0), cand2 (rank1), cand0 (rank2).
  # logps [-1, -3, -2], beta=1:
  #   (1,2): max(0, 1*1 - (-3) + (-2)) = 2
  #   (1,0): max(0, 1*2 - (-3) + (-1)) = 4
  #   (2,0): max(0, 1*1 - (-2) + (-1)) = 2   -> total 8
  logps = jnp.array([[-1.0, -3.0, -2.0]])
  scores = jnp.array([[0.1, 0.9, 0.5]])
  _close(losses.list_rank_calibration_loss(logps=logps, scores=scores, beta=1.0), [8.0])
  # Mask out cand2: valid order cand1 (rank0), cand0 (rank1): max(0, 1 + 3 - 1) = 3.
  _close(losses.list_rank_calibration_loss(logps=logps, scores=scores, beta=1.0,
                                           mask=jnp.array([[1, 1, 0]])), [3.0])
  # Ties: scores all equal -> stable order 0, 1, 2:
  #   (0,1): max(0, 1 + 1 - 3) = 0; (0,2): max(0, 2 + 1 - 2) = 1; (1,2): max(0, 1 + 3 - 2) = 2
  _close(losses.list_rank_calibration_loss(logps=logps, scores=jnp.zeros((1, 3))), [3.0])
  # < 2 valid candidates -> 0.
  _close(losses.list_rank_calibration_loss(logps=logps, scores=scores,
                                           mask=jnp.array([[0, 1, 0]])), [0.0])


def _brute_list_rank(lp, s, beta, mask):
  out = []
  for b in range(lp.shape[0]):
    idx = [k for k in np.argsort(-s[b], kind="stable") if mask[b, k]]
    tot = 0.0
    for i, j in itertools.combinations(range(len(idx)), 2):
      tot += max(0.0, beta * abs(i - j) - lp[b, idx[i]] + lp[b, idx[j]])
    out.append(tot)
  return np.array(out)


def test_list_rank_equals_brute_force():
  rng = np.random.default_rng(8)
  B, m = 4, 8  # per-row masks give every effective m in 0..8
  for _ in range(N_DRAWS):
    lp = (rng.normal(size=(B, m)) * 2).astype(np.float32)
    s = rng.integers(0, 4, size=(B, m)).astype(np.float32)  # many ties on purpose
    if rng.random() < 0.5:
      s = rng.normal(size=(B, m)).astype(np.float32)
    mask = rng.random((B, m)) > rng.uniform(0, 1, size=(B, 1))
    beta = float(rng.uniform(0.1, 2))
    out = _jit_list_rank(lp, s, beta, mask)
    ref = _brute_list_rank(lp, s, beta, mask)
    _close(out, ref, atol=1e-4)
    # and the unmasked case is the sum of pairwise rank losses with beta*|i-j| margins
    out_all = _jit_list_rank_nomask(lp, s, beta)
    _close(out_all, _brute_list_rank(lp, s, beta, np.ones((B, m), bool)), atol=1e-4)


def test_list_rank_m2_equals_rank_loss():
  rng = np.random.default_rng(9)
  for _ in range(N_DRAWS):
    lp = (rng.normal(size=(4, 2)) * 2).astype(np.float32)
    s = rng.normal(size=(4, 2)).astype(np.float32)
    beta = float(rng.uniform(0.1, 2))
    best = np.argmax(s, -1)
    pos, neg = lp[np.arange(4), best], lp[np.arange(4), 1 - best]
    _close(_jit_list_rank_nomask(lp, s, beta), _jit_rank(pos, neg, beta), atol=1e-5)


def test_shift_invariance_of_calibration_losses():
  rng = np.random.default_rng(10)
  B, m = 4, 6
  for _ in range(N_DRAWS):
    lp = (rng.normal(size=(B, m)) * 2).astype(np.float32)
    s = rng.normal(size=(B, m)).astype(np.float32)
    mask = rng.random((B, m)) > 0.2
    shift = (rng.normal(size=(B, 1)) * 10).astype(np.float32)  # same constant per example
    beta = float(rng.uniform(0.1, 2))
    for a, b in (
        (_jit_list_rank(lp, s, beta, mask), _jit_list_rank(lp + shift, s, beta, mask)),
        (_jit_list_rank_nomask(lp, s, beta), _jit_list_rank_nomask(lp + shift, s, beta)),
        (_jit_expected_reward(lp, s, mask), _jit_expected_reward(lp + shift, s, mask)),
        (_jit_expected_reward_nomask(lp, s), _jit_expected_reward_nomask(lp + shift, s)),
        (_jit_rank(lp[:, 0], lp[:, 1], beta),
         _jit_rank(lp[:, 0] + shift[:, 0], lp[:, 1] + shift[:, 0], beta)),
        (_jit_margin(lp[:, 0], lp[:, 1], s[:, 0], s[:, 1], beta),
         _jit_margin(lp[:, 0] + shift[:, 0], lp[:, 1] + shift[:, 0], s[:, 0], s[:, 1], beta)),
    ):
      _close(a, b, atol=1e-3, rtol=1e-4)


def test_expected_reward_hand_values_and_mask():
  # logps [log 1, log 3] -> softmax [.25, .75]; scores [2, 4] -> -(0.5 + 3) = -3.5
  lp = jnp.log(jnp.array([[1.0, 3.0, 5.0]]))
  s = jnp.array([[2.0, 4.0, 100.0]])
  _close(losses.expected_reward_calibration_loss(logps=lp[:, :2], scores=s[:, :2]), [-3.5])
  _close(losses.expected_reward_calibration_loss(logps=lp, scores=s,
                                                 mask=jnp.array([[1, 1, 0]])), [-3.5])
  # Unmasked: softmax [1, 3, 5]/9 -> -(2 + 12 + 500)/9
  _close(losses.expected_reward_calibration_loss(logps=lp, scores=s), [-514.0 / 9])
  # no valid candidates -> 0, finite gradient
  out = losses.expected_reward_calibration_loss(logps=lp, scores=s, mask=jnp.zeros((1, 3)))
  _close(out, [0.0])
  g = jax.grad(lambda x: jnp.sum(losses.expected_reward_calibration_loss(
      logps=x, scores=s, mask=jnp.array([[1, 0, 0]]))))(lp)
  assert np.isfinite(np.asarray(g)).all()


def test_expected_reward_masked_equals_subset_random():
  rng = np.random.default_rng(11)
  m = 6
  for _ in range(N_DRAWS):
    lp = (rng.normal(size=(1, m)) * 3).astype(np.float32)
    s = rng.normal(size=(1, m)).astype(np.float32)
    mask = rng.random((1, m)) > 0.3
    if not mask.any():
      mask[0, 0] = True
    keep = mask[0]
    p = np.exp(_np_log_softmax(lp[:, keep]))
    ref = -(s[:, keep] * p).sum(-1)
    _close(_jit_expected_reward(lp, s, mask), ref, atol=1e-5)
    # garbage (even -inf / +inf) in masked candidates changes nothing
    lp_g = np.where(mask, lp, np.float32(rng.choice([-np.inf, 1e30, 7.0])))
    _close(_jit_expected_reward(lp_g, s, mask), ref, atol=1e-5)


# ---------------------------------------------------------------------------- regularisers


def _np_kl(p_logits, q_logits):
  lp, lq = _np_log_softmax(p_logits), _np_log_softmax(q_logits)
  return (np.exp(lp) * (lp - lq)).sum(-1)


def test_cross_entropy_regularizer():
  _close(losses.cross_entropy_regularizer(reference_logps=jnp.array([-2.0, -0.5])),
         [2.0, 0.5])


def test_token_kl_hand_value():
  # P_ref = [.5, .5], P_theta = [.25, .75]: KL = .5 log 2 + .5 log(2/3)
  ref = jnp.log(jnp.array([[[0.5, 0.5]]]))
  cur = jnp.log(jnp.array([[[0.25, 0.75]]]))
  kl = losses.token_kl_regularizer(logits=cur, reference_logits=ref, weights=jnp.ones((1, 1)))
  _close(kl, [0.5 * np.log(2.0) + 0.5 * np.log(2.0 / 3.0)])
  klr = losses.token_kl_regularizer(logits=cur, reference_logits=ref,
                                    weights=jnp.ones((1, 1)), direction="reverse")
  _close(klr, [0.25 * np.log(0.5) + 0.75 * np.log(1.5)])
  with pytest.raises(ValueError):
    losses.token_kl_regularizer(logits=cur, reference_logits=ref, weights=None,
                                direction="sideways")


def test_token_kl_properties_vs_numpy():
  rng = np.random.default_rng(12)
  kl_fwd = jax.jit(lambda x, y, w: losses.token_kl_regularizer(
      logits=x, reference_logits=y, weights=w))
  kl_rev = jax.jit(lambda x, y, w: losses.token_kl_regularizer(
      logits=x, reference_logits=y, weights=w, direction="reverse"))
  g_cur = jax.jit(jax.grad(lambda x, y, w: jnp.sum(losses.token_kl_regularizer(
      logits=x, reference_logits=y, weights=w)), argnums=(0, 1)))
  B, L, V = 3, 5, 11
  for _ in range(N_DRAWS):
    cur = (rng.normal(size=(B, L, V)) * 2).astype(np.float32)
    ref = (rng.normal(size=(B, L, V)) * 2).astype(np.float32)
    w = (rng.random((B, L)) > 0.3).astype(np.float32)
    w[:, 0] = 1.0
    kl = kl_fwd(cur, ref, w)
    _close(kl, (_np_kl(ref, cur) * w).sum(-1), atol=1e-4)
    assert (np.asarray(kl) > 0).all()
    _close(kl_rev(cur, ref, w), (_np_kl(cur, ref) * w).sum(-1), atol=1e-4)
    # zero (and zero gradient) when the logits are equal, also when shifted per token.
    _close(kl_fwd(cur + 3.0, cur, w), np.zeros(B), atol=1e-5)
    _close(kl_rev(cur, cur - 2.0, w), np.zeros(B), atol=1e-5)
    g, gref = g_cur(cur, cur, w)
    _close(g, np.zeros_like(cur), atol=1e-6)
    # no gradient flows into the frozen reference
    _, gref = g_cur(cur, ref, w)
    _close(gref, np.zeros_like(ref), atol=0)


def test_token_kl_handles_minus_inf_vocab_entries():
  ref = jnp.array([[[0.0, -jnp.inf, 0.0]]])
  cur = jnp.array([[[0.0, 1.0, 0.0]]])
  kl = losses.token_kl_regularizer(logits=cur, reference_logits=ref, weights=None)
  # P_ref = [.5, 0, .5]; P_theta = [1, e, 1]/(2+e): KL = log((2+e)/2)
  _close(kl, [np.log((2 + np.e) / 2)])


# ----------------------------------------------------------------- slic_loss / metrics


def test_slic_loss_and_preference_metrics():
  cal = jnp.array([1.0, 2.0, 30.0])
  reg = jnp.array([4.0, 0.0, 30.0])
  loss, m = losses.slic_loss(calibration_losses=cal, regularizer_losses=reg, reg_weight=0.25,
                             mask=jnp.array([1, 1, 0]))
  # rows 0,1: (1 + 1) and (2 + 0) -> mean 2
  _close(loss, 2.0)
  _close(m["calibration_loss"], 1.5)
  _close(m["regularizer_loss"], 2.0)
  loss, _ = losses.slic_loss(calibration_losses=cal, regularizer_losses=None, reg_weight=1.0)
  _close(loss, 11.0)

  pm = losses.preference_metrics(chosen_logps=jnp.array([-1.0, -5.0]),
                                 rejected_logps=jnp.array([-2.0, -4.0]),
                                 chosen_lengths=jnp.array([10, 20]),
                                 rejected_lengths=jnp.array([5, 7]))
  assert set(pm) == {"pair_accuracy", "margin", "chosen_logps", "rejected_logps",
                     "chosen_length", "rejected_length"}
  _close(pm["pair_accuracy"], 0.5)
  _close(pm["margin"], 0.0)
  _close(pm["chosen_length"], 15.0)
  _close(pm["rejected_length"], 6.0)
  pm = losses.preference_metrics(chosen_logps=jnp.array([-1.0, -5.0]),
                                 rejected_logps=jnp.array([-2.0, -4.0]),
                                 mask=jnp.array([0, 1]))
  assert set(pm) == {"pair_accuracy", "margin", "chosen_logps", "rejected_logps"}
  _close(pm["pair_accuracy"], 0.0)
  _close(pm["margin"], -1.0)


# ----------------------------------------------------------------------------------- jit


def test_every_function_is_jittable_and_matches_eager():
  rng = np.random.default_rng(13)
  B, L, V, m = 3, 4, 6, 5
  logits = jnp.asarray(rng.normal(size=(B, L, V)), jnp.bfloat16)
  ref_logits = jnp.asarray(rng.normal(size=(B, L, V)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, size=(B, L)))
  weights = jnp.asarray(rng.random((B, L)) > 0.3, jnp.float32)
  c, r, f = (jnp.asarray(rng.normal(size=B), jnp.float32) for _ in range(3))
  lp = jnp.asarray(rng.normal(size=(B, m)), jnp.float32)
  s = jnp.asarray(rng.integers(0, 3, size=(B, m)), jnp.float32)
  cmask = jnp.asarray(rng.random((B, m)) > 0.3)
  bmask = jnp.array([1, 0, 1])
  cases = [
      (losses.token_log_probs, dict(logits=logits, targets=targets)),
      (losses.sequence_log_probs, dict(logits=logits, targets=targets, weights=weights)),
      (functools.partial(losses.sequence_log_probs, length_normalize=True),
       dict(logits=logits, targets=targets, weights=weights)),
      (functools.partial(losses.cross_entropy_loss, z_loss=1e-4, label_smoothing=0.1),
       dict(logits=logits, targets=targets, weights=weights)),
      (losses.rank_calibration_loss, dict(positive_logps=c, negative_logps=r)),
      (losses.margin_calibration_loss, dict(positive_logps=c, negative_logps=r,
                                            positive_scores=f, negative_scores=r)),
      (losses.list_rank_calibration_loss, dict(logps=lp, scores=s, mask=cmask)),
      (losses.expected_reward_calibration_loss, dict(logps=lp, scores=s, mask=cmask)),
      (losses.cross_entropy_regularizer, dict(reference_logps=f)),
      (losses.token_kl_regularizer, dict(logits=logits, reference_logits=ref_logits,
                                         weights=weights)),
      (functools.partial(losses.token_kl_regularizer, direction="reverse"),
       dict(logits=logits, reference_logits=ref_logits, weights=weights)),
      (losses.slic_loss, dict(calibration_losses=c, regularizer_losses=f, reg_weight=0.5,
                              mask=bmask)),
      (losses.slic_hf_loss, dict(chosen_logps=c, rejected_logps=r, reference_logps=f,
                                 delta=1.0, reg_weight=0.5, mask=bmask)),
      (losses.preference_metrics, dict(chosen_logps=c, rejected_logps=r, mask=bmask)),
      (losses.masked_mean, dict(values=c, mask=bmask)),
  ]
  for fn, kwargs in cases:
    eager = fn(**kwargs)
    jitted = jax.jit(lambda kw, fn=fn: fn(**kw))(kwargs)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
      assert a.dtype == b.dtype
      if jnp.issubdtype(a.dtype, jnp.floating):
        assert a.dtype == jnp.float32
      _close(a, b, atol=1e-5)


def test_keyword_only():
  with pytest.raises(TypeError):
    losses.rank_calibration_loss(jnp.zeros(1), jnp.zeros(1))  # pylint: disable=too-many-function-args


def test_token_log_probs_gradient_is_onehot_minus_softmax():
  """The custom VJP equals autodiff of log_softmax + take_along_axis."""
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5, 11)) * 3.0
  targets = jax.random.randint(jax.random.PRNGKey(1), (2, 3, 5), 0, 11)
  g = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 5))

  def reference(x):
    logp = jax.nn.log_softmax(x, axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

  ours = lambda x: losses.token_log_probs(logits=x, targets=targets)
  np.testing.assert_allclose(np.asarray(ours(logits)), np.asarray(reference(logits)),
                             rtol=1e-5, atol=1e-5)
  d_ours = jax.grad(lambda x: jnp.sum(g * ours(x)))(logits)
  d_ref = jax.grad(lambda x: jnp.sum(g * reference(x)))(logits)
  np.testing.assert_allclose(np.asarray(d_ours), np.asarray(d_ref), rtol=1e-5, atol=1e-6)
  # Under jit, with bfloat16 logits (cast to float32 inside) too.
  d_bf16 = jax.jit(jax.grad(lambda x: jnp.sum(
      g * losses.token_log_probs(logits=x, targets=targets))))(logits.astype(jnp.bfloat16))
  assert d_bf16.dtype == jnp.bfloat16
