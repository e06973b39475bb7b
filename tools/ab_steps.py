"""Two variants of the SLiC-HF step in one process, their steps run in turn: a paired A/B.

`tools/ab_commits.py` runs whole processes in turn, and on a VM whose speed drifts over
minutes four rounds cannot resolve a 10% step-time change (`benchmarks/NOTES.md`, session
40). Where the change is a worker option (an XLA option, the attention or optimizer
implementation, the widening threshold, the dtype, remat ...), both steps can live in one
process: this tool compiles the step of each variant (`benchmark.compile_slic_step`, the
step worker's own), then runs one step of each per pair, the order swapped every other
pair (`benchmark.in_turn`), so that both see the same phase of the machine. Per pair it
takes head / base of the two adjacent steps; it reports the median of those ratios, their
quartiles, the pairs the head won, each variant's median step, XLA's temporaries and the
loss of every step of each variant (the same losses on both sides mean the variants
compute the same thing; where they part, the first step whose loss differs), as markdown
and JSON:

    .venv/bin/python tools/ab_steps.py --pairs 12 --out OUT.json \\
        --head "--widen_min_flops_per_element 0" -- --size small --li 512 --lt 64 \\
        --batch 4 --dtype bfloat16 --logits_dtype bfloat16 --reg_target chosen

Arguments after ``--`` are the step worker's (`tools/benchmark.py`) and apply to both;
``--base`` and ``--head`` add each variant's own, parsed after them. Both variants share
the process: its malloc settings (``--host_malloc`` must agree) and its peak RSS, which is
reported once. ``--base ""`` and ``--head ""`` (the same step twice) is the A/A check of
the method on the machine at hand.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ab_commits  # noqa: E402  (standard library only at import)
import benchmark  # noqa: E402


def variant_args(common: list[str], own: str):
  """The worker namespace of one variant: the common worker arguments, then its own."""
  return benchmark.parse_args([*common, *shlex.split(own)])


def paired_ratios(base: list[float], head: list[float]) -> dict:
  """Per-pair head / base step times -> {ratios, median, q1, q3, head_wins, pairs}."""
  if len(base) != len(head) or not base:
    raise ValueError(f"paired_ratios: {len(base)} base and {len(head)} head steps")
  ratios = [h / b for b, h in zip(base, head)]
  q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
  return dict(ratios=ratios, median=statistics.median(ratios), q1=q[0], q3=q[2],
              head_wins=sum(r < 1.0 for r in ratios), pairs=len(ratios))


def first_difference(base: list[float], head: list[float]) -> dict | None:
  """The first step (1-based) whose losses differ: {step, base, head}; None if all agree.

  Step k's loss is computed with the parameters after k − 1 updates, so a difference first
  seen at step 2 comes from the first update. The losses are the steps' float32 scalars,
  compared exactly: variants that compute the same thing in the same order (an A/A run, a
  change of schedule only) agree at every step; a change of rounding (another reduction
  order, another optimizer formulation) shows where it first reaches the loss and how far
  the two runs then drift."""
  if len(base) != len(head):
    raise ValueError(f"first_difference: {len(base)} base and {len(head)} head losses")
  for i, (b, h) in enumerate(zip(base, head)):
    if b != h:
      return dict(step=i + 1, base=b, head=h)
  return None


def run(common: list[str], base: str, head: str, pairs: int, warmup: int) -> dict:
  """Compiles both variants' steps in this process and runs ``pairs`` pairs of steps."""
  t_start = time.perf_counter()
  args = {"base": variant_args(common, base), "head": variant_args(common, head)}
  if args["base"].host_malloc != args["head"].host_malloc:
    raise SystemExit("ab_steps: --host_malloc is per process; give it after -- for both")
  reuse = benchmark.apply_host_malloc(args["base"].host_malloc)  # before jax starts
  from slic_jax import matmul
  defaults = {name: getattr(matmul, name) for name in benchmark.MATMUL_TUNABLES}
  steps = {}
  for label, a in args.items():
    benchmark._progress(t_start, f"{label}: compiling")  # pylint: disable=protected-access
    steps[label] = benchmark.compile_slic_step(a, t_start)
    # the settings it traced with; then the module's defaults again for the next variant
    steps[label]["tunables"] = {name: getattr(matmul, name) for name in defaults}
    for name, value in defaults.items():
      setattr(matmul, name, value)
  times = {label: [] for label in steps}
  losses = {label: [] for label in steps}  # every step's, the warm-up pairs' included
  for i in range(warmup + pairs):
    for label in benchmark.in_turn(list(steps), i):
      s = steps[label]
      s["state"], s["metrics"], dt, _, _ = benchmark.timed_step(s["compiled"], s["state"],
                                                                  s["batch"])
      losses[label].append(benchmark.final_loss(s["metrics"]))
      if i >= warmup:
        times[label].append(dt)
    benchmark._progress(t_start, f"pair {i}: " + ", ".join(  # pylint: disable=protected-access
        f"{label} {times[label][-1]:.3f} s" for label in steps if i >= warmup))
  summary = {label: dict(args=own, median_s=statistics.median(times[label]),
                         fastest_s=min(times[label]),
                         temp_mb=steps[label]["mem"].get("temp_size_mb"),
                         widen_min_flops_per_element=steps[label]["tunables"][
                             "WIDEN_MIN_FLOPS_PER_ELEMENT"],
                         row_max_level=steps[label]["tunables"]["ROW_MAX_LEVEL"],
                         final_loss=losses[label][-1])
             for label, own in (("base", base), ("head", head))}
  return dict(worker_args=common, pairs=pairs, warmup=warmup, times=times, summary=summary,
              losses=losses, losses_part=first_difference(losses["base"], losses["head"]),
              head_over_base=paired_ratios(times["base"], times["head"]),
              peak_rss_mb=benchmark._peak_rss_mb(),  # pylint: disable=protected-access
              host_malloc=args["base"].host_malloc if reuse else "glibc default",
              cpu=ab_commits.cpu_name())


