"""Tests for slic_jax.network: T5X parameter tree, masking, caching, dtypes, remat, gin."""

import dataclasses
import functools
import pathlib

from flax import traverse_util
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slic_jax import matmul
from slic_jax import network

GIN_DIR = pathlib.Path(__file__).resolve().parents[1] / 'gin' / 'models'

# [B=2, Li=7] encoder tokens (0 = padding), decoder inputs/targets [B, Lt=5].
ENC = jnp.array([[5, 9, 33, 2, 17, 1, 0], [44, 3, 8, 1, 0, 0, 0]], jnp.int32)
TGT = jnp.array([[11, 12, 13, 14, 1], [21, 22, 23, 1, 0]], jnp.int32)
DEC = jnp.array([[0, 11, 12, 13, 14], [0, 21, 22, 23, 1]], jnp.int32)


def _init(cfg, rng=0):
  model = network.Transformer(cfg)
  init = jax.jit(lambda r: model.init(r, ENC, DEC, TGT, enable_dropout=False))
  return model, init(jax.random.PRNGKey(rng))


@pytest.fixture(scope='module')
def tiny():
  return _init(network.make_config('tiny'))


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, enc=ENC, dec=DEC, tgt=TGT, **kw):
  """Jitted teacher-forced logits [B, Lt, V] without dropout."""
  return model.apply({'params': params}, enc, dec, tgt, enable_dropout=False, **kw)


def _expected_t5x_tree(cfg):
  """{path: (shape, logical axes)} of T5X's t5_1_1 network for `cfg`."""
  d, v, f, hk = cfg.emb_dim, cfg.vocab_size, cfg.mlp_dim, cfg.num_heads * cfg.head_dim
  norm = ((d,), ('embed',))
  attn = {
      'query/kernel': ((d, hk), ('embed', 'joined_kv')),
      'key/kernel': ((d, hk), ('embed', 'joined_kv')),
      'value/kernel': ((d, hk), ('embed', 'joined_kv')),
      'out/kernel': ((hk, d), ('joined_kv', 'embed')),
  }
  mlp = {
      'wi_0/kernel': ((d, f), ('embed', 'mlp')),
      'wi_1/kernel': ((d, f), ('embed', 'mlp')),
      'wo/kernel': ((f, d), ('mlp', 'embed')),
  }
  relpos = ((cfg.num_heads, 32), ('heads', 'relpos_buckets'))
  tree = {
      'token_embedder/embedding': ((v, d), ('vocab', 'embed')),
      'encoder/relpos_bias/rel_embedding': relpos,
      'encoder/encoder_norm/scale': norm,
      'decoder/relpos_bias/rel_embedding': relpos,
      'decoder/decoder_norm/scale': norm,
      'decoder/logits_dense/kernel': ((d, v), ('embed', 'vocab')),
  }
  for i in range(cfg.num_encoder_layers):
    p = f'encoder/layers_{i}/'
    tree[p + 'pre_attention_layer_norm/scale'] = norm
    tree[p + 'pre_mlp_layer_norm/scale'] = norm
    tree.update({p + 'attention/' + k: s for k, s in attn.items()})
    tree.update({p + 'mlp/' + k: s for k, s in mlp.items()})
  for i in range(cfg.num_decoder_layers):
    p = f'decoder/layers_{i}/'
    for n in ('pre_self_attention', 'pre_cross_attention', 'pre_mlp'):
      tree[p + n + '_layer_norm/scale'] = norm
    for n in ('self_attention', 'encoder_decoder_attention'):
      tree.update({p + n + '/' + k: s for k, s in attn.items()})
    tree.update({p + 'mlp/' + k: s for k, s in mlp.items()})
  return tree


def test_param_tree_matches_t5x(tiny):
  model, variables = tiny
  cfg = model.config
  expected = _expected_t5x_tree(cfg)
  params = {'/'.join(k): v for k, v in traverse_util.flatten_dict(variables['params']).items()}
  axes = {'/'.join(k)[:-len('_axes')]: v.names
          for k, v in traverse_util.flatten_dict(variables['params_axes']).items()}
  assert set(params) == set(expected)
  assert {k: v.shape for k, v in params.items()} == {k: s for k, (s, _) in expected.items()}
  assert axes == {k: a for k, (_, a) in expected.items()}
  assert all(v.dtype == jnp.float32 for v in params.values())


def test_initialisers_match_t5x(tiny):
  model, variables = tiny
  cfg, p = model.config, variables['params']
  attn = p['encoder']['layers_0']['attention']
  d, k = cfg.emb_dim, cfg.head_dim
  np.testing.assert_allclose(np.std(attn['query']['kernel']), (d * k) ** -0.5, rtol=0.05)
  np.testing.assert_allclose(np.std(attn['key']['kernel']), d ** -0.5, rtol=0.05)
  np.testing.assert_allclose(np.std(p['token_embedder']['embedding']), 1.0, rtol=0.05)
  # Truncated normal (fan_in): |w| < 2 * d**-0.5 / 0.8796.
  wi = p['encoder']['layers_0']['mlp']['wi_0']['kernel']
  assert np.max(np.abs(wi)) < 2 * d ** -0.5 / 0.8796 + 1e-6
  np.testing.assert_allclose(np.std(wi), d ** -0.5, rtol=0.05)
  np.testing.assert_array_equal(p['decoder']['decoder_norm']['scale'], 1.0)


def test_logits_shape_and_dtype(tiny):
  model, variables = tiny
  logits = _apply(model, variables['params'])
  assert logits.shape == (2, 5, model.config.vocab_size)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


