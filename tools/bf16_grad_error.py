"""How far the bfloat16 network's gradients are from float32's, on the same parameters and batch.

    python tools/bf16_grad_error.py [--size small] [--li 512] [--lt 32] [--batch 4]

Loss: the teacher-forced sum of target log-probs (float32 log-softmax) of random tokens.
Prints ‖g_bf16 − g_f32‖ / ‖g_f32‖ for the two relative-position-bias tables and for all
parameters together. Use it to check that a change to the bf16 path keeps its rounding
error where it was: run it on the code before and after (`PYTHONPATH=<tree>`).
"""
from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from slic_jax import network


def relative_errors(size: str, li: int, lt: int, batch: int, vocab: int, seed: int = 0):
  """{name: relative error} of the bf16 gradients against the float32 ones."""
  cfg = network.make_config(size, vocab_size=vocab)
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  enc = jax.random.randint(k[0], (batch, li), 1, vocab)
  dec = jax.random.randint(k[1], (batch, lt), 1, vocab)
  tgt = jax.random.randint(k[2], (batch, lt), 1, vocab)
  f32 = network.Transformer(cfg)
  bf16 = network.Transformer(dataclasses.replace(cfg, dtype='bfloat16', logits_dtype='bfloat16'))
  params = f32.init(k[3], enc, dec, tgt, enable_dropout=False)['params']

  def grads(model):
    def loss(p):
      logits = model.apply({'params': p}, enc, dec, tgt, enable_dropout=False)
      logp = jax.nn.log_softmax(logits.astype(jnp.float32))
      return jnp.sum(logp * jax.nn.one_hot(tgt, vocab))
    return dict(jax.tree_util.tree_leaves_with_path(jax.jit(jax.grad(loss))(params)))

  g32, g16 = grads(f32), grads(bf16)
  sq = lambda x: float(jnp.sum(jnp.square(x.astype(jnp.float32))))
  out = {}
  for path, a in g32.items():
    name = jax.tree_util.keystr(path)
    if 'rel_embedding' in name:
      out[name] = (sq(g16[path] - a) / sq(a)) ** 0.5
  out['all parameters'] = (sum(sq(g16[p] - a) for p, a in g32.items())
                           / sum(sq(a) for a in g32.values())) ** 0.5
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--size', default='small')
  ap.add_argument('--li', type=int, default=512)
  ap.add_argument('--lt', type=int, default=32)
  ap.add_argument('--batch', type=int, default=4)
  ap.add_argument('--vocab', type=int, default=512, help='a small vocabulary keeps it fast')
  args = ap.parse_args()
  print(f'{network.__file__}: {args.size}, {args.batch} rows, Li {args.li}, Lt {args.lt}')
  for name, err in relative_errors(args.size, args.li, args.lt, args.batch, args.vocab).items():
    print(f'{err:.5f}  {name}')


if __name__ == '__main__':
  main()
