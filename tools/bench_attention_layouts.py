r"""The attention core's matmuls on XLA:CPU in the layouts the network could give them.

Run (one real CPU device; under a minute)::

  .venv/bin/python tools/bench_attention_layouts.py --batch 4 --heads 6 --length 512

Each row is one jitted ``jnp.einsum`` over random float32 operands that are passed in
the layout its equation names (so the row times the dot and whatever copies XLA adds
for it, nothing else): ``bqhd`` is slic_jax's [B, L, H, K] projection output,
``bhqd`` a heads-major copy, ``bhqk`` the [B, H, Lq, Lk] logits. The rows are the
forward logits (q·kᵀ) and weighted values (p·v) and the backward's key gradient
(dlogitsᵀ·q), each as the network writes it and in heads-major forms. Prints a markdown
table: median of ``--reps`` calls after one warm-up, and GFLOP/s (2·B·H·Lq·Lk·K per dot).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

# (name, equation, operands): the operands are the arrays of `ARRAYS`, each copied into
# the layout its subscripts in the equation name; rows of one group compute one product.
ROWS = (
    ("logits, as the network", "bqhd,bkhd->bhqk", ("q", "k")),
    ("logits, heads-major q, k", "bhqd,bhkd->bhqk", ("q", "k")),
    ("logits, heads-major q, kᵀ", "bhqd,bhdk->bhqk", ("q", "k")),
    ("p·v, as the network", "bhqk,bkhd->bqhd", ("p", "v")),
    ("p·v, heads-major v", "bhqk,bhkd->bhqd", ("p", "v")),
    ("dk = dlogitsᵀ·q, as JAX's transpose", "bhqk,bqhd->bkhd", ("g", "q")),
    ("dk, heads-major qᵀ (matmul._canonical_einsum)", "bhdq,bhqk->bhdk", ("q", "g")),
    ("dk, heads-major q", "bhqk,bhqd->bhkd", ("g", "q")),
    ("dk, dlogits transposed beforehand", "bhkq,bhqd->bhkd", ("g", "q")),
)
# The arrays in the network's layouts: q, k, v [B, L, H, K]; p, g (dlogits) [B, H, Lq, Lk].
ARRAYS = {"q": "bqhd", "k": "bkhd", "v": "bkhd", "p": "bhqk", "g": "bhqk"}


def operands(equation: str, names, sizes: dict[str, int], seed: int = 0) -> list[jax.Array]:
  """The named arrays (random, float32, `ARRAYS` layouts) copied into the equation's layouts."""
  rng = np.random.default_rng(seed)
  arrays = {n: rng.standard_normal([sizes[c] for c in s], np.float32) for n, s in ARRAYS.items()}
  subscripts = equation.split("->")[0].split(",")
  return [jnp.asarray(np.ascontiguousarray(np.einsum(f"{ARRAYS[n]}->{s}", arrays[n])))
          for n, s in zip(names, subscripts)]


def time_einsum(equation: str, names, sizes: dict[str, int], reps: int) -> float:
  """Median seconds of one jitted einsum call on operands already in its layouts."""
  ops = operands(equation, names, sizes)
  f = jax.jit(lambda a, b: jnp.einsum(equation, a, b))
  jax.block_until_ready(f(*ops))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*ops))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--batch", type=int, default=4, help="B: prompts (encoder self-attention)")
  ap.add_argument("--heads", type=int, default=6, help="H (T5 1.1 small: 6)")
  ap.add_argument("--head_dim", type=int, default=64, help="K (T5 1.1: 64)")
  ap.add_argument("--length", type=int, default=512, help="Lq = Lk")
  ap.add_argument("--reps", type=int, default=9)
  args = ap.parse_args(argv)
  n = args.length
  sizes = {"b": args.batch, "h": args.heads, "q": n, "k": n, "d": args.head_dim}
  flops = 2 * args.batch * args.heads * n * n * args.head_dim
  print(f"B {args.batch}, H {args.heads}, K {args.head_dim}, Lq = Lk {n}, float32, "
        f"{jax.devices()[0].device_kind}\n")
  print("| matmul | einsum | ms | GFLOP/s |\n|---|---|---|---|")
  for name, equation, names in ROWS:
    s = time_einsum(equation, names, sizes, args.reps)
    print(f"| {name} | `{equation}` | {s * 1e3:.2f} | {flops / s / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
  main()