def test_relative_position_buckets():
  rel = np.arange(-200, 201)[None, :]
  bi = network.relative_position_bucket(rel, True, 32, 128)[0]
  uni = network.relative_position_bucket(rel, False, 32, 128)[0]
  at = lambda b, r: b[r + 200]
  # Exact buckets near 0: past keys (r < 0) use 0..7, future keys 16..23.
  assert [at(bi, r) for r in (0, -1, -7, 1, 7)] == [0, 1, 7, 17, 23]
  assert at(bi, -200) == 15 and at(bi, 200) == 31
  # Causal: future keys all bucket 0, distances 0..15 exact, far past -> 31.
  assert at(uni, 5) == 0 and at(uni, -15) == 15 and at(uni, -200) == 31
  assert np.all(np.diff(uni[:201]) <= 0)  # monotone in distance


@pytest.mark.parametrize('qlen,klen', [(1, 1), (1, 6), (5, 5), (3, 9), (9, 3), (40, 40),
                                       (300, 300), (20, 300), (300, 20)])
@pytest.mark.parametrize('bidirectional', [True, False])
def test_relative_bias_equals_per_position_gather(qlen, klen, bidirectional):
  """Forward = E[:, bucket(k - q)] exactly; backward = the gather's own transpose (sums)."""
  table = jax.random.normal(jax.random.PRNGKey(qlen * 31 + klen), (3, 32))
  rel = np.arange(klen)[None, :] - np.arange(qlen)[:, None]
  bucket = jnp.asarray(network.relative_position_bucket(rel, bidirectional, 32, 128))
  ref = lambda t: jnp.take(t, bucket, axis=1)
  got = lambda t: network.relative_bias(t, qlen, klen, bidirectional, 128)
  np.testing.assert_array_equal(got(table), ref(table))
  w = jax.random.normal(jax.random.PRNGKey(7), (3, qlen, klen))
  g_ref = jax.grad(lambda t: jnp.sum(ref(t) * w))(table)
  g = jax.jit(jax.grad(lambda t: jnp.sum(got(t) * w)))(table)
  # Same sums in another order (float32 rounding only).
  np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)
  assert float(jnp.abs(g_ref).sum()) > 0  # the check is not vacuous


def test_relative_bias_bfloat16_gradient_accumulates_in_float32():
  qlen = klen = 256
  table = jax.random.normal(jax.random.PRNGKey(0), (2, 32))
  w = jax.random.normal(jax.random.PRNGKey(1), (2, qlen, klen))
  grad = lambda dt: jax.jit(jax.grad(lambda t: jnp.sum(network.relative_bias(
      t.astype(dt), qlen, klen, True, 128).astype(jnp.float32) * w)))(table)
  exact, low = grad(jnp.float32), grad(jnp.bfloat16)
  # Sums of up to ~qlen·klen/2 terms: bf16 accumulation would be off by tens of percent.
  assert float(jnp.abs(low - exact).max()) < 0.01 * float(jnp.abs(exact).max())


@pytest.mark.parametrize('first,width', [(-2, 3), (-4, 9), (0, 2), (2, 3), (-7, 1)])
def test_band_of_diagonals(first, width):
  x = jnp.arange(2 * 4 * 5, dtype=jnp.float32).reshape(2, 4, 5) + 1
  band = np.asarray(network.band_of_diagonals(x, first, width))
  assert band.shape == (2, 4, width)
  for q in range(4):
    for i in range(width):
      k = q + first + i
      assert band[1, q, i] == (x[1, q, k] if 0 <= k < 5 else 0), (q, i)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_incremental_decode_matches_full_forward(tiny, dtype):
  model, variables = tiny
  if dtype == 'bfloat16':  # bf16 matmuls (slic_jax.matmul) in the cached decode path too
    model = network.Transformer(dataclasses.replace(
        model.config, dtype=dtype, logits_dtype=dtype))
  tol = 1e-5 if dtype == 'float32' else 0.15
  params = variables['params']
  tgt = jnp.array([[11, 12, 13, 14, 1], [21, 22, 23, 24, 25]], jnp.int32)
  dec = jnp.pad(tgt[:, :-1], ((0, 0), (1, 0)))
  full = _apply(model, params, dec=dec, tgt=tgt)
  batch, length = tgt.shape
  encoded = model.apply({'params': params}, ENC, enable_dropout=False, method=model.encode)
  cache = network.init_decoder_cache(model, batch, ENC.shape[1], length)

  @jax.jit
  def step(cache, token):
    logits, new = model.apply(
        {'params': params, 'cache': cache}, encoded, ENC, token, token,
        enable_dropout=False, decode=True, max_decode_length=length,
        mutable=['cache'], method=model.decode)
    return logits[:, 0], new['cache']

  steps = []
  for t in range(length):
    logits, cache = step(cache, dec[:, t:t + 1])
    steps.append(logits)
  steps = np.stack(steps, 1)
  np.testing.assert_allclose(steps, full, atol=tol, rtol=tol)
  np.testing.assert_array_equal(np.argmax(steps, -1), np.argmax(full, -1))
  assert int(cache['decoder']['layers_0']['self_attention']['cache_index']) == length


def test_decode_step_requires_max_decode_length(tiny):
  model, variables = tiny
  cache = network.init_decoder_cache(model, 2, ENC.shape[1], 4)
  encoded = jnp.zeros((2, ENC.shape[1], model.config.emb_dim))
  with pytest.raises(ValueError, match='max_decode_length'):
    model.apply({'params': variables['params'], 'cache': cache}, encoded, ENC,
                DEC[:, :1], DEC[:, :1], enable_dropout=False, decode=True,
                mutable=['cache'], method=model.decode)


