"""T5 1.1 encoder-decoder Transformer in Flax linen, with T5X's parameter tree.

The module tree, parameter names/shapes, logical axis names and call signatures
(`encode`, `decode`, `__call__`) are those of T5X's `t5x/examples/t5/network.py`,
so T5X checkpoints load into it and t5x can drive it. Shapes use
B = batch, Li = encoder length, Lt = decoder length, D = emb_dim, H = num_heads,
K = head_dim, F = mlp_dim, V = vocab_size.

Parameters (all without bias)::

  token_embedder/embedding                         [V, D]    ('vocab', 'embed')
  encoder/relpos_bias/rel_embedding                [H, 32]   ('heads', 'relpos_buckets')
  encoder/layers_i/pre_attention_layer_norm/scale  [D]       ('embed',)
  encoder/layers_i/attention/{query,key,value}/kernel [D, H*K] ('embed', 'joined_kv')
  encoder/layers_i/attention/out/kernel            [H*K, D]  ('joined_kv', 'embed')
  encoder/layers_i/pre_mlp_layer_norm/scale        [D]
  encoder/layers_i/mlp/{wi_0,wi_1}/kernel          [D, F]    ('embed', 'mlp')
  encoder/layers_i/mlp/wo/kernel                   [F, D]    ('mlp', 'embed')
  encoder/encoder_norm/scale                       [D]
  decoder/relpos_bias/rel_embedding                [H, 32]
  decoder/layers_i/{pre_self_attention_layer_norm, self_attention,
                    pre_cross_attention_layer_norm, encoder_decoder_attention,
                    pre_mlp_layer_norm, mlp}/...
  decoder/decoder_norm/scale                       [D]
  decoder/logits_dense/kernel                      [D, V]    ('embed', 'vocab')

Gin: `T5Config` is registered as `network.T5Config` (and dynamic registration
`from slic_jax import network` works too). The dtype fields accept strings
('float32', 'bfloat16') as T5X gin files write them; `__post_init__` turns them
into `jnp.dtype`s.
"""

import dataclasses
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
from flax.linen import partitioning as nn_partitioning
import gin
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from slic_jax import blocked_attention
from slic_jax import data_shards
from slic_jax import fused_softmax
from slic_jax import matmul
from slic_jax import platforms

param_with_axes = nn_partitioning.param_with_axes
with_sharding_constraint = nn_partitioning.with_sharding_constraint

# T5X initialisers.
_attention_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')
_dense_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')
_relpos_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform')
_embedding_init = nn.initializers.normal(stddev=1.0)

# Additive attention bias for masked-out keys (as T5X).
_MASK_BIAS = -1e10


