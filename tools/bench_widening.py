"""Widened against mixed bf16 dots on this CPU, per dot shape: the data behind
`slic_jax.matmul.WIDEN_MIN_FLOPS_PER_ELEMENT`.

Where the CPU has no bf16 dot instruction (`platforms.cpu_low_precision_dots` 'float32')
slic_jax widens a bf16 dot's operands to float32 when the dot does at least that many
FLOPs per operand element, and leaves it to XLA's mixed bf16 × bf16 → f32 dot otherwise.
This tool times both forms of each dot in one process, alternating (the order swapped
every other round, so that this VM's drift reaches both alike), and reports the median
time of each, the median of the per-round ratios and how often the mixed dot won:

* 'mk,kn->mn' with M 2048, K 512 and N from 64 to 2048 (124 to 2048 FLOPs per
  operand element), through `matmul.accumulate` (the forward passes' form);
* the attention's dots of T5 1.1 small (4 prompts, 6 heads of 64) at Li 512 and 1024:
  p·v (`accumulate`), its gradients dv = pᵀ·g and dq = dlogits·k (`matmul.contract`,
  the backward passes' form, with its layout transposes), and the scores' q·kᵀ.

    .venv/bin/python tools/bench_widening.py --reps 30 --out OUT.json

The mode is forced to 'float32' (`$SLIC_JAX_CPU_LOW_PRECISION_DOTS`) so that the tool
runs on any CPU; only on one without bf16 dots does it measure the choice slic_jax makes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cases(small: bool = False) -> list[dict]:
  """[{name, kind ('accumulate' | 'contract'), equation, a, b}] (shapes)."""
  if small:  # for the tests: seconds, not minutes
    gemm = [(256, 32, n) for n in (8, 512)]
    lis, batch, heads, head_dim = (32,), 1, 2, 8
  else:
    gemm = [(2048, 512, n) for n in (64, 128, 256, 512, 2048)]
    lis, batch, heads, head_dim = (512, 1024), 4, 6, 64
  out = [dict(name=f"mk,kn->mn M {m} K {k} N {n}", kind="accumulate", equation="mk,kn->mn",
              a=(m, k), b=(k, n)) for m, k, n in gemm]
  for li in lis:
    p, v = (batch, heads, li, li), (batch, li, heads, head_dim)
    out += [dict(name=f"p·v Li {li}", kind="accumulate", equation="bhqk,bkhd->bqhd", a=p, b=v),
            dict(name=f"dv = pᵀ·g Li {li}", kind="contract", equation="bhqk,bqhd->bkhd",
                 a=p, b=v),
            dict(name=f"dq = dlogits·k Li {li}", kind="contract",
                 equation="bhqk,bkhd->bqhd", a=p, b=v),
            dict(name=f"scores q·kᵀ Li {li}", kind="contract", equation="bqhd,bkhd->bhqk",
                 a=v, b=v)]
  return out


def flops_per_operand_element(equation: str, a: tuple, b: tuple) -> float:
  """2 · Π (the sizes of every subscript) / (|a| + |b|): `matmul._widens`'s measure."""
  sa, sb = equation.split("->")[0].split(",")
  sizes = {**dict(zip(sa, a)), **dict(zip(sb, b))}
  return 2 * math.prod(sizes.values()) / (math.prod(a) + math.prod(b))


