"""blocked_attention: the same values and gradients as unblocked attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slic_jax import blocked_attention
from slic_jax import network


def _inputs(b=2, lq=16, lk=12, h=3, d=8, seed=0):
  rng = np.random.RandomState(seed)
  q, k, v = (jnp.asarray(rng.randn(b, n, h, d).astype(np.float32))
             for n in (lq, lk, lk))
  keep = rng.rand(b, 1, lq, lk) > 0.2
  keep[..., 0] = True
  mask_bias = jnp.where(jnp.asarray(keep), 0.0, -1e10)
  pos = jnp.asarray(rng.randn(1, h, lq, lk).astype(np.float32))
  return q, k, v, mask_bias, pos


def _reference(q, k, v, mask_bias, pos, dtype):
  s = jnp.einsum('bqhd,bkhd->bhqk', q.astype(dtype), k.astype(dtype),
                 preferred_element_type=jnp.float32) + mask_bias + pos
  p = jax.nn.softmax(s, axis=-1)
  return jnp.einsum('bhqk,bkhd->bqhd', p.astype(dtype), v.astype(dtype),
                    preferred_element_type=jnp.float32).astype(dtype)


def _loss_and_grads(fn, q, k, v, mask_bias, pos):
  w = jnp.asarray(np.random.RandomState(1).randn(*q.shape).astype(np.float32))
  loss = lambda q, k, v, pos: jnp.sum(fn(q, k, v, mask_bias, pos).astype(jnp.float32) * w)
  return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(q, k, v, pos)


@pytest.mark.parametrize('block_q', [1, 4, 16])
def test_float32_values_and_gradients_match_unblocked_attention(block_q):
  q, k, v, mask_bias, pos = _inputs()
  ref = _loss_and_grads(lambda *a: _reference(*a, jnp.float32), q, k, v, mask_bias, pos)
  got = _loss_and_grads(
      lambda *a: blocked_attention.blocked_attention(*a, dtype=jnp.float32, block_q=block_q),
      q, k, v, mask_bias, pos)
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
  for g, r in zip(got[1], ref[1]):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
  assert float(jnp.max(jnp.abs(got[1][3]))) > 0.1  # the position bias gets a gradient


def test_bfloat16_rounds_matmul_operands_and_keeps_float32_softmax():
  q, k, v, mask_bias, pos = _inputs(seed=2)
  ref = _reference(q, k, v, mask_bias, pos, jnp.bfloat16)
  got = blocked_attention.blocked_attention(q, k, v, mask_bias, pos, dtype=jnp.bfloat16,
                                            block_q=4)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32),
                             atol=2e-2)
  f32 = _reference(q, k, v, mask_bias, pos, jnp.float32)
  assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - f32))) > 1e-4  # it did round


def test_without_biases_and_with_a_block_that_does_not_divide():
  q, k, v, _, _ = _inputs()
  got = blocked_attention.blocked_attention(q, k, v, None, None, dtype=jnp.float32, block_q=8)
  ref = _reference(q, k, v, 0.0, 0.0, jnp.float32)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='block_q=5 does not divide the query length 16'):
    blocked_attention.blocked_attention(q, k, v, None, None, dtype=jnp.float32, block_q=5)


def test_block_size_is_the_largest_divisor_within_the_budget():
  # one query row of float32 logits: 4 · 6 · 1024 · 4 bytes = 96 KiB
  assert blocked_attention.block_size(4, 6, 1024, 1024, 4 << 20) == 32
  assert blocked_attention.block_size(4, 6, 192, 1024, 4 << 20) == 32
  assert blocked_attention.block_size(4, 6, 1024, 1024, 1 << 30) == 1024
  assert blocked_attention.block_size(4, 6, 1024, 1024, 1) == 1


def test_network_with_blocked_attention_matches_the_unblocked_network():
  enc = np.random.RandomState(0).randint(1, 50, (2, 16))
  enc[:, -3:] = 0
  dec_t = np.random.RandomState(1).randint(1, 50, (2, 8))
  dec_in = np.concatenate([np.zeros((2, 1), int), dec_t[:, :-1]], 1)

  params = jax.jit(lambda: network.Transformer(network.make_config('tiny')).init(
      jax.random.PRNGKey(0), enc, dec_in, dec_t, enable_dropout=False))()

  def run(block_bytes):  # the parameters do not depend on the blocking
    model = network.Transformer(network.make_config('tiny', attention_block_bytes=block_bytes))
    loss = lambda p: jnp.sum(jax.nn.log_softmax(
        model.apply(p, enc, dec_in, dec_t, enable_dropout=False))[..., 3])
    jaxpr = str(jax.make_jaxpr(loss)(params))
    return jax.jit(jax.value_and_grad(loss))(params), jaxpr.count('scan[')

  (l0, g0), scans0 = run(0)
  # tiny: H 4, batch 2; 2 KiB holds 2 query rows of 16 keys' float32 logits (512 B each)
  (l1, g1), scans1 = run(2048)
  assert scans0 == 0 and scans1 == 4  # 2 encoder self-attentions + 2 cross-attentions
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_backward_pass_keeps_no_bias_arrays():
  """The biases are not residuals (zero-size tags carry their shapes), so they can be freed
  after the forward pass; the residuals are q, k, kᵀ, v, p and o only."""
  from jax._src import ad_checkpoint  # pylint: disable=g-import-not-at-top
  q, k, v, mask_bias, pos = _inputs()

  def f(q, k, v, pos):  # both biases computed inside, as the network does
    return blocked_attention.blocked_attention(
        q, k, v, mask_bias * (1.0 + 0.0 * q[0, 0, 0, 0]), pos * 2.0,
        dtype=jnp.float32, block_q=4).sum()

  saved = [aval.shape for aval, _ in ad_checkpoint.saved_residuals(f, q, k, v, pos)]
  b, lq, h, d = q.shape
  lk = k.shape[1]
  n = lq // 4
  # The scalar literal; k, kᵀ and v; q and o in blocks; p in blocks; five zero-size tags.
  assert sorted(s for s in saved if 0 not in s) == sorted([
      (), (b, h, lk, d), (b, h, d, lk), (b, h, lk, d), (n, b, h, 4, d), (n, b, h, 4, d),
      (n, b, h, 4, lk)]), saved
  assert mask_bias.shape not in saved and pos.shape not in saved, saved
