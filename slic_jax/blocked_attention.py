"""Attention over blocks of queries, so that each block's logits stay in the CPU's cache.

    o[b, q, h] = Σ_k p[b, h, q, k] · v[b, k, h],
    p[b, h, q, :] = softmax_k(q[b, q, h] · k[b, k, h] + mask_bias[b, ·, q, k] + pos_bias[·, h, q, k])

computed by a `lax.scan` over blocks of `block_q` queries (all batch rows and heads of those
queries in one block), forward and backward (custom VJP). Unblocked, every elementwise pass
over the float32 logits [B, H, Lq, Lk] (the bias add, the max, the exp, the normalisation;
in the backward pass dp − row and the product with p) reads and writes the whole array in
main memory: T5 1.1 small's encoder logits at 4 pairs are 25 MB at Li 512 and 100 MB at
Li 1024, so that cost grows with Li² at memory bandwidth, not at matmul speed. A block of a
few MB stays in the last-level cache between its passes; only p goes to memory (once,
the residual of the backward pass, as unblocked).

Opt-in (`network.T5Config.attention_block_bytes`, default 0): on the CPU measured it was
not faster inside the SLiC-HF step (T5 1.1 small, float32, 4 pairs, Li 1024: small blocks
make the attention matmuls small and slow, 20–28 GFLOP/s at 32 queries per block;
`benchmarks/NOTES.md`, session 16).

Per block (queries Q of the block; f32 = float32; every matmul rounds its operands to
`dtype` and accumulates in float32, as `slic_jax.matmul`):

    forward:  s = q_Q kᵀ + biases_Q (f32),  p = exp(s − max s) / Σ_k exp(s − max s),
              o_Q = p v  (returned in `dtype`; p kept, in float32 or `dtype`)
    backward: dv += p_Qᵀ do_Q,  dp = do_Q vᵀ,  row = Σ_d do_Q ⊙ o_Q,
              ds = p ⊙ (dp − row),  dq_Q = ds k,  dk += ds_Qᵀ q_Q,
              d pos_bias[:, :, Q] = Σ_b ds

(the softmax gradient's row term from the output, as FlashAttention's backward). The
matmuls use [batch, M, K] × [batch, K, N] layouts (k, v and their transposes are laid
out once, outside the loop), which XLA:CPU's matmul library takes without copies.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import jax
from jax import lax
import jax.numpy as jnp

from slic_jax import matmul


def block_size(batch: int, heads: int, q_len: int, k_len: int, budget_bytes: int) -> int:
  """Queries per block: the largest divisor of `q_len` whose float32 logits block
  [batch, heads, block, k_len] fits in `budget_bytes` (at least 1); `q_len` when the whole
  array fits (no blocking)."""
  row_bytes = batch * heads * k_len * 4
  best = 1
  for n in range(1, q_len + 1):
    if q_len % n == 0 and n * row_bytes <= budget_bytes:
      best = n
  return best


def blocked_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                      mask_bias: Optional[jax.Array], position_bias: Optional[jax.Array], *,
                      dtype: Any, block_q: int) -> jax.Array:
  """softmax(q kᵀ + mask_bias + position_bias) v over blocks of `block_q` queries.

  Args:
    query: [B, Lq, H, K]; key, value: [B, Lk, H, K] (any float dtype).
    mask_bias: [B or 1, 1, Lq, Lk] additive mask (0 or a large negative number), or None;
      it gets no gradient (a function of the tokens).
    position_bias: [1, H, Lq, Lk] (the relative position bias), or None; differentiable.
    dtype: compute dtype of the matmuls (float32 or bfloat16); logits and softmax are float32.
    block_q: queries per block; must divide Lq.

  Returns:
    [B, Lq, H, K] in `dtype`.
  """
  q_len = query.shape[1]
  if q_len % block_q:
    raise ValueError(f'blocked_attention: block_q={block_q} does not divide the query '
                     f'length {q_len}')
  if mask_bias is not None:
    mask_bias = lax.stop_gradient(mask_bias.astype(jnp.float32))
  return _blocked(jnp.dtype(dtype), block_q, query, key, value, mask_bias, position_bias)


def _blocks(x, block_q):
  """[B, Lq, H, K] -> [Lq / block_q, B, H, block_q, K]."""
  b, lq, h, d = x.shape
  return x.reshape(b, lq // block_q, block_q, h, d).transpose(1, 0, 3, 2, 4)


def _unblocks(x):
  """[n, B, H, block_q, K] -> [B, n · block_q, H, K]."""
  n, b, h, bq, d = x.shape
  return x.transpose(1, 0, 3, 2, 4).reshape(b, n * bq, h, d)


def _bias_rows(bias, start, block_q):
  return lax.dynamic_slice_in_dim(bias, start, block_q, axis=2)


def _dot(equation, a, b, dtype):
  return matmul.accumulate(equation, a.astype(dtype), b.astype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _blocked(dtype, block_q, query, key, value, mask_bias, position_bias):
  return _blocked_fwd(dtype, block_q, query, key, value, mask_bias, position_bias)[0]


def _blocked_fwd(dtype, block_q, query, key, value, mask_bias, position_bias):
  k = jnp.swapaxes(key, 1, 2).astype(dtype)          # [B, H, Lk, K]
  k_t = jnp.swapaxes(k, 2, 3)                        # [B, H, K, Lk]
  v = jnp.swapaxes(value, 1, 2).astype(dtype)        # [B, H, Lk, K]
  p_dtype = jnp.float32 if dtype == jnp.float32 else dtype

  def body(_, xs):
    c, q = xs                                        # q [B, H, bq, K]
    s = _dot('bhqd,bhdk->bhqk', q, k_t, dtype)       # [B, H, bq, Lk] float32
    if mask_bias is not None:
      s = s + _bias_rows(mask_bias, c * block_q, block_q)
    if position_bias is not None:
      s = s + _bias_rows(position_bias, c * block_q, block_q).astype(jnp.float32)
    e = jnp.exp(s - matmul.row_max(s, keepdims=True))
    p = (e * (1.0 / matmul.sum_by_dot(e, -1, keepdims=True))).astype(p_dtype)
    o = _dot('bhqk,bhkd->bhqd', p, v, dtype).astype(dtype)
    return None, (o, p)

  q_blocks = _blocks(query, block_q)
  n = q_blocks.shape[0]
  _, (o_blocks, p) = lax.scan(body, None, (jnp.arange(n), q_blocks))
  # Zero-size tags carry the dtypes (and the biases' shapes) the backward pass needs, so
  # the biases themselves are not kept alive for it (as network._add_position_bias).
  tags = tuple(None if x is None else jnp.zeros((0,) + x.shape, x.dtype)
               for x in (query, key, value, mask_bias, position_bias))
  return _unblocks(o_blocks), (q_blocks, k, k_t, v, p, o_blocks, tags)


def _blocked_bwd(dtype, block_q, res, g):
  q_blocks, k, k_t, v, p, o_blocks, (q_tag, k_tag, v_tag, mask_tag, pos_tag) = res
  v_t = jnp.swapaxes(v, 2, 3)                        # [B, H, K, Lk]
  g_blocks = _blocks(g, block_q).astype(dtype)       # [n, B, H, bq, K]
  b, h, lk, d = k.shape
  want_pos = pos_tag is not None

  def body(carry, xs):
    dk_t, dv_t, dpos = carry
    c, q, p_c, o_c, g_c = xs
    dv_t = dv_t + _dot('bhdq,bhqk->bhdk', jnp.swapaxes(g_c, 2, 3), p_c, dtype)
    dp = _dot('bhqd,bhdk->bhqk', g_c, v_t, dtype)
    row = jnp.einsum('bhqd,bhqd->bhq', g_c.astype(jnp.float32),
                     o_c.astype(jnp.float32))[..., None]
    ds = p_c.astype(jnp.float32) * (dp - row)        # [B, H, bq, Lk]
    dq = _dot('bhqk,bhkd->bhqd', ds, k, dtype)
    dk_t = dk_t + _dot('bhdq,bhqk->bhdk', jnp.swapaxes(q, 2, 3), ds, dtype)
    if want_pos:
      dpos = lax.dynamic_update_slice_in_dim(
          dpos, jnp.sum(ds, axis=0, keepdims=True), c * block_q, axis=2)
    return (dk_t, dv_t, dpos), dq

  n = q_blocks.shape[0]
  zeros_t = jnp.zeros((b, h, d, lk), jnp.float32)
  dpos0 = (jnp.zeros(pos_tag.shape[1:], jnp.float32) if want_pos
           else jnp.zeros((0,), jnp.float32))
  (dk_t, dv_t, dpos), dq_blocks = lax.scan(
      body, (zeros_t, zeros_t, dpos0), (jnp.arange(n), q_blocks, p, o_blocks, g_blocks))
  dq = _unblocks(dq_blocks).astype(q_tag.dtype)
  dk = jnp.transpose(dk_t, (0, 3, 1, 2)).astype(k_tag.dtype)   # [B, Lk, H, K]
  dv = jnp.transpose(dv_t, (0, 3, 1, 2)).astype(v_tag.dtype)
  d_mask = None if mask_tag is None else jnp.zeros(mask_tag.shape[1:], mask_tag.dtype)
  d_pos = dpos.astype(pos_tag.dtype) if want_pos else None
  return dq, dk, dv, d_mask, d_pos


_blocked.defvjp(_blocked_fwd, _blocked_bwd)