def test_encoder_padding_invariance(tiny):
  model, variables = tiny
  params = variables['params']
  real_tgt = np.asarray(TGT > 0)  # padded targets are fully masked queries
  base = np.asarray(_apply(model, params))[real_tgt]
  longer = _apply(model, params, enc=jnp.pad(ENC, ((0, 0), (0, 4))))
  np.testing.assert_allclose(np.asarray(longer)[real_tgt], base, atol=1e-5, rtol=1e-5)
  # With segment ids, a token in a segment-0 (padding) slot is invisible.
  seg_kw = dict(encoder_segment_ids=(ENC > 0).astype(jnp.int32),
                decoder_segment_ids=(TGT > 0).astype(jnp.int32))
  with_seg = _apply(model, params, **seg_kw)
  np.testing.assert_allclose(np.asarray(with_seg)[real_tgt], base, atol=1e-5, rtol=1e-5)
  garbage = _apply(model, params, enc=ENC.at[1, 5].set(123), **seg_kw)
  np.testing.assert_allclose(np.asarray(garbage)[real_tgt], base, atol=1e-5, rtol=1e-5)


def test_decoder_causality_and_target_padding(tiny):
  model, variables = tiny
  params = variables['params']
  base = _apply(model, params)
  t = 2
  dec = DEC.at[:, t + 1].set(77)
  changed = _apply(model, params, dec=dec)
  np.testing.assert_allclose(changed[:, :t + 1], base[:, :t + 1], atol=1e-6)
  assert not np.allclose(changed[:, t + 1:], base[:, t + 1:], atol=1e-3)
  # Padded target position (row 1, last) does not influence real positions.
  dec = DEC.at[1, 4].set(99)
  np.testing.assert_allclose(_apply(model, params, dec=dec)[1, :4], base[1, :4], atol=1e-6)


def test_packed_segments_match_separate_examples(tiny):
  model, variables = tiny
  params = variables['params']
  enc_a, enc_b = jnp.array([5, 9, 33, 1]), jnp.array([44, 3, 1])
  tgt_a, tgt_b = jnp.array([11, 12, 1]), jnp.array([21, 22, 23, 1])
  shift = lambda t: jnp.pad(t[:-1], (1, 0))
  packed = _apply(
      model, params,
      enc=jnp.concatenate([enc_a, enc_b, jnp.zeros(1, jnp.int32)])[None],
      dec=jnp.concatenate([shift(tgt_a), shift(tgt_b), jnp.zeros(1, jnp.int32)])[None],
      tgt=jnp.concatenate([tgt_a, tgt_b, jnp.zeros(1, jnp.int32)])[None],
      encoder_segment_ids=jnp.array([[1, 1, 1, 1, 2, 2, 2, 0]]),
      decoder_segment_ids=jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]]))
  sep_a = _apply(model, params, enc=enc_a[None], dec=shift(tgt_a)[None], tgt=tgt_a[None])
  sep_b = _apply(model, params, enc=enc_b[None], dec=shift(tgt_b)[None], tgt=tgt_b[None])
  np.testing.assert_allclose(packed[0, :3], sep_a[0], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(packed[0, 3:7], sep_b[0], atol=1e-5, rtol=1e-5)


def test_bfloat16_activations_and_weights(tiny):
  model, variables = tiny
  params = variables['params']
  ref = _apply(model, params)
  bf_model = network.Transformer(dataclasses.replace(model.config, dtype='bfloat16'))
  logits = _apply(bf_model, params)
  assert logits.dtype == jnp.float32
  ref_lp, lp = jax.nn.log_softmax(ref), jax.nn.log_softmax(logits)
  assert np.max(np.abs(lp - ref_lp)) < 0.25
  assert np.mean(np.argmax(lp, -1) == np.argmax(ref_lp, -1)) >= 0.8

  bf_model = network.Transformer(
      network.make_config('tiny', weight_dtype='bfloat16', dtype='bfloat16'))
  bf_params = jax.eval_shape(lambda: bf_model.init(
      jax.random.PRNGKey(0), ENC, DEC, TGT, enable_dropout=False))['params']
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf_params))
  assert jax.eval_shape(_apply, bf_model, bf_params).dtype == jnp.float32


def test_dropout(tiny):
  model, variables = tiny
  drop_model = network.Transformer(dataclasses.replace(model.config, dropout_rate=0.3))
  params = variables['params']
  run = jax.jit(lambda enable, seed: drop_model.apply(
      {'params': params}, ENC, DEC, TGT, enable_dropout=enable,
      rngs={'dropout': jax.random.PRNGKey(seed)}), static_argnums=0)
  np.testing.assert_array_equal(run(False, 0), run(False, 1))
  np.testing.assert_allclose(run(False, 0), _apply(model, params), atol=1e-5)
  a, b = run(True, 0), run(True, 1)
  assert not np.allclose(a, b, atol=1e-3)
  np.testing.assert_array_equal(a, run(True, 0))


def _loss(model, params):
  """Teacher-forced sum of target log-probs."""
  logits = _apply(model, params)
  return jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(TGT, logits.shape[-1]))


# ... and its gradient.
_loss_and_grad = jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=0)