@gin.configurable(module='network')
@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters of a T5 1.1 model (defaults: T5 1.1 small shape, 8 layers).

  Attributes:
    vocab_size: V, rows of the token embedding and columns of the logits.
    dtype: activation/computation dtype (`jnp.dtype` or a string such as 'bfloat16').
      Matmuls round their operands to it and accumulate in float32, backward pass
      included (`slic_jax.matmul`).
    weight_dtype: dtype the parameters are created and stored in.
    logits_dtype: compute dtype of the vocabulary projection (the logits themselves are
      always float32, and so is the log-softmax). 'float32' as T5X; 'bfloat16' rounds
      the final decoder state and the logits kernel, accumulating in float32.
    emb_dim: D. num_heads: H. head_dim: K. mlp_dim: F.
    num_encoder_layers / num_decoder_layers: stack depths.
    mlp_activations: one activation per `wi_{i}` branch, multiplied together;
      ('gelu', 'linear') is T5 1.1's gated GELU. Names are `flax.linen` functions.
    dropout_rate: dropout after embeddings, attention weights, attention/MLP
      outputs and the final norms, only when `enable_dropout=True` (rng 'dropout').
    logits_via_embedding: tie the output layer to the embedding (T5 1.0); the
      logits are then divided by sqrt(D). T5 1.1 uses False.
    float32_attention_logits: compute q.k and the softmax in float32.
    relative_attention_num_buckets / relative_attention_max_distance: T5 buckets.
    remat_policy: 'none', 'full' (recompute every layer in the backward pass) or
      'minimal' (keep matmul outputs, recompute the rest).
    weight_grad_first: in the backward pass, compute each projection's weight gradient
      (and the relative position bias's; not the vocabulary projection's, see
      `logits_weight_grad_first`) before passing the input gradient on
      (`matmul.weight_gradient_first`, `add_position_bias`), so that each layer's
      matmul inputs and cotangents are freed in that layer. None (default): on with
      remat, where the backward pass holds the step's peak memory (T5 1.1 small, 4
      pairs, remat 'full': 1313 -> 795 MB of XLA buffers at the peak, parameters
      included, float32; bf16 1028 -> 601 MB; `tools/step_peak_buffers.sh`). Without
      remat on where the step is traced for the CPU (`platforms.target_platform`):
      there XLA:CPU's peak with it, the vocabulary projection's tie left out, is never
      higher and often lower (4 pairs, Li 512: float32 1366 -> 1263 MB, bf16 980 -> 960;
      Li 1024 float32 2526 -> 2384; 16 pairs level), and the step is no slower
      (`tools/ab_steps.py`: float32 0.951 of the step time, bf16 0.986;
      `benchmarks/NOTES.md`, session 43); off on other
      backends, where it was never measured without remat (in session 12 it raised
      the CPU's bf16 peak by 123 MB, before later changes to the backward pass).
    logits_weight_grad_first: the same for the vocabulary projection (`Decoder`), on
      its own switch: off by default. On, dW [D, V] is computed before dy and then
      lives from the start of the backward pass beside the saved activations: XLA:CPU's
      peak +62 MB (T5 1.1 small, 4 pairs, float32; 16 pairs +59; bf16 level), for a
      speed change not shown on the 2-core CPU (`tools/ab_steps.py`: 0.987 and 1.030 of
      the step time; `benchmarks/NOTES.md`, session 43).
    float32_matmul_vjp: float32 on the CPU: the projections', attention's and the
      logits' matmul gradients in the layouts `matmul.einsum(float32_vjp=True)` picks,
      not XLA's (T5 1.1 small, 4 pairs, float32: step 2.86 -> 2.60 s, peak RSS 2056 ->
      2005 MB; 16 pairs: 4445 -> 4101 MB of XLA buffers at the peak;
      `benchmarks/NOTES.md`, session 15). None (default): on iff remat_policy ==
      'none': under remat its custom VJPs change XLA:CPU's schedule of the
      recomputation, which then holds several layers' recomputed activations at once
      (16 pairs, remat 'full': 1358 -> 1874 MB at the peak, `tools/step_peak_buffers.sh`).
      No effect in other dtypes (always through the custom VJP) or on other backends.
    attention_block_bytes: attention over blocks of queries whose float32 logits
      [B, H, block, Lk] take at most this many bytes (`blocked_attention`; exact, same
      memory), when the whole [B, H, Lq, Lk] array is larger and attention is
      deterministic. 0 (default): off. Not faster in the SLiC-HF step on the CPUs
      measured (T5 1.1 small, float32, 4 pairs, Li 1024: 12.7 s unblocked, 13.8 s at
      32 MiB, 21.6 s at 4 MiB, `tools/benchmark.py --_worker slic
      --attention_block_bytes N`; `benchmarks/NOTES.md`, session 16).
    attention_implementation: how softmax(q k^T + bias) v is computed outside decoding.
      'default': this module's einsums and custom VJPs (float32 logits and softmax,
      `softmax_weighted_values`, `add_position_bias`; the only path tuned for XLA:CPU).
      'cudnn': `jax.nn.dot_product_attention(implementation='cudnn')`, cuDNN's fused
      (flash) attention on NVIDIA GPUs: q, k, v and the bias (mask and position bias,
      rounded to `dtype`) in bfloat16 or float16, the logits never materialised.
      'xla': the same call with jax's XLA implementation (float32 logits; any backend),
      the reference the 'cudnn' path is checked against. Both need deterministic
      attention (no dropout on the weights) and ignore `attention_block_bytes`.
      'fused_softmax': the encoder's self-attention (packed or not) with the softmax
      passes between its two matmuls fused into one CPU kernel per direction
      (`fused_softmax`, compiled from `slic_jax/csrc/fused_softmax.cc` on first use;
      dtype bfloat16 or float32, float32 logits, deterministic attention); the position
      bias as one value per diagonal. Everything else as 'default'. T5 1.1 small, 4 pairs,
      bf16, on a 2-core AMD EPYC Zen 4: 3.58 against 3.79 s per step at Li 1024 (median
      of six runs each), the same at Li 512 (2.11 against 2.125 s); float32, the two run
      in turn: 2.88 against 2.94 s at Li 512, 5.46 against 5.86 s at Li 1024 (fastest of
      four; `tools/benchmark.py --sweep_attention`, `--rows`; `benchmarks/NOTES.md`,
      sessions 32–33).
      On an NVIDIA H200 (T5 1.1 small, bf16, 32 pairs, Li 512, Lt 64; two calls of
      `benchmarks/gpu_h200_session24/`): 'cudnn' 1073 / 1091 against 818 / 882 pairs/s,
      peak device memory 3982 against 6854 MB; with remat 'full' 1002 against 800
      pairs/s, 1592 against 1851 MB (one call).
  """

  vocab_size: int = 32128
  dtype: Any = jnp.float32
  weight_dtype: Any = jnp.float32
  logits_dtype: Any = jnp.float32
  emb_dim: int = 512
  num_heads: int = 6
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  head_dim: int = 64
  mlp_dim: int = 1024
  mlp_activations: Sequence[str] = ('gelu', 'linear')
  dropout_rate: float = 0.0
  logits_via_embedding: bool = False
  float32_attention_logits: bool = True
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  remat_policy: str = 'none'
  weight_grad_first: Optional[bool] = None
  logits_weight_grad_first: bool = False
  float32_matmul_vjp: Optional[bool] = None
  attention_block_bytes: int = 0
  attention_implementation: str = 'default'

  @property
  def float32_matmul_vjps(self) -> bool:
    """`float32_matmul_vjp`, resolved: None means on iff remat_policy == 'none'."""
    if self.float32_matmul_vjp is None:
      return self.remat_policy == 'none'
    return bool(self.float32_matmul_vjp)

  @property
  def weight_gradients_first(self) -> bool:
    """`weight_grad_first`, resolved: None means on with remat or on the CPU.

    The platform is the step's (`platforms.target_platform`), read where the layers are
    built, i.e. while the step is traced.
    """
    if self.weight_grad_first is None:
      return self.remat_policy != 'none' or platforms.target_platform() == 'cpu'
    return bool(self.weight_grad_first)

  def __post_init__(self):
    object.__setattr__(self, 'dtype', jnp.dtype(self.dtype))
    object.__setattr__(self, 'weight_dtype', jnp.dtype(self.weight_dtype))
    object.__setattr__(self, 'logits_dtype', jnp.dtype(self.logits_dtype))
    object.__setattr__(self, 'mlp_activations', tuple(self.mlp_activations))
    if self.attention_implementation not in _ATTENTION_IMPLEMENTATIONS:
      raise ValueError(
          f'attention_implementation must be one of {sorted(_ATTENTION_IMPLEMENTATIONS)}, '
          f'got {self.attention_implementation!r}')
    if (self.attention_implementation == 'cudnn'
        and self.dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))):
      raise ValueError(
          f"attention_implementation='cudnn' (cuDNN's fused attention) needs dtype "
          f"bfloat16 or float16, got dtype={self.dtype.name}; use 'default' or 'xla' "
          f"for {self.dtype.name}")
    if self.attention_implementation == 'fused_softmax' and (
        self.dtype.name not in ('bfloat16', 'float32') or not self.float32_attention_logits):
      raise ValueError(
          f"attention_implementation='fused_softmax' (the CPU softmax kernels) takes "
          f"float32 logits and gives probabilities in dtype: it needs dtype bfloat16 or "
          f"float32 and float32_attention_logits=True, got dtype={self.dtype.name}, "
          f"float32_attention_logits={self.float32_attention_logits}; use 'default'")
    if self.remat_policy not in _REMAT_POLICIES:
      raise ValueError(
          f'remat_policy must be one of {sorted(_REMAT_POLICIES)}, '
          f'got {self.remat_policy!r}')


_ATTENTION_IMPLEMENTATIONS = ('default', 'cudnn', 'xla', 'fused_softmax')

_REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'minimal': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

_SIZES = {
    # name: (emb_dim, num_heads, layers (enc = dec), mlp_dim)
    'small': (512, 6, 8, 1024),
    'base': (768, 12, 12, 2048),
    'large': (1024, 16, 24, 2816),
    'xl': (2048, 32, 24, 5120),
    'xxl': (4096, 64, 24, 10240),
}


def make_config(size: str, **overrides) -> T5Config:
  """T5 1.1 config of a named size ('tiny', 'small', ..., 'xxl') with overrides.

  'tiny' (vocab 512, D 128, H 4, K 32, 2+2 layers, F 256) is for tests; the
  others are the published T5 1.1 shapes with vocab 32128 and K 64.
  """
  if size == 'tiny':
    base = dict(vocab_size=512, emb_dim=128, num_heads=4, head_dim=32,
                num_encoder_layers=2, num_decoder_layers=2, mlp_dim=256)
  elif size in _SIZES:
    emb, heads, layers, mlp = _SIZES[size]
    base = dict(vocab_size=32128, emb_dim=emb, num_heads=heads, head_dim=64,
                num_encoder_layers=layers, num_decoder_layers=layers, mlp_dim=mlp)
  else:
    raise ValueError(f'Unknown T5 size {size!r}; use tiny or one of {list(_SIZES)}')
  return T5Config(**{**base, **overrides})


# ------------------------------------------------------------------------------
# Masks.
# ------------------------------------------------------------------------------


def make_attention_mask(query_input, key_input, pairwise_fn=jnp.multiply,
                        dtype=jnp.float32):
  """mask[b, 0, q, k] = pairwise_fn(query_input[b, q], key_input[b, k]).

  Args: query_input [B, Lq], key_input [B, Lk]. Returns [B, 1, Lq, Lk].
  """
  mask = pairwise_fn(query_input[:, :, None], key_input[:, None, :])
  return mask[:, None].astype(dtype)


def combine_masks(*masks, dtype=jnp.float32):
  """Logical AND of the non-None masks (all [B, 1, Lq, Lk]); None if none given."""
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  out = masks[0].astype(bool)
  for m in masks[1:]:
    out = jnp.logical_and(out, m)
  return out.astype(dtype)


def make_decoder_mask(decoder_target_tokens, dtype, decoder_segment_ids=None):
  """Causal AND non-padding (AND same-segment) decoder self-attention mask.

  mask[b, 0, q, k] = (k <= q) & (t[b, q] > 0) & (t[b, k] > 0) [& seg[b, q] == seg[b, k]].
  Args: decoder_target_tokens [B, Lt]. Returns [B, 1, Lt, Lt].
  """
  idx = jnp.broadcast_to(jnp.arange(decoder_target_tokens.shape[-1]),
                         decoder_target_tokens.shape)
  valid = decoder_target_tokens > 0
  segments = (None if decoder_segment_ids is None else make_attention_mask(
      decoder_segment_ids, decoder_segment_ids, jnp.equal))
  return combine_masks(
      make_attention_mask(idx, idx, jnp.greater_equal),
      make_attention_mask(valid, valid), segments, dtype=dtype)


# ------------------------------------------------------------------------------
# Layers.
# ------------------------------------------------------------------------------


class Dense(nn.Module):
  """Bias-free projection y = x @ W, W [in, features] stored in `weight_dtype`.

  Computed in `dtype` with float32 accumulation (`matmul.dense`); x [..., in] ->
  y [..., features] in `out_dtype` (default `dtype`).
  """

  features: int
  kernel_axes: tuple
  dtype: Any = jnp.float32
  weight_dtype: Any = jnp.float32
  kernel_init: Any = _dense_init
  out_dtype: Any = None
  weight_grad_first: bool = False
  float32_vjp: bool = False  # T5Config.float32_matmul_vjp

  @nn.compact
  def __call__(self, x):
    kernel = param_with_axes('kernel', self.kernel_init,
                             (x.shape[-1], self.features), self.weight_dtype,
                             axes=self.kernel_axes)
    return matmul.dense(x, kernel, dtype=self.dtype, out_dtype=self.out_dtype,
                        weight_grad_first=self.weight_grad_first,
                        float32_vjp=self.float32_vjp)


class Kernel(nn.Module):
  """The weight of a bias-free projection alone, W [in, features], stored as `Dense` does.

  `Kernel(name='wi_0')` creates the same parameter (path, name, init, axes) as
  `Dense(name='wi_0')`; `fused_projection` then applies several such weights to one
  input in a single matmul.
  """

  shape: tuple
  kernel_axes: tuple
  weight_dtype: Any = jnp.float32
  kernel_init: Any = _dense_init

  @nn.compact
  def __call__(self):
    return param_with_axes('kernel', self.kernel_init, self.shape, self.weight_dtype,
                           axes=self.kernel_axes)


def stacked_projection(x, kernels, dtype, weight_grad_first: bool = False,
                       float32_vjp: bool = False):
  """x [..., D], W_i [D, F] -> y [..., n, F] with y[..., i, :] = x @ W_i (one matmul)."""
  w = jnp.stack([k.astype(dtype) for k in kernels], axis=1)
  return matmul.dense(x, w, dtype=dtype, weight_grad_first=weight_grad_first,
                      float32_vjp=float32_vjp)


def gated_activation(y, activations: Sequence[str], dtype):
  """y [..., n, F] -> prod_i act_i(y[..., i, :]) [..., F] in `dtype`, computed in float32.

  T5 1.1: ``gelu(y_0) * y_1``. The custom VJP keeps only y (already stored for the
  projection's own gradient), recomputes the activations in float32 and returns the n
  cotangents stacked as [..., n, F] in y's dtype: the layout the stacked projection's
  backward reads, made in one pass (XLA:CPU would otherwise round after every
  elementwise op of GELU and its derivative, and pad and add the n slices' cotangents).
  The backward reads y through an `optimization_barrier`, so that XLA does not merge the
  recomputation with the forward's GELU and keep its intermediates (tanh, products:
  +85 MB for T5 1.1 small, 4 pairs, float32, `tools/step_peak_buffers.sh` with the
  barrier edited out) alive until the backward pass.
  """
  activations = tuple(activations)
  if len(activations) != y.shape[-2]:
    raise ValueError(f"gated_activation: {len(activations)} activations for "
                     f"{y.shape[-2]} stacked projections")
  return _gated_recomputed(y, activations, jnp.dtype(dtype))


def _activation(name: str):
  return (lambda h: h) if name == 'linear' else getattr(nn, name)


def _gated_f32(y, activations):
  out = 1.0
  for i, name in enumerate(activations):
    out = out * _activation(name)(y[..., i, :])
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gated_recomputed(y, activations, dtype):
  return _gated_f32(y.astype(jnp.float32), activations).astype(dtype)


def _gated_recomputed_fwd(y, activations, dtype):
  return _gated_recomputed(y, activations, dtype), y


def _gated_recomputed_bwd(activations, dtype, y, g):
  del dtype
  y = jax.lax.optimization_barrier(y)
  g = g.astype(jnp.float32)
  vals, derivs = [], []
  for i, name in enumerate(activations):
    a, vjp = jax.vjp(_activation(name), y[..., i, :].astype(jnp.float32))
    vals.append(a)
    derivs.append(vjp)
  grads = []
  for i in range(len(activations)):
    others = functools.reduce(lambda p, q: p * q, vals[:i] + vals[i + 1:], 1.0)
    grads.append(derivs[i](g * others)[0])
  return (jnp.stack(grads, axis=-2).astype(y.dtype),)


_gated_recomputed.defvjp(_gated_recomputed_fwd, _gated_recomputed_bwd)


def fused_projection(x, kernels, dtype, weight_grad_first: bool = False,
                     float32_vjp: bool = False):
  """``[x @ W_1, ..., x @ W_n]`` as one matmul: x [..., D], W_i [D, F] -> n arrays [..., F].

  ``y[..., i, :] = x @ W_i`` with ``W = stack_i W_i`` [D, n, F]: one larger GEMM
  instead of n (and, in the backward pass, one ``dx = dy W^T`` instead of n plus their
  sum). Stacking on a new axis, not concatenating along F, keeps every W_i's sharding
  along F, so no resharding is needed under model parallelism. Computed in `dtype` with
  float32 accumulation (`matmul.einsum`).
  """
  return _unstack(stacked_projection(x, kernels, dtype, weight_grad_first, float32_vjp))


@jax.custom_vjp
def _unstack(y):
  """y [..., n, F] -> n arrays [..., F]; the VJP stacks the n cotangents back (one copy).

  Autodiff of ``y[..., i, :]`` would pad each cotangent to [..., n, F] and add the n
  pads; in a low-precision step XLA:CPU fuses that chain with the bf16 elementwise ops
  before it into one slow loop (`tools/profile_step.py --dtype bfloat16 --top_ops`
  showed these fusions among the longest ops; benchmarks/NOTES.md, session 4). In
  float32 the pads cost ~0.2 s of a 3.4 s T5 1.1 small step (session 9's profile); the
  stack is faster there too (benchmarks/NOTES.md, session 10).
  """
  return [y[..., i, :] for i in range(y.shape[-2])]


def _unstack_fwd(y):
  return _unstack(y), None


def _unstack_bwd(_, cotangents):
  return (jnp.stack(cotangents, axis=-2),)


_unstack.defvjp(_unstack_fwd, _unstack_bwd)


class RMSNorm(nn.Module):
  """T5 layer norm: y = x / sqrt(mean(x^2) + eps) * scale, statistics in float32.

  x [..., D] -> y [..., D] in `dtype`; scale [D] ('embed',), initialised to 1.
  """

  dtype: Any = jnp.float32
  weight_dtype: Any = jnp.float32
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = param_with_axes('scale', nn.initializers.ones, (x.shape[-1],),
                            self.weight_dtype, axes=('embed',))
    return rms_norm(x, scale, jnp.dtype(self.dtype), self.epsilon)


def rms_norm(x, scale, dtype, epsilon: float):
  """y = cast_dtype(float32(cast_dtype(x̂)) · scale), x̂ = x · (mean_D(x²) + ε)^(−1/2).

  x [..., D] (any float dtype), scale [D]; statistics and the scale product in float32;
  returns y [..., D] in `dtype`. The sum over D and the broadcast of scale over the
  tokens are dots with ones (`matmul.sum_by_dot`, `matmul.broadcast_by_dot`), so that
  autodiff's scale gradient, Σ_tokens dy ⊙ x̂, is a matrix-vector product too: as a
  reduction over all B·L tokens XLA:CPU runs it as a tree of reduce-windows (17 of them,
  45 ms of a 1.94 s bf16 step of T5 1.1 small at 4 pairs, Li 512; `benchmarks/NOTES.md`,
  session 14).
  """
  xf = x.astype(jnp.float32)
  mean_sq = matmul.sum_by_dot(xf * xf, -1, keepdims=True) / x.shape[-1]
  x_hat = (xf * lax.rsqrt(mean_sq + epsilon)).astype(dtype)
  scale_rows = matmul.broadcast_by_dot(scale.astype(jnp.float32), x.shape[:-1])
  return (x_hat.astype(jnp.float32) * scale_rows).astype(dtype)


def relative_position_bucket(relative_position, bidirectional, num_buckets,
                             max_distance):
  """T5 bucket of `relative_position = key_pos - query_pos` (numpy, static shapes).

  Half the buckets (per direction when bidirectional) hold exact distances
  0..n/2-1, the rest log-spaced distances up to `max_distance`, beyond which all
  share the last bucket. Unidirectional (causal) attention maps all future
  positions to bucket 0.
  """
  n = -relative_position
  ret = np.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(np.int32) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  val_if_large = max_exact + (
      np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps)
      / np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(np.int32)
  val_if_large = np.minimum(val_if_large, num_buckets - 1)
  return ret + np.where(n < max_exact, n, val_if_large)


def relative_bias(table, qlen: int, klen: int, bidirectional: bool, max_distance: int):
  """T5 relative position bias: table E [H, NB] -> bias [H, qlen, klen] = E[h, bucket(k - q)].

  The forward pass is a gather (materialised once and read by every layer). The
  backward pass is dE[h, b] = sum over (q, k) with bucket(k - q) = b of dbias[h, q, k].
  Every diagonal d = k - q at or beyond the last log-spaced distance (and, causally,
  every future one) shares its direction's end bucket, so dbias splits into three
  regions of the diagonals: the two ends, each one masked sum (`jnp.where` on
  k - q, fused into the reduction), and the band between them (|d| < max_distance),
  cut out of dbias as [H, qlen, band] with `band_of_diagonals` and summed over q into
  per-diagonal sums that are scattered into their buckets. The gather's own transpose
  would scatter all qlen·klen entries (a strided [qlen·klen, H] copy), and the sum over
  all qlen + klen - 1 diagonals pads dbias to [H, qlen, qlen + klen]; both are slow on
  XLA:CPU at long inputs (measured with `tools/profile_step.py --li 1024`).
  """
  return _relative_bias(table, qlen, klen, bidirectional, max_distance)


def band_of_diagonals(x, first: int, width: int):
  """x [H, Q, K] -> band [H, Q, width], band[h, q, i] = x[h, q, q + first + i] (0 outside).

  The "relative shift" trick (Transformer-XL) read backwards: rows padded to a width r
  that no band entry crosses, flattened, and re-cut into rows of r + 1, so that row q
  starts q entries further on. Only pads, reshapes and slices (no gather), and XLA
  computes just the band's entries.
  """
  h, q, k = x.shape
  left = max(0, -first)
  start = first + left  # where row 0's band begins in its padded row
  r = max(k + left, q - 1 + start + width)
  flat = jnp.pad(x, ((0, 0), (0, 0), (left, r - k - left))).reshape(h, q * r)
  flat = jnp.pad(flat, ((0, 0), (0, q + start)))[:, start:start + q * (r + 1)]
  return flat.reshape(h, q, r + 1)[:, :, :width]


def _bucket_of(qlen, klen, bidirectional, num_buckets, max_distance, diagonals=False):
  if diagonals:  # k - q of every diagonal, from -(qlen - 1) to klen - 1
    rel = np.arange(-(qlen - 1), klen)
  else:
    rel = np.arange(klen)[None, :] - np.arange(qlen)[:, None]
  return relative_position_bucket(rel, bidirectional, num_buckets, max_distance)


def _diagonal_regions(diag_bucket):
  """Split the diagonals' buckets into [0, lo) | [lo, hi) | [hi, n): the two ends are
  the longest runs of one bucket at each end (the far past and the far future)."""
  n = len(diag_bucket)
  lo = 1
  while lo < n and diag_bucket[lo] == diag_bucket[0]:
    lo += 1
  if lo == n:  # one bucket for every diagonal
    return n, n
  hi = n - 1
  while hi > lo and diag_bucket[hi - 1] == diag_bucket[n - 1]:
    hi -= 1
  return lo, hi


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _relative_bias(table, qlen, klen, bidirectional, max_distance):
  bucket = _bucket_of(qlen, klen, bidirectional, table.shape[1], max_distance)
  # [H, qlen, klen] contiguous, once: XLA:CPU otherwise keeps the gather's [qlen·klen, H]
  # result and reads it transposed inside every layer's logits add.
  return matmul.materialized(jnp.take(table, jnp.asarray(bucket), axis=1))


def _relative_bias_fwd(table, qlen, klen, bidirectional, max_distance):
  return _relative_bias(table, qlen, klen, bidirectional, max_distance), table


def _relative_bias_bwd(qlen, klen, bidirectional, max_distance, table, g):
  num_buckets = table.shape[1]
  diag_bucket = _bucket_of(qlen, klen, bidirectional, num_buckets, max_distance,
                           diagonals=True)
  lo, hi = _diagonal_regions(diag_bucket)
  d_lo, d_hi = lo - (qlen - 1), hi - (qlen - 1)  # k - q where the band and right end start
  # Sums of up to qlen·klen terms: accumulated in float32 whatever the bias dtype.
  g = g.astype(jnp.float32)
  rel = lax.broadcasted_iota(jnp.int32, (qlen, klen), 1) - lax.broadcasted_iota(
      jnp.int32, (qlen, klen), 0)
  dtable = jnp.zeros(table.shape, jnp.float32)
  dtable = dtable.at[:, diag_bucket[0]].add(jnp.sum(jnp.where(rel < d_lo, g, 0.), axis=(1, 2)))
  if hi < len(diag_bucket):
    dtable = dtable.at[:, diag_bucket[-1]].add(
        jnp.sum(jnp.where(rel >= d_hi, g, 0.), axis=(1, 2)))
  if hi > lo:
    band = band_of_diagonals(g, d_lo, hi - lo).sum(axis=1)  # [H, hi - lo]
    dtable = dtable.at[:, jnp.asarray(diag_bucket[lo:hi])].add(band)
  return (dtable.astype(table.dtype),)


_relative_bias.defvjp(_relative_bias_fwd, _relative_bias_bwd)


class RelativePositionBiases(nn.Module):
  """T5 relative position attention bias, bias[0, h, q, k] = E[h, bucket(k - q)].

  Parameter `rel_embedding` E [H, num_buckets] ('heads', 'relpos_buckets').
  Returns [1, H, qlen, klen] in `dtype` (`relative_bias`); with `shards=D` > 1 the same
  bias once per data shard, [D, H, qlen, klen] (`data_shards`: for `add_position_bias`
  and the default attention's add, which read row b's from b's shard); with `diagonals=True` one
  value per diagonal instead, [H, qlen + klen - 1] with entry k - q + qlen - 1 =
  E[h, bucket(k - q)] (the form the 'fused_softmax' kernels take).
  """

  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: Any = jnp.float32
  weight_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, qlen: int, klen: int, bidirectional: bool = True,
               diagonals: bool = False, shards: int = 1):
    axes = ('heads', 'relpos_buckets')
    table = param_with_axes('rel_embedding', _relpos_init,
                            (self.num_heads, self.num_buckets), self.weight_dtype, axes=axes)
    if diagonals:  # [H, qlen + klen - 1]: entry d + qlen - 1 is the bias of k - q = d
      bucket = _bucket_of(qlen, klen, bidirectional, self.num_buckets, self.max_distance,
                          diagonals=True)
      return jnp.take(table.astype(self.dtype), jnp.asarray(bucket), axis=1)
    if shards > 1:
      # [D, H, qlen, klen], from one copy of the table per data shard (`data_shards`):
      # each layer's gradient, summed over its shard of the batch, stays on the device,
      # and only the table's [H, num_buckets] gradient is all-reduced, once.
      tables = data_shards.broadcast(table, axes, shards).astype(self.dtype)
      return jax.vmap(lambda t: relative_bias(t, qlen, klen, bidirectional,
                                              self.max_distance))(tables)
    return relative_bias(table.astype(self.dtype), qlen, klen, bidirectional,
                         self.max_distance)[None]


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head attention, out = W_o concat_h softmax(q_h k_h^T + bias) v_h.

  No 1/sqrt(K) factor at run time: as in T5X/Mesh-TF it is folded into the
  query initialisation (query kernel init scaled by K**-0.5).

  With `decode=True` the module keeps an autoregressive cache in the 'cache'
  collection (T5X layout): `cached_key`/`cached_value` [B, H, K, L] and the
  scalar `cache_index`. The first decode call (cache absent, any length) only
  creates zero-filled cache variables; later calls take one token [B, 1, D],
  write its key/value at `cache_index`, attend to positions <= cache_index and
  advance the index. `bias` must then cover all L positions, [1, H, L, L]; the
  row of the current position is used.
  """

  num_heads: int
  head_dim: int
  dtype: Any = jnp.float32
  weight_dtype: Any = jnp.float32
  dropout_rate: float = 0.0
  weight_grad_first: bool = False  # T5Config.weight_grad_first
  float32_vjp: bool = False  # T5Config.float32_matmul_vjp
  float32_logits: bool = True
  block_bytes: int = 0  # T5Config.attention_block_bytes
  implementation: str = 'default'  # T5Config.attention_implementation

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, mask=None, bias=None, *,
               decode: bool = False, deterministic: bool = True):
    """inputs_q [B, Lq, D], inputs_kv [B, Lk, D], mask/bias [B|1, H|1, Lq, Lk].

    Returns [B, Lq, D] in `dtype`.
    """
    heads, depth = self.num_heads, self.head_dim
    query_init = lambda *a: _attention_init(*a) / jnp.sqrt(depth).astype(a[-1])

    def kernel(name, init):
      return Kernel((inputs_q.shape[-1], heads * depth), ('embed', 'joined_kv'),
                    self.weight_dtype, init, name=name)()

    def heads_of(y):  # [B, L, H·K] -> [B, L, H, K]
      y = y.reshape(y.shape[:-1] + (heads, depth))
      return with_sharding_constraint(y, ('batch', 'length', 'heads', 'kv'))

    # One matmul per distinct input: q, k, v together for self-attention; k, v
    # together for cross-attention.
    w_q, w_k, w_v = (kernel('query', query_init), kernel('key', _attention_init),
                     kernel('value', _attention_init))
    if inputs_q is inputs_kv:
      query, key, value = map(heads_of, fused_projection(
          inputs_q, (w_q, w_k, w_v), self.dtype, self.weight_grad_first, self.float32_vjp))
    else:
      (query,) = map(heads_of, fused_projection(inputs_q, (w_q,), self.dtype,
                                                self.weight_grad_first, self.float32_vjp))
      key, value = map(heads_of, fused_projection(inputs_kv, (w_k, w_v), self.dtype,
                                                  self.weight_grad_first, self.float32_vjp))
    # query [B, Lq, H, K]; key, value [B, Lk, H, K]

    if decode:
      initialized = self.has_variable('cache', 'cached_key')
      cache_shape = key.shape[:-3] + (heads, depth, key.shape[-3])  # [B, H, K, L]
      cached_key = self.variable('cache', 'cached_key', jnp.zeros, cache_shape,
                                 key.dtype)
      cached_value = self.variable('cache', 'cached_value', jnp.zeros,
                                   cache_shape, value.dtype)
      cache_index = self.variable('cache', 'cache_index',
                                  lambda: jnp.array(0, dtype=jnp.int32))
      if initialized:
        batch, _, _, length = cached_key.value.shape
        if query.shape != (batch, 1, heads, depth):
          raise ValueError(f'Decoding step expects query shape '
                           f'{(batch, 1, heads, depth)}, got {query.shape}.')
        if bias is not None and bias.shape[-1] != length:
          raise ValueError(
              f'Decoding step needs a position bias over the whole cache length '
              f'{length} (pass max_decode_length), got {bias.shape}.')
        i = cache_index.value
        # [B, 1, H, K] -> [B, H, K, 1], written at length position i.
        cached_key.value = lax.dynamic_update_slice_in_dim(
            cached_key.value, jnp.moveaxis(key, 1, -1), i, axis=-1)
        cached_value.value = lax.dynamic_update_slice_in_dim(
            cached_value.value, jnp.moveaxis(value, 1, -1), i, axis=-1)
        cache_index.value = i + 1
        key = jnp.moveaxis(cached_key.value, -1, 1)  # [B, L, H, K]
        value = jnp.moveaxis(cached_value.value, -1, 1)
        mask = combine_masks(
            mask, jnp.broadcast_to(jnp.arange(length) <= i, (batch, 1, 1, length)))
        if bias is not None:
          bias = lax.dynamic_slice_in_dim(bias, i, 1, axis=-2)  # [1, H, 1, L]

    if (self.implementation == 'fused_softmax' and bias is not None and bias.ndim == 2
        and not decode):
      x = self._fused_softmax(query, key, value, mask, bias, deterministic)
      return self._output(x.reshape(x.shape[:2] + (heads * depth,)), inputs_q.shape[-1])
    if self.implementation in ('cudnn', 'xla') and not decode:
      x = self._fused_attention(query, key, value, mask, bias, deterministic)
      return self._output(x.reshape(x.shape[:2] + (heads * depth,)), inputs_q.shape[-1])

    logits_dtype = jnp.float32 if self.float32_logits else self.dtype
    attention_bias = None
    if mask is not None:
      # Computed once (`matmul.materialized`), not from the tokens again inside each
      # layer's softmax passes, where XLA:CPU would otherwise fuse it.
      attention_bias = matmul.materialized(
          jnp.where(mask > 0, 0.0, _MASK_BIAS).astype(logits_dtype))

    # Grouped cross-attention: G = B_q / B_kv query rows share each key/value row (the
    # n summaries of one prompt). Keys/values are projected once per prompt and the G
    # rows' queries are stacked along the query axis: [B_kv, G·Lq, H, K].
    rows, q_len = query.shape[0], query.shape[1]
    groups = 1 if decode else rows // key.shape[0]
    block_q = self._block_queries(key.shape[0], groups * q_len, key.shape[1], decode,
                                  deterministic)
    if block_q and (groups == 1 or bias is None):
      # Over blocks of queries (`blocked_attention`); the position bias (self-attention,
      # never grouped) stays separate from the mask (its gradient is reduced per block).
      query, attention_bias = _stack_groups(query, attention_bias, groups)
      x = blocked_attention.blocked_attention(query, key, value, attention_bias, bias,
                                              dtype=self.dtype, block_q=block_q)
      return self._output(x.reshape((rows, q_len, heads * depth)), inputs_q.shape[-1])
    # With `weight_grad_first` the position bias (self-attention, never grouped) is added
    # with the logits below (`add_position_bias`), so that its gradient is reduced inside
    # this layer's backward pass.
    tie_position_bias = bias is not None and groups == 1 and self.weight_grad_first
    if bias is not None and not tie_position_bias:
      attention_bias = bias if attention_bias is None else data_shards.add(attention_bias, bias)
    query, attention_bias = _stack_groups(query, attention_bias, groups)

    # float32 logits: the float32 accumulator of the q·k matmul is kept (T5X casts q and
    # k to float32; they hold `dtype` values, so the products are the same).
    logits = matmul.einsum('bqhd,bkhd->bhqk', query, key, dtype=self.dtype,
                           out_dtype=logits_dtype, float32_vjp=self.float32_vjp)
    if tie_position_bias:
      logits, value = add_position_bias(logits, attention_bias, bias, value)
    elif attention_bias is not None:
      logits = data_shards.add(logits, attention_bias.astype(logits.dtype))
    if deterministic or self.dropout_rate == 0.0:
      x = softmax_weighted_values(logits, value, self.dtype)
    else:
      weights = attention_softmax(logits, self.dtype)
      # Dropout on attention weights, shared across query positions (as T5X).
      weights = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(
          weights, deterministic=deterministic)
      x = matmul.einsum('bhqk,bkhd->bqhd', weights, value, dtype=self.dtype,
                        float32_vjp=self.float32_vjp)
    return self._output(x.reshape((rows, q_len, heads * depth)), inputs_q.shape[-1])

  def _fused_attention(self, query, key, value, mask, bias, deterministic: bool):
    """softmax(q k^T + bias, masked) v by `jax.nn.dot_product_attention`.

    query [B·G, Lq, H, K], key/value [B, Lk, H, K] (G summaries per prompt share a
    key/value row, stacked along the queries as `_stack_groups` does), mask
    [B·G | 1, 1, Lq, Lk] (> 0: attend), bias [1, H, Lq, Lk]. Returns [B·G, Lq, H, K].
    Scale 1: the 1/sqrt(K) is in the query initialisation.
    """
    if not (deterministic or self.dropout_rate == 0.0):
      raise ValueError(
          f'attention_implementation={self.implementation!r} has no dropout on the '
          f'attention weights; use attention_implementation="default" with '
          f'dropout_rate={self.dropout_rate} when training with dropout.')
    if self.implementation == 'cudnn' and platforms.target_platform() != 'gpu':
      raise ValueError(
          f"attention_implementation='cudnn' needs an NVIDIA GPU (the step is traced for "
          f"{platforms.target_platform()!r}); use 'default' (or 'xla') there")
    rows, q_len = query.shape[:2]
    groups = rows // key.shape[0]
    if bias is not None and groups != 1:
      raise ValueError(
          f'attention_implementation={self.implementation!r}: a position bias needs one query '
          f'row per key row (self-attention); got {rows} query rows for {key.shape[0]} key '
          f'rows (grouped cross-attention, which T5 gives no position bias)')
    keep = None if mask is None else mask > 0
    query, keep = _stack_groups(query, keep, groups)
    if bias is not None and self.implementation == 'cudnn':
      bias = bias.astype(query.dtype)  # cuDNN takes the bias in the q/k/v dtype
    x = jax.nn.dot_product_attention(query, key, value, bias=bias, mask=keep, scale=1.0,
                                     implementation=self.implementation)
    return x.reshape((rows, q_len) + x.shape[2:])

  def _fused_softmax(self, query, key, value, segments, diagonal_bias, deterministic: bool):
    """Self-attention with the softmax passes in the CPU kernels (`fused_softmax`).

    query/key/value [B, L, H, K]; segments [B, L] (a token attends to the tokens of its
    own segment; 0: padding; None: one segment) masks keys and queries; diagonal_bias
    [H, 2L - 1] (`RelativePositionBiases(diagonals=True)`). Returns [B, L, H, K] in
    `dtype`.
    """
    if not (deterministic or self.dropout_rate == 0.0):
      raise ValueError(
          f"attention_implementation='fused_softmax' has no dropout on the attention "
          f"weights; use attention_implementation='default' with "
          f"dropout_rate={self.dropout_rate} when training with dropout.")
    if platforms.target_platform() != 'cpu':
      raise ValueError(
          f"attention_implementation='fused_softmax' is a pair of CPU kernels (the step is "
          f"traced for {platforms.target_platform()!r}); use 'cudnn' on NVIDIA GPUs or 'default'")
    logits = matmul.einsum('bqhd,bkhd->bhqk', query, key, dtype=self.dtype,
                           out_dtype=jnp.float32, float32_vjp=self.float32_vjp)
    segments = (jnp.ones(query.shape[:2], jnp.float32) if segments is None
                else segments.astype(jnp.float32))
    return fused_softmax.softmax_weighted_values(logits, value, diagonal_bias, segments,
                                                 segments, self.dtype)

  def _output(self, x, features: int):
    """The output projection W_o: [B, Lq, H·K] -> [B, Lq, D]."""
    return Dense(features, ('joined_kv', 'embed'), self.dtype,
                 self.weight_dtype, _attention_init, name='out',
                 weight_grad_first=self.weight_grad_first, float32_vjp=self.float32_vjp)(x)

  def _block_queries(self, batch: int, q_len: int, k_len: int, decode: bool,
                     deterministic: bool) -> int:
    """Queries per block of `blocked_attention`, or 0: unblocked (decoding, dropout on
    the weights, logits not float32, no budget, or the whole logits array within it)."""
    if (decode or not self.block_bytes or not self.float32_logits
        or not (deterministic or self.dropout_rate == 0.0)):
      return 0
    block = blocked_attention.block_size(batch, self.num_heads, q_len, k_len,
                                         self.block_bytes)
    return block if block < q_len else 0


def add_position_bias(logits, mask_bias, position_bias, value):
  """(logits + mask_bias + position_bias, value), broadcast: [B, H, Lq, Lk] + [B, 1, Lq, Lk]
  + [1, H, Lq, Lk] (or [D, H, Lq, Lk], one per data shard: `data_shards.add`); ``value``
  [B, Lk, H, K] (the attention's values) passes through unchanged.

  `mask_bias` (0 or a large negative number; None: none) gets no gradient. The position
  bias's gradient, Σ_b dlogits (in its dtype), is tied to the values' cotangent: dvalue is
  passed on as dvalue + 0 · (one element of that sum), so the sum is computed in this
  layer's backward and dlogits freed there. Without the tie XLA:CPU's scheduler leaves
  the eight layers' reductions (weight-gradient-like, off the critical path) to the end of
  the backward pass and keeps every layer's [B, H, Lq, Lk] dlogits alive until then.
  Tied to dlogits itself (sessions 6–49) the add was a pass of its own over dlogits (the
  sum reads dlogits, so the add cannot join dlogits' own fusion): 4 ms per layer in the
  bf16 step, T5 1.1 small, 4 pairs, Li 1024 (`tools/profile_step.py`, session 50); dvalue
  has K / Lq of dlogits' elements (1/16 at Li 1024 with heads of 64).
  """
  if mask_bias is None:
    mask_bias = jnp.zeros((), logits.dtype)
  return _add_position_bias(logits, mask_bias.astype(logits.dtype), position_bias, value)


@jax.custom_vjp
def _add_position_bias(logits, mask_bias, position_bias, value):
  return data_shards.add(logits + mask_bias, position_bias.astype(logits.dtype)), value


def _add_position_bias_fwd(logits, mask_bias, position_bias, value):
  tags = (jnp.zeros((0,) + mask_bias.shape, mask_bias.dtype),
          jnp.zeros((0,) + position_bias.shape, position_bias.dtype))
  return _add_position_bias(logits, mask_bias, position_bias, value), tags


def _add_position_bias_bwd(tags, g):
  mask_tag, bias_tag = tags
  g_logits, g_value = g
  d_bias = data_shards.sum_to(g_logits, bias_tag.shape[1:])
  if d_bias.shape[0] == 1:
    tie = (matmul.first_element(d_bias) * 0.0).astype(g_value.dtype)
  else:  # one element of each data shard's sum, read where it lies
    tie = (d_bias[:, :1, :1, :1] * 0.0).astype(g_value.dtype)
  return (g_logits, jnp.zeros(mask_tag.shape[1:], mask_tag.dtype),
          d_bias.astype(bias_tag.dtype), data_shards.add(g_value, tie))


_add_position_bias.defvjp(_add_position_bias_fwd, _add_position_bias_bwd)


def attention_softmax(logits, dtype):
  """softmax over the last axis of `logits`, computed in float32, returned in `dtype`.

  For a lower-precision `dtype` the custom VJP keeps only the `dtype` probabilities p for
  the backward pass (half the memory of float32 ones: [B, H, Lq, Lk] per layer) and
  computes dlogits = p ⊙ (g − Σ_k p g) in float32 from them; float32 is plain
  `jax.nn.softmax`.
  """
  if jnp.dtype(dtype) == jnp.float32:
    return jax.nn.softmax(logits).astype(dtype)
  return _low_precision_softmax(logits, jnp.dtype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _low_precision_softmax(logits, dtype):
  return jax.nn.softmax(logits.astype(jnp.float32)).astype(dtype)


def _low_precision_softmax_fwd(logits, dtype):
  p = _low_precision_softmax(logits, dtype)
  return p, (p, jnp.zeros((0,), logits.dtype))


def _low_precision_softmax_bwd(dtype, res, g):
  del dtype
  p, tag = res
  p, g = p.astype(jnp.float32), g.astype(jnp.float32)
  return ((p * (g - jnp.sum(p * g, axis=-1, keepdims=True))).astype(tag.dtype),)


_low_precision_softmax.defvjp(_low_precision_softmax_fwd, _low_precision_softmax_bwd)


def softmax_weighted_values(logits, value, dtype):
  """o = softmax(logits) · v: logits [B, H, Lq, Lk] (float32 softmax), v [B, Lk, H, K].

  Returns o [B, Lq, H, K] in `dtype`. Both paths have custom VJPs that take the row term
  of the softmax gradient from the output, as FlashAttention's backward does:

      dp = do · vᵀ (float32),  Σ_k p_k dp_k = Σ_d do_d o_d,
      dlogits = p ⊙ (dp − Σ_d do ⊙ o),  dv = pᵀ · do,

  so the backward reads the [B, H, Lq, Lk] arrays twice fewer than softmax's own VJP
  (no p ⊙ dp product and its reduction over Lk). The row term uses o as returned; the
  output projection holds that array for its own gradient anyway.

  float32 (`_normalized_after_values`) normalises after the matmul, as FlashAttention's
  forward does: e = exp(logits − max), s = Σ_k e, o = (e · v) / s. Only e and 1/s are
  kept for the backward pass, which uses p = e / s inside its fused elementwise ops
  (dv = eᵀ · (do / s), dlogits = e ⊙ (dp / s − Σ_d (do / s) ⊙ o)). With p itself as the
  residual, XLA:CPU fuses the division into the backward's consumers and keeps e alive
  as well: two float32 [B, H, Lq, Lk] arrays per layer until the backward pass instead
  of one (T5 1.1 small, 4 pairs, prompt 512: 1.7 → 1.4 GB of XLA buffers at the step's peak
  with the gated-GELU change, `tools/step_peak_buffers.sh`, `benchmarks/NOTES.md`).

  A lower-precision `dtype` (`_softmax_weighted_values`) keeps p rounded to `dtype` (the
  operand of the `dtype` matmul, half the memory of float32 e) and dp in float32 (the
  unfused path rounds it to `dtype` between the two VJPs).
  """
  if jnp.dtype(dtype) == jnp.float32:
    return _normalized_after_values(logits, value)
  return _softmax_weighted_values(logits, value, jnp.dtype(dtype))


@jax.custom_vjp
def _normalized_after_values(logits, value):
  return _normalized_after_values_fwd(logits, value)[0]


def _normalized_after_values_fwd(logits, value):
  e = jnp.exp(logits - matmul.row_max(logits, keepdims=True))
  r = 1.0 / matmul.sum_by_dot(e, -1)  # [B, H, Lq]: 1 / s
  o = jnp.einsum('bhqk,bkhd->bqhd', e, value) * jnp.swapaxes(r, 1, 2)[..., None]
  return o, (e, r, value, o)


def _normalized_after_values_bwd(res, g):
  e, r, v, o = res
  gr = g * jnp.swapaxes(r, 1, 2)[..., None]  # [B, Lq, H, K]: do / s
  dv = matmul.contract('bhqk,bqhd->bkhd', e, gr, dtype=jnp.float32)
  de = matmul.contract('bqhd,bkhd->bhqk', gr, v, dtype=jnp.float32)  # dp / s
  row = jnp.einsum('bqhd,bqhd->bhq', gr, o)[..., None]
  return e * (de - row), dv


_normalized_after_values.defvjp(_normalized_after_values_fwd, _normalized_after_values_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _softmax_weighted_values(logits, value, dtype):
  return _softmax_weighted_values_fwd(logits, value, dtype)[0]


def _softmax_weighted_values_fwd(logits, value, dtype):
  e = logits.astype(jnp.float32)
  e = jnp.exp(e - matmul.row_max(e, keepdims=True))
  p = (e / matmul.sum_by_dot(e, -1, keepdims=True)).astype(dtype)
  v = value.astype(dtype)
  o = matmul.accumulate('bhqk,bkhd->bqhd', p, v).astype(dtype)
  # o itself is the residual: the output projection keeps the same array for its own
  # backward pass, so the row term costs no memory.
  return o, (p, v, o, jnp.zeros((0,), logits.dtype), jnp.zeros((0,), value.dtype))


def _softmax_weighted_values_bwd(dtype, res, g):
  p, v, o, logits_tag, value_tag = res
  g = g.astype(dtype)
  dv = matmul.contract('bhqk,bqhd->bkhd', p, g, dtype=dtype)
  dp = matmul.contract('bqhd,bkhd->bhqk', g, v, dtype=dtype)
  row = jnp.einsum('bqhd,bqhd->bhq', g.astype(jnp.float32), o.astype(jnp.float32))[..., None]
  # dlogits is rounded to `dtype` here, once: the q·k matmul's VJP takes it in `dtype`
  # anyway, and the position bias's gradient (Σ_b dlogits, float32 sums) then reads that
  # `dtype` array instead of recomputing p ⊙ (dp − row) from the float32 dp (T5 1.1 small,
  # 4 pairs, Li 1024: 100 MB less read per layer, the step's other ops on [B, H, Li, Li]
  # arrays 11–19% faster, `tools/profile_step.py`; `benchmarks/NOTES.md`, session 28).
  dlogits = (p.astype(jnp.float32) * (dp - row)).astype(dtype)
  return dlogits.astype(logits_tag.dtype), dv.astype(value_tag.dtype)


_softmax_weighted_values.defvjp(_softmax_weighted_values_fwd, _softmax_weighted_values_bwd)


def _stack_groups(query, attention_bias, groups: int):
  """query [B·G, Lq, H, K] -> [B, G·Lq, H, K] and the bias [B·G | 1, H | 1, Lq, Lk] ->
  [B, H | 1, G·Lq, Lk] (`_group_queries`); unchanged for G = 1."""
  if groups == 1:
    return query, attention_bias
  rows, q_len = query.shape[:2]
  query = query.reshape((rows // groups, groups * q_len) + query.shape[2:])
  if attention_bias is not None:
    attention_bias = _group_queries(
        jnp.broadcast_to(attention_bias, (rows,) + attention_bias.shape[1:]), groups)
  return query, attention_bias


def _group_queries(x, groups: int):
  """[B·G, H, Lq, Lk] -> [B, H, G·Lq, Lk]: G consecutive rows stacked along the queries."""
  bg, h, lq, lk = x.shape
  x = x.reshape(bg // groups, groups, h, lq, lk).transpose(0, 2, 1, 3, 4)
  return x.reshape(bg // groups, h, groups * lq, lk)


class MlpBlock(nn.Module):
  """Gated MLP: y = W_o (prod_i act_i(x W_i)); T5 1.1 uses gelu(x W_0) * (x W_1).

  x [B, L, D] -> [B, L, D]; hidden [B, L, F] ('batch', 'length', 'mlp').
  """

  config: T5Config

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    cfg = self.config
    acts = cfg.mlp_activations
    kernels = [
        Kernel((x.shape[-1], cfg.mlp_dim), ('embed', 'mlp'), cfg.weight_dtype,
               name=f'wi_{i}' if len(acts) > 1 else 'wi')()
        for i in range(len(acts))]
    # One matmul for all input kernels, then the activations in float32 (`gated_activation`).
    first = cfg.weight_gradients_first
    hidden = gated_activation(
        stacked_projection(x, kernels, cfg.dtype, first, cfg.float32_matmul_vjps), acts,
        cfg.dtype)
    hidden = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(
        hidden, deterministic=deterministic)
    hidden = with_sharding_constraint(hidden, ('batch', 'length', 'mlp'))
    return Dense(x.shape[-1], ('mlp', 'embed'), cfg.dtype, cfg.weight_dtype,
                 name='wo', weight_grad_first=first,
                 float32_vjp=cfg.float32_matmul_vjps)(hidden)


def _attention(cfg: T5Config, name: str) -> MultiHeadDotProductAttention:
  return MultiHeadDotProductAttention(
      num_heads=cfg.num_heads, head_dim=cfg.head_dim, dtype=cfg.dtype,
      weight_dtype=cfg.weight_dtype, dropout_rate=cfg.dropout_rate,
      float32_logits=cfg.float32_attention_logits,
      weight_grad_first=cfg.weight_gradients_first,
      float32_vjp=cfg.float32_matmul_vjps, block_bytes=cfg.attention_block_bytes,
      implementation=cfg.attention_implementation, name=name)


def _norm(cfg: T5Config, name: str) -> RMSNorm:
  return RMSNorm(dtype=cfg.dtype, weight_dtype=cfg.weight_dtype, name=name)


def _relpos(cfg: T5Config) -> RelativePositionBiases:
  return RelativePositionBiases(
      num_buckets=cfg.relative_attention_num_buckets,
      max_distance=cfg.relative_attention_max_distance,
      num_heads=cfg.num_heads,
      # The bias is added to the attention logits, so it is kept in their dtype: its
      # gradient (summed over the batch and every layer) then stays in float32 too.
      dtype=jnp.float32 if cfg.float32_attention_logits else cfg.dtype,
      weight_dtype=cfg.weight_dtype, name='relpos_bias')


def _position_bias_shards(cfg: T5Config, rows: int, decode: bool = False) -> int:
  """D for `RelativePositionBiases(shards=D)`: the data shards of a batch of ``rows``
  (`data_shards.count`), where the layers add the bias with the default attention's own
  adds; 1 (the bias whole) for the attention kernels ('cudnn', 'xla'), blocked attention
  (`attention_block_bytes`), decoding, or rows that do not split into the shards."""
  if decode or cfg.attention_block_bytes or cfg.attention_implementation in ('cudnn', 'xla'):
    return 1
  shards = data_shards.count(('heads', 'relpos_buckets'))
  return shards if rows % shards == 0 else 1


def _dropout(cfg: T5Config, x, deterministic: bool, broadcast_dims=(-2,)):
  return nn.Dropout(cfg.dropout_rate, broadcast_dims=broadcast_dims)(
      x, deterministic=deterministic)


def _constrain(x):
  return with_sharding_constraint(x, ('batch', 'length', 'embed'))


class EncoderLayer(nn.Module):
  """Pre-norm block: x + Attn(LN(x)), then x + MLP(LN(x)). [B, Li, D] -> [B, Li, D]."""

  config: T5Config

  @nn.compact
  def __call__(self, x, bias, mask, deterministic: bool = True):
    cfg = self.config
    y = _norm(cfg, 'pre_attention_layer_norm')(x)
    y = _attention(cfg, 'attention')(y, y, mask, bias, deterministic=deterministic)
    x = x + _dropout(cfg, y, deterministic)
    y = _norm(cfg, 'pre_mlp_layer_norm')(x)
    y = MlpBlock(cfg, name='mlp')(y, deterministic=deterministic)
    return _constrain(x + _dropout(cfg, y, deterministic))


class DecoderLayer(nn.Module):
  """Pre-norm block: causal self-attention, cross-attention to `encoded`, MLP.

  x [B, Lt, D], encoded [B, Li, D] -> [B, Lt, D].
  """

  config: T5Config

  @nn.compact
  def __call__(self, x, encoded, bias, decoder_mask, encoder_decoder_mask,
               deterministic: bool = True, decode: bool = False):
    cfg = self.config
    y = _norm(cfg, 'pre_self_attention_layer_norm')(x)
    y = _attention(cfg, 'self_attention')(
        y, y, decoder_mask, bias, decode=decode, deterministic=deterministic)
    x = x + _dropout(cfg, y, deterministic)
    y = _norm(cfg, 'pre_cross_attention_layer_norm')(x)
    y = _attention(cfg, 'encoder_decoder_attention')(
        y, encoded, encoder_decoder_mask, deterministic=deterministic)
    x = x + _dropout(cfg, y, deterministic)
    y = _norm(cfg, 'pre_mlp_layer_norm')(x)
    y = MlpBlock(cfg, name='mlp')(y, deterministic=deterministic)
    return _constrain(x + _dropout(cfg, y, deterministic))


def _maybe_remat(cls, cfg: T5Config, static_argnums, decode: bool = False):
  """Wraps a layer class in `nn.remat` per `cfg.remat_policy` (never when decoding)."""
  if cfg.remat_policy == 'none' or decode:
    return cls
  return nn.remat(cls, policy=_REMAT_POLICIES[cfg.remat_policy],
                  static_argnums=static_argnums)


class Encoder(nn.Module):
  """Embedding -> layers -> final RMS norm. tokens [B, Li] -> [B, Li, D].

  `encoder_mask`: [B, 1, Li, Li] (> 0: attend), or with attention_implementation
  'fused_softmax' the tokens' segments [B, Li] in float32 (a token attends to the tokens
  of its own segment; 0: padding; `Transformer.encode`).
  """

  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_mask=None,
               deterministic: bool = True):
    cfg = self.config
    length = encoder_input_tokens.shape[-1]
    # 'fused_softmax' takes the tokens' segments [B, Li] (`encode`) and the position bias
    # per diagonal, [H, 2 Li - 1]; otherwise [1 | D, H, Li, Li] (D: `_position_bias_shards`).
    diagonals = (cfg.attention_implementation == 'fused_softmax'
                 and (encoder_mask is None or encoder_mask.ndim == 2))
    bias = _relpos(cfg)(length, length, True, diagonals=diagonals,
                        shards=_position_bias_shards(cfg, encoder_input_tokens.shape[0]))
    x = self.shared_embedding(encoder_input_tokens.astype(jnp.int32))
    x = _constrain(_dropout(cfg, x, deterministic).astype(cfg.dtype))
    layer_cls = _maybe_remat(EncoderLayer, cfg, static_argnums=(4,))
    for i in range(cfg.num_encoder_layers):
      x = layer_cls(cfg, name=f'layers_{i}')(x, bias, encoder_mask, deterministic)
    x = _norm(cfg, 'encoder_norm')(x)
    return _dropout(cfg, x, deterministic, broadcast_dims=())


class Decoder(nn.Module):
  """Embedding -> layers -> final RMS norm -> logits. tokens [B, Lt] -> [B, Lt, V]."""

  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoded, decoder_input_tokens, decoder_mask=None,
               encoder_decoder_mask=None, deterministic: bool = True,
               decode: bool = False, max_decode_length: Optional[int] = None):
    cfg = self.config
    length = (max_decode_length if decode and max_decode_length
              else decoder_input_tokens.shape[-1])
    bias = _relpos(cfg)(length, length, False,  # [1 | D, H, Lt, Lt]
                        shards=_position_bias_shards(cfg, decoder_input_tokens.shape[0],
                                                     decode))
    y = self.shared_embedding(decoder_input_tokens.astype(jnp.int32))
    y = _constrain(_dropout(cfg, y, deterministic).astype(cfg.dtype))
    layer_cls = _maybe_remat(DecoderLayer, cfg, static_argnums=(6, 7), decode=decode)
    for i in range(cfg.num_decoder_layers):
      y = layer_cls(cfg, name=f'layers_{i}')(
          y, encoded, bias, decoder_mask, encoder_decoder_mask, deterministic,
          decode)
    y = _norm(cfg, 'decoder_norm')(y)
    y = _dropout(cfg, y, deterministic)
    if cfg.logits_via_embedding:
      logits = self.shared_embedding.attend(
          y, cfg.logits_dtype, cfg.float32_matmul_vjps) / jnp.sqrt(y.shape[-1])
    else:
      # `weight_grad_first` leaves this projection out: at the start of the backward pass
      # its dW [D, V] would live beside every layer's saved activations (+62 MB at
      # XLA:CPU's float32 peak, T5 1.1 small, 4 pairs; `logits_weight_grad_first` puts
      # it in, for a speed change not shown; `benchmarks/NOTES.md`, session 43).
      logits = Dense(cfg.vocab_size, ('embed', 'vocab'), cfg.logits_dtype,
                     cfg.weight_dtype, name='logits_dense', out_dtype=jnp.float32,
                     weight_grad_first=cfg.logits_weight_grad_first,
                     float32_vjp=cfg.float32_matmul_vjps)(y)
    return with_sharding_constraint(logits, ('batch', 'length', 'vocab'))


class Embed(nn.Module):
  """Token embedding table E [V, D] ('vocab', 'embed'), init N(0, 1).

  `__call__`: tokens [B, ...] -> E[tokens] [B, ..., D] in `dtype` (on a mesh whose 'batch'
  axis spans D > 1 devices, from the table's copy per data shard: `data_shards`);
  `attend`: y [..., D] -> y @ E^T [..., V] in float32 (computed in `compute_dtype`,
  default float32, accumulated in float32).
  """

  num_embeddings: int
  features: int
  dtype: Any = jnp.float32
  weight_dtype: Any = jnp.float32

  def setup(self):
    self.embedding = param_with_axes(
        'embedding', _embedding_init, (self.num_embeddings, self.features),
        self.weight_dtype, axes=('vocab', 'embed'))
    # On a mesh whose 'batch' axis spans D > 1 devices: one copy of the table per data
    # shard, made once per apply and read by every lookup of it (the encoder's and the
    # decoder's), so that their gradients sum on each device and are all-reduced once
    # (`data_shards`): one all-reduce that XLA moves out of the microbatch loop.
    shards = data_shards.count(('vocab', 'embed'))
    self._table_per_shard = (data_shards.broadcast(self.embedding, ('vocab', 'embed'), shards)
                             if shards > 1 else None)

  def __call__(self, tokens):
    table = self._table_per_shard
    if table is not None and tokens.ndim and tokens.shape[0] % table.shape[0] == 0:
      return data_shards.take(table, tokens).astype(self.dtype)
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def attend(self, query, compute_dtype=jnp.float32, float32_vjp: bool = False):
    if jnp.dtype(compute_dtype) == jnp.float32 and not float32_vjp:
      return jnp.dot(query.astype(jnp.float32), self.embedding.astype(jnp.float32).T)
    lead = query.shape[:-1]
    y = matmul.einsum('nd,vd->nv', query.reshape((-1, query.shape[-1])), self.embedding,
                      dtype=compute_dtype, out_dtype=jnp.float32, float32_vjp=float32_vjp)
    return y.reshape(lead + (self.num_embeddings,))


class Transformer(nn.Module):
  """T5 1.1 encoder-decoder with T5X's interface (`encode`, `decode`, `__call__`).

  Token id 0 is padding (and the decoder BOS); masks come from tokens > 0.
  Logits are float32 [B, Lt, V].
  """

  config: T5Config

  def setup(self):
    cfg = self.config
    self.shared_embedding = Embed(cfg.vocab_size, cfg.emb_dim, dtype=cfg.dtype,
                                  weight_dtype=cfg.weight_dtype,
                                  name='token_embedder')
    self.encoder = Encoder(cfg, self.shared_embedding)
    self.decoder = Decoder(cfg, self.shared_embedding)

  def encode(self, encoder_input_tokens, encoder_segment_ids=None,
             enable_dropout=True):
    """Encoder branch. encoder_input_tokens [B, Li] int -> encoded [B, Li, D].

    Attention is restricted to non-padding tokens (and the same segment when
    `encoder_segment_ids` [B, Li] is given for packed examples).
    """
    cfg = self.config
    if encoder_input_tokens.ndim != 2:
      raise ValueError(f'encoder_input_tokens must be [batch, length], got '
                       f'{encoder_input_tokens.shape}')
    valid = encoder_input_tokens > 0
    if cfg.attention_implementation == 'fused_softmax':
      # The kernels mask keys and queries by segment [B, Li] (float32: exact ids): the
      # validity of unpacked tokens (1: a token, 0: padding) or packed tokens' segment
      # ids (0 on padding), never a [B, 1, Li, Li] mask.
      segments = (valid if encoder_segment_ids is None
                  else jnp.where(valid, encoder_segment_ids, 0))
      return self.encoder(encoder_input_tokens, segments.astype(jnp.float32),
                          deterministic=not enable_dropout)
    mask = make_attention_mask(valid, valid, dtype=cfg.dtype)
    if encoder_segment_ids is not None:
      mask = combine_masks(mask, make_attention_mask(
          encoder_segment_ids, encoder_segment_ids, jnp.equal), dtype=cfg.dtype)
    return self.encoder(encoder_input_tokens, mask,
                        deterministic=not enable_dropout)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens,
             decoder_target_tokens, encoder_segment_ids=None,
             decoder_segment_ids=None, decoder_positions=None,
             enable_dropout=True, decode=False, max_decode_length=None):
    """Decoder branch. Returns float32 logits [B, Lt, V].

    Args:
      encoded: [B, Li, D] output of `encode`; or [B/n, Li, D] for n target rows per
        prompt (grouped: keys/values projected once per prompt, not per row).
      encoder_input_tokens: [B, Li] (grouped: [B/n, Li]), only used for the
        cross-attention mask.
      decoder_input_tokens: [B, Lt] targets shifted right (0 = BOS).
      decoder_target_tokens: [B, Lt]; its padding (0) masks queries. In decode
        mode only its shape is used.
      encoder_segment_ids / decoder_segment_ids: [B, Li] / [B, Lt] for packing.
      decoder_positions: unused (relative positions come from indices), kept
        for T5X's signature.
      enable_dropout: apply dropout (needs the 'dropout' rng).
      decode: one autoregressive step with the 'cache' collection (Lt = 1), or
        cache creation when the cache is absent.
      max_decode_length: cache length L; required for decode steps so the
        relative position bias covers every cached position.
    """
    del decoder_positions
    cfg = self.config
    groups = decoder_input_tokens.shape[0] // encoded.shape[0]
    if groups > 1:
      # n target rows per prompt (pairs, lists): `encoded` and `encoder_input_tokens` are
      # [B, Li], decoder tokens [B·n, Lt] with prompt b's rows at b·n … b·n+n−1. The
      # cross-attention projects each prompt's keys/values once.
      if decode or encoder_segment_ids is not None:
        raise ValueError('grouped decoding (decoder batch = n × encoder batch) supports '
                         'neither decode=True nor packed inputs')
      encoder_input_tokens = jnp.repeat(encoder_input_tokens > 0, groups, axis=0)
    if decode:
      decoder_mask = None  # causality comes from the cache index
      encoder_decoder_mask = make_attention_mask(
          jnp.ones_like(decoder_target_tokens), encoder_input_tokens > 0,
          dtype=cfg.dtype)
    else:
      decoder_mask = make_decoder_mask(decoder_target_tokens, cfg.dtype,
                                       decoder_segment_ids)
      encoder_decoder_mask = make_attention_mask(
          decoder_target_tokens > 0, encoder_input_tokens > 0, dtype=cfg.dtype)
    if encoder_segment_ids is not None:
      if decode:
        raise ValueError('Packed inputs (encoder_segment_ids) are not supported '
                         'when decoding.')
      encoder_decoder_mask = combine_masks(
          encoder_decoder_mask,
          make_attention_mask(decoder_segment_ids, encoder_segment_ids, jnp.equal),
          dtype=cfg.dtype)
    return self.decoder(encoded, decoder_input_tokens, decoder_mask,
                        encoder_decoder_mask, deterministic=not enable_dropout,
                        decode=decode, max_decode_length=max_decode_length)

  def __call__(self, encoder_input_tokens, decoder_input_tokens,
               decoder_target_tokens, encoder_segment_ids=None,
               decoder_segment_ids=None, encoder_positions=None,
               decoder_positions=None, *, enable_dropout=True, decode=False):
    """Teacher-forced forward pass: tokens [B, Li], [B, Lt] -> logits [B, Lt, V].

    The decoder tokens may hold n rows per prompt, [B·n, Lt] (prompt b's rows at b·n …
    b·n+n−1): the encoder runs once per prompt and `decode` groups the rows.
    `encoder_positions`/`decoder_positions` are accepted for T5X compatibility
    and unused (T5 uses relative positions).
    """
    del encoder_positions
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids,
                          enable_dropout=enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, encoder_segment_ids,
                       decoder_segment_ids, decoder_positions,
                       enable_dropout=enable_dropout, decode=decode)


def init_decoder_cache(model: Transformer, batch_size: int, encoder_length: int,
                       max_decode_length: int):
  """Zero-filled decoder cache for `max_decode_length` steps (shape-only tracing).

  Returns the 'cache' collection: per decoder self-attention layer
  `cached_key`/`cached_value` [B, H, K, L] zeros (activation dtype) and
  `cache_index` 0, as the first `decode=True` call would create it.
  """
  enc = jnp.ones((batch_size, encoder_length), jnp.int32)
  dec = jnp.ones((batch_size, max_decode_length), jnp.int32)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), enc, dec, dec,
                         enable_dropout=False, decode=True)['cache'])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