def markdown(report: dict) -> str:
  s, r = report["summary"], report["head_over_base"]
  lines = [f"# Paired step A/B in one process: `{s['base']['args'] or '(worker defaults)'}` "
           f"(base) against `{s['head']['args'] or '(worker defaults)'}` (head)", "",
           f"command: `{report['command']}`; worker arguments: `{' '.join(report['worker_args'])}`;"
           f" {report['pairs']} pairs after {report['warmup']} warm-up pairs, the order swapped"
           f" every other pair; {report['cpu']}; peak RSS of the process (both steps)"
           f" {report['peak_rss_mb']:.0f} MB", "",
           "| variant | own arguments | median s/step | fastest s/step | XLA temporaries MB | loss after the last step |",
           "|---|---|---|---|---|---|"]
  for label in ("base", "head"):
    v = s[label]
    temp = "–" if v["temp_mb"] is None else f"{v['temp_mb']:.0f}"
    lines.append(f"| {label} | `{v['args']}` | {v['median_s']:.3f} | {v['fastest_s']:.3f} | "
                 f"{temp} | {v['final_loss']:.5f} |")
  lines += ["", losses_line(report)]
  lines += ["", f"head / base per pair: median {r['median']:.3f} (quartiles {r['q1']:.3f}–"
            f"{r['q3']:.3f}); the head the faster in {r['head_wins']} of {r['pairs']} pairs", "",
            "| pair | base s | head s | head / base |", "|---|---|---|---|"]
  for i, (b, h) in enumerate(zip(report["times"]["base"], report["times"]["head"])):
    lines.append(f"| {i} | {b:.3f} | {h:.3f} | {h / b:.3f} |")
  return "\n".join(lines) + "\n"


def losses_line(report: dict) -> str:
  """One sentence on the two variants' losses step by step."""
  if "losses" not in report:  # a report written before the losses were kept
    return "Losses: only the last step's kept (in the table)."
  n = len(report["losses"]["base"])
  part = report["losses_part"]
  if part is None:
    return f"Losses: the same at all {n} steps (warm-up included)."
  rel = abs(part["head"] - part["base"]) / max(abs(part["base"]), 1e-30)
  return (f"Losses: the same through step {part['step'] - 1} of {n} (warm-up included); at "
          f"step {part['step']} base {part['base']:.5f}, head {part['head']:.5f} (relative "
          f"difference {rel:.1e}); after the last step as in the table.")


def main(argv=None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  common = argv[argv.index("--") + 1:] if "--" in argv else []
  own = argv[:argv.index("--")] if "--" in argv else argv
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--base", default="", help="the base variant's own worker arguments")
  ap.add_argument("--head", default="", help="the head variant's own worker arguments")
  ap.add_argument("--pairs", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=2, help="untimed pairs first")
  ap.add_argument("--out", required=True, help="JSON path; the markdown goes beside it (.md)")
  args = ap.parse_args(own)
  if args.pairs < 1 or args.warmup < 0:
    raise SystemExit("ab_steps: --pairs must be >= 1 and --warmup >= 0")
  report = run(common, args.base, args.head, args.pairs, args.warmup)
  report["command"] = "python tools/ab_steps.py " + " ".join(shlex.quote(a) for a in argv)
  ab_commits.write_report(report, markdown(report), args.out)


if __name__ == "__main__":
  main()