@pytest.mark.parametrize('policy', ['full', 'minimal'])
def test_remat_matches_no_remat(tiny, policy):
  model, variables = tiny
  params = variables['params']
  # The same float32 gradient layouts (`float32_matmul_vjp` resolves to off under remat):
  # otherwise the gradients differ in float32 summation order (~1e-4 relative).
  remat_model = network.Transformer(dataclasses.replace(
      model.config, remat_policy=policy,
      float32_matmul_vjp=model.config.float32_matmul_vjps))
  value, grads = _loss_and_grad(model, params)
  value_r, grads_r = _loss_and_grad(remat_model, params)
  np.testing.assert_allclose(value_r, value, rtol=1e-6)
  # atol 1e-5: on an AMD EPYC (AVX2) VM one of 16384 elements differed by 1.7e-6
  # (XLA:CPU's fusions of the two graphs sum in different orders).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               grads_r, grads)
  # Same parameter tree under remat.
  remat_params = jax.eval_shape(lambda: remat_model.init(
      jax.random.PRNGKey(0), ENC, DEC, TGT, enable_dropout=False))['params']
  assert jax.tree.structure(remat_params) == jax.tree.structure(params)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_weight_gradients_first_gives_the_same_gradients(tiny, dtype):
  """The tie (dx + 0 · dW[0]) changes when dW is computed, not what it is."""
  model, variables = tiny
  params = variables['params']
  base = dataclasses.replace(model.config, dtype=dtype)
  _assert_same_loss_and_gradients(dataclasses.replace(base, weight_grad_first=False),
                                  dataclasses.replace(base, weight_grad_first=True), params)


def _assert_same_loss_and_gradients(config, other, params, atol=1e-5, rtol=1e-5):
  value, grads = _loss_and_grad(network.Transformer(config), params)
  value_o, grads_o = _loss_and_grad(network.Transformer(other), params)
  np.testing.assert_allclose(value_o, value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol, rtol=rtol),
               grads_o, grads)


def test_weight_gradients_first_resolves_with_remat_and_the_platform(monkeypatch):
  """None: on with remat, and without remat where the step is traced for the CPU (here)."""
  from slic_jax import platforms
  assert network.make_config('tiny').weight_gradients_first
  assert not network.make_config('tiny', weight_grad_first=False).weight_gradients_first
  for platform in ('gpu', 'tpu'):
    monkeypatch.setattr(platforms, 'target_platform', lambda p=platform: p)
    assert not network.make_config('tiny').weight_gradients_first
    assert network.make_config('tiny', remat_policy='full').weight_gradients_first
    assert network.make_config('tiny', remat_policy='minimal').weight_gradients_first
    assert not network.make_config('tiny', remat_policy='full',
                                   weight_grad_first=False).weight_gradients_first
    assert network.make_config('tiny', weight_grad_first=True).weight_gradients_first


def test_the_cpu_step_computes_weight_gradients_first_by_default():
  """Without remat, traced for the CPU: each layer's weight gradients are tied to its
  input gradient (`matmul.weight_gradient_first`), so the compiled backward pass of the
  default config equals the one with weight_grad_first=True, not False."""
  enc = jnp.ones((2, 32), jnp.int32)
  dec = jnp.ones((2, 8), jnp.int32)

  def hlo(first):
    cfg = network.make_config('tiny', num_encoder_layers=2, num_decoder_layers=2,
                              weight_grad_first=first)
    model = network.Transformer(cfg)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), enc, dec, dec))['params']
    loss = lambda p: model.apply({'params': p}, enc, dec, dec).std()
    return jax.jit(jax.grad(loss)).lower(params).as_text()

  default, on, off = hlo(None), hlo(True), hlo(False)
  assert default == on
  assert default != off


def test_float32_matmul_vjp_resolves_with_remat():
  assert network.make_config('tiny').float32_matmul_vjps
  assert not network.make_config('tiny', remat_policy='full').float32_matmul_vjps
  assert not network.make_config('tiny', remat_policy='minimal').float32_matmul_vjps
  assert network.make_config('tiny', remat_policy='full',
                             float32_matmul_vjp=True).float32_matmul_vjps
  assert not network.make_config('tiny', float32_matmul_vjp=False).float32_matmul_vjps


@pytest.mark.parametrize('logits_via_embedding', [False, True])
def test_float32_matmul_vjp_gives_the_same_loss_and_gradients(tiny, logits_via_embedding):
  """The layouts of the float32 gradient matmuls change, not the gradients."""
  model, variables = tiny
  params = variables['params']
  base = dataclasses.replace(model.config, logits_via_embedding=logits_via_embedding)
  if logits_via_embedding:
    params = {k: v for k, v in params.items() if k != 'decoder'} | {
        'decoder': {k: v for k, v in params['decoder'].items() if k != 'logits_dense'}}
  _assert_same_loss_and_gradients(dataclasses.replace(base, float32_matmul_vjp=False),
                                  dataclasses.replace(base, float32_matmul_vjp=True), params,
                                  atol=1e-5, rtol=1e-4)


def test_attention_mask_bias_is_computed_once_not_in_every_layer():
  """matmul.materialized: on the CPU the mask bias (-1e10 where masked) is one array that
  every layer reads; without it XLA:CPU recomputes it from the tokens inside each
  layer's softmax fusions, so its constant would appear once per layer."""
  enc = jnp.ones((2, 64), jnp.int32).at[:, 60:].set(0)
  dec = jnp.ones((2, 8), jnp.int32)

  def mask_constants(layers):
    cfg = network.make_config('tiny', num_encoder_layers=layers, num_decoder_layers=layers)
    model = network.Transformer(cfg)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), enc, dec, dec))['params']
    hlo = jax.jit(lambda p: model.apply({'params': p}, enc, dec, dec)).lower(
        params).compile().as_text()
    return hlo.count('constant(-1e+10)')

  assert mask_constants(2) == mask_constants(6)


