"""T5Config.attention_implementation: jax.nn.dot_product_attention ('xla', 'cudnn') in the
network gives the same loss and gradients as the module's own attention ('default').

The 'cudnn' tests need an NVIDIA GPU (skipped elsewhere; the conftest hides GPUs unless
CUDA_VISIBLE_DEVICES is set: `CUDA_VISIBLE_DEVICES=0 JAX_DEFAULT_MATMUL_PRECISION=highest pytest
tests/test_fused_attention.py`); the 'xla' tests run on any backend
and check the same plumbing (mask, position bias, scale 1, grouped cross-attention).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slic_jax import network

_GROUPS = 2  # target rows per prompt: the grouped (shared-encoder) cross-attention


def _batch(prompts=2, li=16, lt=8, seed=0):
  rng = np.random.RandomState(seed)
  enc = rng.randint(1, 50, (prompts, li))
  enc[0, -5:] = 0  # encoder padding
  dec_t = rng.randint(1, 50, (prompts * _GROUPS, lt))
  dec_t[1, -3:] = 0  # target padding
  dec_in = np.concatenate([np.zeros((prompts * _GROUPS, 1), int), dec_t[:, :-1]], 1)
  return enc, dec_in, dec_t


def _loss_and_grads(dtype, implementation, params=None, remat='none'):
  enc, dec_in, dec_t = _batch()
  cfg = network.make_config('tiny', dtype=dtype, attention_implementation=implementation,
                            remat_policy=remat)
  model = network.Transformer(cfg)
  if params is None:
    params = jax.jit(lambda: network.Transformer(network.make_config('tiny')).init(
        jax.random.PRNGKey(0), enc, dec_in[::_GROUPS],
        dec_t[::_GROUPS], enable_dropout=False))()

  def loss(p):
    encoded = model.apply(p, enc, enable_dropout=False, method=model.encode)
    logits = model.apply(p, encoded, enc, dec_in, dec_t, enable_dropout=False,
                         method=model.decode)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    picked = jnp.take_along_axis(logp, dec_t[..., None], -1)[..., 0]
    return jnp.sum(picked * (dec_t > 0))

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return params, value, grads


def _assert_close(got, ref, rtol, atol):
  np.testing.assert_allclose(got[1], ref[1], rtol=rtol)
  flat_got = jax.tree_util.tree_leaves_with_path(got[2])
  flat_ref = jax.tree_util.tree_leaves(ref[2])
  for (path, a), b in zip(flat_got, flat_ref):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_xla_implementation_matches_the_default_attention_float32():
  ref = _loss_and_grads(jnp.float32, 'default')
  got = _loss_and_grads(jnp.float32, 'xla', ref[0])
  _assert_close(got, ref, rtol=2e-5, atol=1e-5)
  # the relative position biases get their gradient through jax.nn.dot_product_attention
  rel = got[2]['params']['encoder']['relpos_bias']['rel_embedding']
  assert float(jnp.max(jnp.abs(rel))) > 1e-3


def _relative_errors(got, ref):
  """‖a − b‖ / ‖b‖ of every gradient leaf (float32), keyed by its path."""
  flat_ref = jax.tree_util.tree_leaves(ref[2])
  return {jax.tree_util.keystr(path): float(
      np.linalg.norm(np.asarray(a, np.float32) - np.asarray(b, np.float32))
      / np.linalg.norm(np.asarray(b, np.float32)))
          for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got[2]), flat_ref)}


def _assert_as_accurate_as_default_bfloat16(implementation, remat='none'):
  """Against float32 attention, the implementation's bf16 loss and gradients are no
  further off than the default bf16 attention's (both round q, k, v to bfloat16 and keep
  float32 logits and softmax)."""
  f32 = _loss_and_grads(jnp.float32, 'default')
  ref = _loss_and_grads(jnp.bfloat16, 'default', f32[0])
  got = _loss_and_grads(jnp.bfloat16, implementation, f32[0], remat)
  np.testing.assert_allclose(got[1], f32[1], rtol=2e-3)
  base, err = _relative_errors(ref, f32), _relative_errors(got, f32)
  worse = {k: (err[k], base[k]) for k in err if err[k] > 2 * base[k] + 2e-3}
  assert not worse, worse
  assert max(err.values()) < 0.05, err


def test_xla_implementation_is_as_accurate_as_the_default_attention_bfloat16():
  _assert_as_accurate_as_default_bfloat16('xla')


def test_xla_implementation_under_remat_matches_the_default_attention():
  ref = _loss_and_grads(jnp.float32, 'default')
  got = _loss_and_grads(jnp.float32, 'xla', ref[0], remat='full')
  _assert_close(got, ref, rtol=2e-5, atol=1e-5)


def test_unknown_implementation_float32_cudnn_cpu_cudnn_and_dropout_are_refused():
  with pytest.raises(ValueError, match="attention_implementation must be one of .*'cudnn'"):
    network.make_config('tiny', attention_implementation='flash')
  with pytest.raises(ValueError, match="'cudnn'.* needs dtype bfloat16 or float16, got "
                                     "dtype=float32"):
    network.make_config('tiny', attention_implementation='cudnn')
  enc, dec_in, dec_t = _batch()
  if jax.default_backend() != 'gpu':
    model = network.Transformer(network.make_config(
        'tiny', dtype='bfloat16', attention_implementation='cudnn'))
    with pytest.raises(ValueError, match="needs an NVIDIA GPU .*traced for 'cpu'"):
      model.init(jax.random.PRNGKey(0), enc, dec_in[::_GROUPS], dec_t[::_GROUPS],
                 enable_dropout=False)
  model = network.Transformer(network.make_config(
      'tiny', attention_implementation='xla', dropout_rate=0.1))
  with pytest.raises(ValueError, match='no dropout on the attention weights'):
    model.init({'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)},
               enc, dec_in[::_GROUPS], dec_t[::_GROUPS], enable_dropout=True)


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN attention needs an NVIDIA GPU')
@pytest.mark.parametrize('remat', ['none', 'full'])
def test_cudnn_implementation_is_as_accurate_as_the_default_attention_on_the_gpu(remat):
  _assert_as_accurate_as_default_bfloat16('cudnn', remat)


def test_position_bias_with_grouped_queries_is_refused_with_the_shapes():
  """A position bias needs one query row per key row; grouped cross-attention (G
  summaries per prompt) has none in T5, so such a call is a wiring error, named so."""
  attn = network.MultiHeadDotProductAttention(num_heads=2, head_dim=4, implementation='xla')
  q = jnp.zeros((4, 3, 2, 4))  # 4 query rows ...
  kv = jnp.zeros((2, 5, 2, 4))  # ... for 2 key rows: 2 groups
  with pytest.raises(ValueError, match=r"position bias needs one query row per key row.*"
                                       r"got 4 query rows for 2 key rows"):
    attn._fused_attention(q, kv, kv, None, jnp.zeros((1, 2, 3, 5)), True)
  out = attn._fused_attention(q, kv, kv, None, None, True)  # without a bias: fine
  assert out.shape == (4, 3, 2, 4)