def measure(case: dict, reps: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from slic_jax import matmul

  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal(case["a"], np.float32)).astype(jnp.bfloat16)
  b = jnp.asarray(rng.standard_normal(case["b"], np.float32)).astype(jnp.bfloat16)
  eq = case["equation"]
  fn = ((lambda a, b: matmul.accumulate(eq, a, b)) if case["kind"] == "accumulate" else
        (lambda a, b: matmul.contract(eq, a, b, dtype=jnp.bfloat16)))
  default = matmul.WIDEN_MIN_FLOPS_PER_ELEMENT
  compiled = {}
  try:
    for form, threshold in (("widened", 0), ("mixed", math.inf)):
      matmul.WIDEN_MIN_FLOPS_PER_ELEMENT = threshold
      jax.clear_caches()
      compiled[form] = jax.jit(fn).lower(a, b).compile()
      compiled[form](a, b).block_until_ready()
  finally:
    matmul.WIDEN_MIN_FLOPS_PER_ELEMENT = default
  times = {"widened": [], "mixed": []}
  for r in range(reps):
    for form in (("widened", "mixed") if r % 2 == 0 else ("mixed", "widened")):
      t0 = time.perf_counter()
      compiled[form](a, b).block_until_ready()
      times[form].append(time.perf_counter() - t0)
  ratios = [m / w for w, m in zip(times["widened"], times["mixed"])]
  fpe = flops_per_operand_element(eq, case["a"], case["b"])
  flops = fpe * (math.prod(case["a"]) + math.prod(case["b"]))
  return {**case, "flops_per_operand_element": fpe,
          "widened_ms": 1e3 * statistics.median(times["widened"]),
          "mixed_ms": 1e3 * statistics.median(times["mixed"]),
          "widened_gflops": flops / statistics.median(times["widened"]) / 1e9,
          "mixed_gflops": flops / statistics.median(times["mixed"]) / 1e9,
          "mixed_over_widened": statistics.median(ratios),
          "mixed_faster": sum(x < 1 for x in ratios), "reps": reps,
          "slic_jax_widens": fpe >= default, "times_s": times}


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    import platform
    return platform.machine()


def to_markdown(res: dict) -> str:
  lines = [f"# Widened against mixed bf16 dots, {res['machine']}", "",
           f"command: `{res['command']}`; threshold "
           f"`matmul.WIDEN_MIN_FLOPS_PER_ELEMENT` = {res['threshold']:g}; this CPU's own "
           f"mode: {res['cpu_low_precision_dots']}", "",
           "| dot | FLOPs per operand element | widened ms (GFLOP/s) | mixed ms (GFLOP/s) "
           "| mixed / widened time (median of rounds) | mixed faster | slic_jax runs |",
           "|---|---|---|---|---|---|---|"]
  for r in res["cases"]:
    lines.append(
        f"| {r['name']} | {r['flops_per_operand_element']:.0f} | {r['widened_ms']:.2f} "
        f"({r['widened_gflops']:.0f}) | {r['mixed_ms']:.2f} ({r['mixed_gflops']:.0f}) | "
        f"{r['mixed_over_widened']:.3f} | {r['mixed_faster']}/{r['reps']} | "
        f"{'widened' if r['slic_jax_widens'] else 'mixed'} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--reps", type=int, default=30)
  ap.add_argument("--small", action="store_true", help="tiny shapes (tests)")
  ap.add_argument("--out", default=None, help="JSON path; the markdown beside it (.md)")
  args = ap.parse_args(argv)
  from slic_jax import matmul, platforms
  own = platforms.cpu_low_precision_dots()
  res = {"command": "python tools/bench_widening.py " + " ".join(argv or sys.argv[1:]),
         "machine": f"{os.cpu_count()} CPU cores ({_cpu_model()})",
         "cpu_low_precision_dots": own, "threshold": matmul.WIDEN_MIN_FLOPS_PER_ELEMENT,
         "cases": []}
  name, before = platforms.LOW_PRECISION_DOTS_ENV, os.environ.get(platforms.LOW_PRECISION_DOTS_ENV)
  os.environ[name] = "float32"
  try:
    for case in cases(args.small):
      r = measure(case, args.reps)
      res["cases"].append(r)
      print(f"{r['name']}: F/E {r['flops_per_operand_element']:.0f}, mixed / widened "
            f"{r['mixed_over_widened']:.3f} ({r['mixed_faster']}/{r['reps']})", flush=True)
  finally:
    if before is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = before
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
      f.write(to_markdown(res))
  return res


if __name__ == "__main__":
  main()