def test_materialized_is_the_identity_with_its_gradient():
  from slic_jax import matmul
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5))
  np.testing.assert_array_equal(jax.jit(matmul.materialized)(x), x)
  g = jax.grad(lambda x: jnp.sum(jnp.sin(matmul.materialized(x))))(x)
  np.testing.assert_allclose(g, jnp.cos(x), rtol=1e-6)


def test_weight_gradients_first_frees_each_layers_buffers_in_its_backward():
  """remat 'full', slic_jax's XLA options: without the tie XLA:CPU leaves the weight and
  position-bias gradients to the end and keeps every layer's buffers until then."""
  from slic_jax import compiler_options
  enc = jnp.ones((8, 256), jnp.int32)
  dec = jnp.ones((8, 32), jnp.int32)

  def temp_mb(first):
    cfg = network.make_config('tiny', num_encoder_layers=4, num_decoder_layers=4,
                              remat_policy='full', weight_grad_first=first)
    model = network.Transformer(cfg)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), enc, dec, dec))['params']
    loss = lambda p: model.apply({'params': p}, enc, dec, dec).std()
    compiled = jax.jit(jax.grad(loss), compiler_options=compiler_options.step_compiler_options(
        'cpu')).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2 ** 20

  tied, untied = temp_mb(True), temp_mb(False)
  assert tied < 0.6 * untied, (tied, untied)  # measured: 66 vs 152 MB


def test_the_vocabulary_projection_computes_its_weight_gradient_first_on_its_own_switch():
  """weight_grad_first (the CPU default) ties every projection's dW ahead of its dx
  (`matmul.weight_gradient_first`) except the vocabulary's: 11 ties for one layer each
  (encoder 4, decoder 7); logits_weight_grad_first adds the vocabulary's [D, V] one."""
  import re
  enc = jnp.ones((2, 16), jnp.int32)
  dec = jnp.ones((2, 8), jnp.int32)

  def jaxpr(first, **kw):
    cfg = network.make_config('tiny', num_encoder_layers=1, num_decoder_layers=1,
                              weight_grad_first=first, **kw)
    model = network.Transformer(cfg)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), enc, dec, dec))['params']
    return str(jax.make_jaxpr(lambda p: model.apply({'params': p}, enc, dec, dec))(params))

  d, v = network.make_config('tiny').emb_dim, network.make_config('tiny').vocab_size
  vocabulary_tie = re.compile(
      rf':f32\[{d},{v}\] = custom_vjp_call\[\s*name=weight_gradient_first')
  default, off = jaxpr(None), jaxpr(False)
  assert default.count('name=weight_gradient_first') == 11
  assert not vocabulary_tie.search(default)
  assert 'name=weight_gradient_first' not in off
  tied = jaxpr(None, logits_weight_grad_first=True)
  assert tied.count('name=weight_gradient_first') == 12
  assert vocabulary_tie.search(tied)


def test_make_config_sizes():
  expect = {
      'tiny': (512, 128, 4, 32, 2, 256), 'small': (32128, 512, 6, 64, 8, 1024),
      'base': (32128, 768, 12, 64, 12, 2048), 'large': (32128, 1024, 16, 64, 24, 2816),
      'xl': (32128, 2048, 32, 64, 24, 5120), 'xxl': (32128, 4096, 64, 64, 24, 10240)}
  for size, (v, d, h, k, n, f) in expect.items():
    cfg = network.make_config(size)
    assert (cfg.vocab_size, cfg.emb_dim, cfg.num_heads, cfg.head_dim,
            cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.mlp_dim) == (v, d, h, k, n, n, f)
  assert network.make_config('base', dropout_rate=0.1).dropout_rate == 0.1
  assert network.make_config('tiny', dtype='bfloat16').dtype == jnp.bfloat16
  with pytest.raises(ValueError):
    network.make_config('huge')
  with pytest.raises(ValueError):
    network.make_config('tiny', remat_policy='sometimes')


@pytest.mark.parametrize('size', ['tiny', 'small', 'base', 'large', 'xl', 'xxl'])
def test_gin_model_files(size):
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings(
        [str(GIN_DIR / f't5_1_1_{size}.gin')],
        ['DROPOUT_RATE = 0.1', "network.T5Config.dtype = 'bfloat16'"])
    transformer = gin.query_parameter('%NETWORK').scoped_configurable_fn()
  finally:
    gin.clear_config()
  assert isinstance(transformer, network.Transformer)
  expected = network.make_config(size, dropout_rate=0.1, dtype='bfloat16')
  assert transformer.config == expected


def test_gin_plain_bindings():
  gin.clear_config()
  try:
    gin.parse_config("network.T5Config.emb_dim = 128\nnetwork.T5Config.weight_dtype = 'bfloat16'")
    cfg = network.T5Config()
  finally:
    gin.clear_config()
  assert cfg.emb_dim == 128 and cfg.weight_dtype == jnp.bfloat16


def test_fused_projection_equals_separate_matmuls():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
  ws = [jax.random.normal(jax.random.PRNGKey(i), (8, 6)) for i in range(1, 4)]
  outs = network.fused_projection(x, ws, jnp.float32)
  assert len(outs) == 3
  for y, w in zip(outs, ws):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dtype, tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_fused_projection_gradients_match_separate_matmuls(dtype, tol):
  """The split's VJP (one stack of the cotangents) = the gradients of n separate matmuls."""
  from slic_jax import matmul
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
  ws = [jax.random.normal(jax.random.PRNGKey(i), (8, 6)) for i in range(1, 4)]
  c = [jax.random.normal(jax.random.PRNGKey(10 + i), (2, 5, 6)) for i in range(3)]

  def loss(fn, x, ws):
    return sum(jnp.sum(y.astype(jnp.float32) * ci) for y, ci in zip(fn(x, ws), c))

  fused = lambda x, ws: network.fused_projection(x, ws, dtype)
  separate = lambda x, ws: [matmul.dense(x, w, dtype=dtype) for w in ws]
  g_fused = jax.grad(functools.partial(loss, fused), argnums=(0, 1))(x, ws)
  g_sep = jax.grad(functools.partial(loss, separate), argnums=(0, 1))(x, ws)
  for a, b in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_sep)):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
  hlo = jax.jit(jax.grad(functools.partial(loss, fused))).lower(x, ws).as_text()
  assert ' pad(' not in hlo and 'stablehlo.pad' not in hlo  # no pad-and-add of cotangents


@pytest.mark.parametrize('acts', [('gelu', 'linear'), ('relu',), ('gelu', 'linear', 'gelu')])
def test_gated_activation_low_precision_vjp(acts):
  """bf16: value and stacked gradient [..., n, F] match float32 autodiff of the product."""
  y = jax.random.normal(jax.random.PRNGKey(0), (2, 3, len(acts), 16)).astype(jnp.bfloat16)
  g = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 16))
  yf = y.astype(jnp.float32)
  ref, vjp_ref = jax.vjp(lambda v: network._gated_f32(v, acts), yf)  # plain autodiff
  out, vjp = jax.vjp(lambda v: network.gated_activation(v, acts, jnp.bfloat16), y)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=1e-2, atol=1e-2)
  (d_ref,) = vjp_ref(g.astype(jnp.bfloat16).astype(jnp.float32))
  (d,) = vjp(g.astype(jnp.bfloat16))
  assert d.dtype == jnp.bfloat16 and d.shape == y.shape
  np.testing.assert_allclose(np.asarray(d, np.float32), d_ref, rtol=2e-2, atol=2e-2)
  assert float(jnp.abs(d_ref).max()) > 0.1
  with pytest.raises(ValueError, match='2 activations for 3 stacked'):
    network.gated_activation(jnp.zeros((4, 3, 8)), ('gelu', 'linear'), jnp.bfloat16)


@pytest.mark.parametrize('acts', [('gelu', 'linear'), ('relu',)])
def test_gated_activation_float32_vjp_is_autodiff(acts):
  """float32: the recomputing VJP gives autodiff's value and gradient (to rounding)."""
  y = jax.random.normal(jax.random.PRNGKey(0), (2, 3, len(acts), 16)) * 2
  g = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 16))
  ref, vjp_ref = jax.vjp(lambda v: network._gated_f32(v, acts), y)
  out, vjp = jax.vjp(lambda v: network.gated_activation(v, acts, jnp.float32), y)
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
  (d,), (d_ref,) = vjp(g), vjp_ref(g)
  assert d.dtype == jnp.float32 and d.shape == y.shape
  np.testing.assert_allclose(d, d_ref, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(d_ref).max()) > 0.5


def test_mlp_block_bfloat16_activation_in_float32():
  """bf16: the GELU and the gating product are computed in float32, rounded to bf16 once."""
  from slic_jax import matmul
  cfg = network.make_config('tiny', emb_dim=8, mlp_dim=12, dtype='bfloat16')
  block = network.MlpBlock(cfg)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8)).astype(jnp.bfloat16)
  variables = block.init(jax.random.PRNGKey(1), x)
  p = variables['params']
  h0 = matmul.dense(x, p['wi_0']['kernel'], dtype=jnp.bfloat16).astype(jnp.float32)
  h1 = matmul.dense(x, p['wi_1']['kernel'], dtype=jnp.bfloat16).astype(jnp.float32)
  hidden = (jax.nn.gelu(h0) * h1).astype(jnp.bfloat16)
  expected = matmul.dense(hidden, p['wo']['kernel'], dtype=jnp.bfloat16)
  got = block.apply(variables, x)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32),
                             rtol=1e-2, atol=1e-2)


def test_mlp_block_is_gated_gelu_of_its_two_kernels():
  """The fused wi_0/wi_1 matmul computes T5 1.1's W_o (gelu(x W_0) * (x W_1))."""
  cfg = network.make_config('tiny', emb_dim=8, mlp_dim=12)
  block = network.MlpBlock(cfg)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8))
  variables = block.init(jax.random.PRNGKey(1), x)
  p = variables['params']
  assert set(p) == {'wi_0', 'wi_1', 'wo'}
  expected = (jax.nn.gelu(x @ p['wi_0']['kernel']) * (x @ p['wi_1']['kernel'])) @ p['wo']['kernel']
  np.testing.assert_allclose(np.asarray(block.apply(variables, x)), np.asarray(expected),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('logits_dtype', ['float32', 'bfloat16'])
def test_bfloat16_gradients_close_to_float32(tiny, logits_dtype):
  """bf16 matmuls with f32 accumulation (slic_jax.matmul): loss and gradients near f32."""
  model, variables = tiny
  params = variables['params']
  bf_model = network.Transformer(dataclasses.replace(
      model.config, dtype='bfloat16', logits_dtype=logits_dtype))
  value, grads = _loss_and_grad(model, params)
  value_b, grads_b = _loss_and_grad(bf_model, params)
  assert abs(float(value_b) - float(value)) < 0.02 * abs(float(value))
  flat, flat_b = jax.tree.leaves(grads), jax.tree.leaves(grads_b)
  assert all(g.dtype == jnp.float32 for g in flat_b)
  for g, gb in zip(flat, flat_b):
    rel = np.linalg.norm(np.asarray(gb) - np.asarray(g)) / (np.linalg.norm(np.asarray(g)) + 1e-12)
    assert rel < 0.08, rel
    assert np.sum(np.asarray(g) * np.asarray(gb)) > 0.99 * (
        np.linalg.norm(np.asarray(g)) * np.linalg.norm(np.asarray(gb))) - 1e-12


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU lowering check')
@pytest.mark.parametrize('dots,widen_min', [('native', None), ('float32', None), ('float32', 0)])
def test_bfloat16_training_step_has_only_bfloat16_dots(tiny, low_precision_dots, dots,
                                                        widen_min):
  """With dtype = logits_dtype = bf16, every dot of forward + backward is bf16 × bf16;
  on a CPU without native bf16 dots (`platforms.cpu_low_precision_dots` 'float32') every
  one that does at least `matmul.WIDEN_MIN_FLOPS_PER_ELEMENT` FLOPs per operand element
  is float32 × float32 (the rounded operands widened) and the others bf16 × bf16 (all of
  them widened with the threshold 0); none left mixed."""
  import re
  low_precision_dots(dots, widen_min)
  model, variables = tiny
  bf_model = network.Transformer(dataclasses.replace(
      model.config, dtype='bfloat16', logits_dtype='bfloat16'))
  # A fresh jit: `_loss_and_grad`'s trace cache would not see the environment change.
  step = jax.jit(jax.value_and_grad(lambda p: _loss(bf_model, p)))
  hlo = step.lower(variables['params']).compile().as_text()
  types = {name: (dtype, [int(n) for n in dims.split(',') if n]) for name, dtype, dims in
           re.findall(r'^\s*(?:ROOT )?(%\S+) = (\w+)\[([^\]]*)\]', hlo, re.M)}
  found = []  # ([(dtype, dims) of each operand], FLOPs per operand element)
  for out, operands, contracting in re.findall(
      r'= f32\[([\d,]*)\]\S* dot\(([^)]*)\), .*?lhs_contracting_dims=\{([\d,]*)\}', hlo):
    ops = [types.get(o.strip()) for o in operands.split(',')]
    flops = 2 * np.prod([int(n) for n in out.split(',') if n]) * np.prod(
        [ops[0][1][int(i)] for i in contracting.split(',') if i])
    found.append((ops, flops / sum(np.prod(dims) for _, dims in ops)))
  # Besides the model's matmuls, float32 sums and broadcasts may be dots with a ones
  # vector (matmul.sum_by_dot / broadcast_by_dot: an operand of rank 1 or with a
  # dimension of 1; at these tiny sizes XLA turns most of them back into reductions).
  vector = lambda dims: len(dims) <= 1 or 1 in dims
  model_dots = [d for d in found if not any(vector(dims) for _, dims in d[0])]
  sums = [d for d, _ in found if any(vector(dims) for _, dims in d)]
  assert len(model_dots) >= 3 * 6
  threshold = matmul.WIDEN_MIN_FLOPS_PER_ELEMENT
  expected = lambda fpe: 'f32' if dots == 'float32' and fpe >= threshold else 'bf16'
  bad = [d for d in model_dots if [dtype for dtype, _ in d[0]] != [expected(d[1])] * 2]
  assert not bad, bad[:3]
  kinds = {expected(fpe) for _, fpe in model_dots}
  # The tiny model has dots on both sides of the default threshold.
  assert kinds == ({'bf16'} if dots == 'native' else {'f32'} if widen_min == 0 else
                   {'bf16', 'f32'}), sorted(fpe for _, fpe in model_dots)
  assert all(dtype == 'f32' for d in sums for dtype, _ in d), sums[:3]


def test_attention_softmax_low_precision_vjp():
  """bf16 probabilities; dlogits = p ⊙ (g − Σ p g) from the bf16 p, close to float32's."""
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 9)) * 3
  g = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 4, 9))
  p, vjp = jax.vjp(lambda x: network.attention_softmax(x, jnp.bfloat16), logits)
  (d,) = vjp(g.astype(jnp.bfloat16))
  p_ref, vjp_ref = jax.vjp(jax.nn.softmax, logits)
  (d_ref,) = vjp_ref(g.astype(jnp.bfloat16).astype(jnp.float32))
  assert p.dtype == jnp.bfloat16 and d.dtype == jnp.float32
  np.testing.assert_allclose(p.astype(jnp.float32), p_ref, atol=4e-3)
  np.testing.assert_allclose(d, d_ref, atol=2e-2, rtol=2e-2)
  assert np.abs(np.asarray(d).sum(-1)).max() < 1e-2  # softmax gradients sum to ~0 per row
  # float32 is jax.nn.softmax exactly.
  np.testing.assert_array_equal(network.attention_softmax(logits, jnp.float32), p_ref)


def test_softmax_weighted_values():
  """o = softmax(logits) v; float32 (normalised after the matmul) and bf16 VJPs ~ autodiff."""
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  logits = jax.random.normal(k[0], (2, 3, 5, 7)) * 3
  logits = logits.at[0, :, :, 6].set(-1e10)  # a masked key, as the attention masks add
  value = jax.random.normal(k[1], (2, 7, 3, 4)).astype(jnp.bfloat16).astype(jnp.float32)
  g = jax.random.normal(k[2], (2, 5, 3, 4)).astype(jnp.bfloat16)

  def unfused(dtype):
    return lambda l, v: matmul.einsum('bhqk,bkhd->bqhd', network.attention_softmax(l, dtype),
                                      v, dtype=dtype)

  fused = lambda dtype: lambda l, v: network.softmax_weighted_values(l, v, dtype)
  o32, vjp32 = jax.vjp(unfused(jnp.float32), logits, value)  # plain autodiff
  o, vjp = jax.vjp(fused(jnp.float32), logits, value)
  np.testing.assert_allclose(o, o32, rtol=1e-5, atol=1e-6)
  for a, b in zip(vjp(g.astype(jnp.float32)), vjp32(g.astype(jnp.float32))):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))
  assert float(jnp.abs(vjp(g.astype(jnp.float32))[0][0, :, :, 6]).max()) == 0.0  # masked

  o16, vjp16 = jax.vjp(fused(jnp.bfloat16), logits, value)
  np.testing.assert_array_equal(o16, unfused(jnp.bfloat16)(logits, value))  # same forward
  dl, dv = vjp16(g)
  dl32, dv32 = vjp32(g.astype(jnp.float32))
  assert dl.dtype == dv.dtype == jnp.float32
  # dlogits leaves in bf16 values (rounded once; the position-bias gradient sums those).
  np.testing.assert_array_equal(dl, dl.astype(jnp.bfloat16).astype(jnp.float32))
  scale = float(jnp.abs(dl32).max())
  assert float(jnp.abs(dl - dl32).max()) < 2e-2 * scale  # bf16 rounding of p, o only
  np.testing.assert_allclose(dv, dv32, atol=2e-2 * float(jnp.abs(dv32).max()))
  # The row term is large next to that tolerance: dropping it would fail the check.
  row = jnp.einsum('bqhd,bqhd->bhq', g.astype(jnp.float32), o32)[..., None]
  assert float(jnp.abs(row).max()) > 20 * float(jnp.abs(dl - dl32).max())


@pytest.mark.parametrize('with_mask', [True, False])
def test_add_position_bias_is_the_broadcast_sum_with_its_gradients(with_mask):
  """Values and gradients of the plain broadcast sum (the values passed through); the tie:
  a NaN in the bias gradient's first element reaches the values' cotangent, all of it,
  and leaves dlogits alone."""
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  logits = jax.random.normal(k[0], (2, 3, 5, 7))
  mask = jnp.where(jax.random.bernoulli(k[1], 0.7, (2, 1, 5, 7)), 0.0, -1e10) if with_mask else None
  bias = jax.random.normal(k[2], (1, 3, 5, 7))
  value = jax.random.normal(k[3], (2, 7, 3, 4))

  def plain(l, b, v):
    return (l + (b if mask is None else mask + b)) ** 2 / 1e20, v

  def tied(l, b, v):
    s, v = network.add_position_bias(l, mask, b, v)
    return s ** 2 / 1e20, v

  for got, want in zip(tied(logits, bias, value), plain(logits, bias, value)):
    np.testing.assert_array_equal(got, want)
  total = lambda f: lambda l, b, v: f(l, b, v)[0].sum() + jnp.sum(f(l, b, v)[1] * v)
  g_plain = jax.grad(total(plain), argnums=(0, 1, 2))(logits, bias, value)
  g_tied = jax.grad(total(tied), argnums=(0, 1, 2))(logits, bias, value)
  for a, b in zip(g_tied, g_plain):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-30)
  _, vjp = jax.vjp(lambda l, b, v: network.add_position_bias(l, None, b, v), logits, bias, value)
  g_logits = jnp.ones_like(logits).at[1, 0, 0, 0].set(jnp.inf).at[0, 0, 0, 0].set(-jnp.inf)
  d_logits, d_bias, d_value = vjp((g_logits, jnp.ones_like(value)))
  assert bool(jnp.isnan(d_bias[0, 0, 0, 0]))  # inf + (−inf): the sum's first element
  np.testing.assert_array_equal(d_logits, g_logits)
  assert bool(jnp.isnan(d_value).all())


def test_float32_attention_keeps_one_score_sized_residual():
  """float32 softmax·V keeps e = exp(logits − max) only, not p and e (memory per layer)."""
  from jax._src import ad_checkpoint
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5, 7))
  value = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 3, 4))
  f = lambda l, v: network.softmax_weighted_values(l, v, jnp.float32).sum()
  saved = [aval.shape for aval, _ in ad_checkpoint.saved_residuals(f, logits, value)]
  assert saved.count((2, 3, 5, 7)) == 1, saved
  # softmax's own autodiff followed by the matmul keeps p and exp(logits − max): two.
  unfused = lambda l, v: matmul.einsum('bhqk,bkhd->bqhd', network.attention_softmax(
      l, jnp.float32), v, dtype=jnp.float32).sum()
  saved = [aval.shape for aval, _ in ad_checkpoint.saved_residuals(unfused, logits, value)]
  assert saved.count((2, 3, 5, 7)) == 2, saved


@pytest.mark.parametrize('policy', ['full', 'minimal'])
def test_remat_with_bfloat16_matmuls(tiny, policy):
  """remat recomputes the bf16 matmuls (custom VJPs inside checkpointed layers)."""
  model, variables = tiny
  params = variables['params']
  base = dataclasses.replace(model.config, dtype='bfloat16', logits_dtype='bfloat16')
  value, grads = _loss_and_grad(network.Transformer(base), params)
  value_r, grads_r = _loss_and_grad(
      network.Transformer(dataclasses.replace(base, remat_policy=policy)), params)
  np.testing.assert_allclose(value_r, value, rtol=1e-3)
  for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads)):
    # The recomputation may round to bf16 at other points than the first pass.
    assert np.linalg.norm(a - b) <= 0.03 * np.linalg.norm(b) + 1e-6
