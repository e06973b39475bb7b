"""The SLiC-HF step of two commits, their processes run in turn: a before/after A/B.

A change to the step is judged by the step before and after it on the same machine in the
same run. This tool checks out each revision into a temporary git worktree, then runs
`tools/benchmark.py --_worker slic ...` (the benchmark's own step process, with the
arguments given after ``--``) from each checkout in turn, ``--rounds`` times (A B A B ...,
the order swapped every other round so that a drifting VM reaches both alike), each with
its own checkout's ``slic_jax`` on ``PYTHONPATH``. It reports per revision the fastest and
the median of its processes' median steps, how many rounds each won, the peak RSS, XLA's
temporaries and the final loss (the same loss on both sides means the change kept the
arithmetic), as markdown and JSON:

    .venv/bin/python tools/ab_commits.py --base fe397cd --head HEAD --rounds 4 \\
        --out OUT.json -- --size small --li 512 --lt 64 --batch 4 --dtype float32 \\
        --logits_dtype float32 --reg_target chosen --steps 5

``--head WORKTREE`` runs the working tree itself (uncommitted edits included) against
``--base``. The python that runs this tool runs the workers (the project's ``.venv``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402  (standard library only at import)

REPO = benchmark.REPO
WORKTREE = "WORKTREE"
WORKER_TIMEOUT_S = 3600


def resolve(rev: str, repo: str) -> str:
  """The full commit id of ``rev``; raises SystemExit naming it if git does not know it."""
  if rev == WORKTREE:
    return WORKTREE
  p = subprocess.run(["git", "-C", repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                     capture_output=True, text=True)
  if p.returncode != 0:
    raise SystemExit(f"ab_commits: --base/--head {rev!r} is not a commit of {repo}")
  return p.stdout.strip()


def checkout(commit: str, parent: str, repo: str) -> str:
  """A detached worktree of ``commit`` under ``parent`` (the repo itself for WORKTREE)."""
  if commit == WORKTREE:
    return repo
  path = os.path.join(parent, commit[:12])
  subprocess.run(["git", "-C", repo, "worktree", "add", "--detach", "-f", path, commit],
                 check=True, capture_output=True)
  return path


def remove(path: str, repo: str) -> None:
  if path != repo:
    subprocess.run(["git", "-C", repo, "worktree", "remove", "--force", path],
                   capture_output=True)


def run_worker(tree: str, worker_args: list[str]) -> dict:
  """One step process of the checkout ``tree``, in the environment `tools/benchmark.py`
  gives its own workers (`benchmark._run_json`): the worker's JSON."""
  cmd = [sys.executable, os.path.join(tree, "tools", "benchmark.py"), "--_worker", "slic",
         *worker_args]
  d = benchmark._run_json(cmd, WORKER_TIMEOUT_S, {"PYTHONPATH": tree}, cwd=tree)  # pylint: disable=protected-access
  if "error" in d:
    raise SystemExit(f"ab_commits: the worker of {tree} failed ({d['error']}):\n"
                     f"{' '.join(cmd)}\n{d.get('stderr_tail', '')}")
  return d


def summarize(runs: list[dict]) -> dict:
  """runs: [{round, label, step_s_median, peak_rss_mb, temp_mb, final_loss}] ->
  {label: {fastest_s, median_s, wins, peak_rss_mb, temp_mb, final_losses}} and the
  head/base ratio of the fastest and median steps."""
  labels = list(dict.fromkeys(r["label"] for r in runs))
  out = {}
  for label in labels:
    mine = [r for r in runs if r["label"] == label]
    steps = [r["step_s_median"] for r in mine]
    wins = 0
    for r in mine:
      rivals = [o["step_s_median"] for o in runs
                if o["round"] == r["round"] and o["label"] != label]
      wins += bool(rivals) and r["step_s_median"] < min(rivals)
    out[label] = dict(processes=len(mine), fastest_s=min(steps), median_s=statistics.median(steps),
                      wins=wins, peak_rss_mb=min(r["peak_rss_mb"] for r in mine),
                      temp_mb=mine[0]["temp_mb"],
                      final_losses=sorted({r["final_loss"] for r in mine}))
  if len(labels) == 2:
    base, head = (out[l] for l in labels)
    out["head_over_base"] = dict(fastest=head["fastest_s"] / base["fastest_s"],
                                 median=head["median_s"] / base["median_s"])
  return out


def markdown(report: dict) -> str:
  s = report["summary"]
  lines = [f"# Step A/B: {report['base']} (base) against {report['head']} (head)", "",
           f"command: `{report['command']}`; worker arguments: `{' '.join(report['worker_args'])}`;"
           f" {report['rounds']} rounds, the order swapped every other round; {report['cpu']}", "",
           "| revision | fastest s/step | median s/step | rounds won | peak RSS MB | XLA temporaries MB | final loss |",
           "|---|---|---|---|---|---|---|"]
  for label in (report["base"], report["head"]):
    r = s[label]
    lines.append(f"| {label} | {r['fastest_s']:.3f} | {r['median_s']:.3f} | {r['wins']}/{r['processes']} | "
                 f"{r['peak_rss_mb']:.0f} | {r['temp_mb']:.0f} | {', '.join(f'{x:.5f}' for x in r['final_losses'])} |")
  h = s["head_over_base"]
  lines += ["", f"head / base: fastest {h['fastest']:.3f}, median {h['median']:.3f}", "",
            "| round | revision | median s/step | best s/step | peak RSS MB |", "|---|---|---|---|---|"]
  for r in report["runs"]:
    lines.append(f"| {r['round']} | {r['label']} | {r['step_s_median']:.3f} | {r['step_s_min']:.3f} | "
                 f"{r['peak_rss_mb']:.0f} |")
  return "\n".join(lines) + "\n"


def write_report(report: dict, md: str, out: str) -> None:
  """``report`` as JSON at ``out``, ``md`` beside it (``.md``) and on stdout."""
  with open(out, "w") as f:
    json.dump(report, f, indent=1)
  with open(os.path.splitext(out)[0] + ".md", "w") as f:
    f.write(md)
  print(md)


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return f"{os.cpu_count()} CPU cores ({line.split(':', 1)[1].strip()})"
  except OSError:
    pass
  return f"{os.cpu_count()} CPU cores"


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--base", required=True, help="revision before the change")
  ap.add_argument("--head", default=WORKTREE,
                  help=f"revision after it (default {WORKTREE}: this working tree)")
  ap.add_argument("--rounds", type=int, default=4)
  ap.add_argument("--repo", default=REPO, help="the git repository (default: this one)")
  ap.add_argument("--out", required=True, help="JSON path; the markdown goes beside it (.md)")
  ap.add_argument("worker_args", nargs=argparse.REMAINDER,
                  help="after --: the arguments of `tools/benchmark.py --_worker slic`")
  args = ap.parse_args(argv)
  worker_args = args.worker_args[1:] if args.worker_args[:1] == ["--"] else args.worker_args
  if args.rounds < 1:
    raise SystemExit("ab_commits: --rounds must be at least 1")
  repo = os.path.abspath(args.repo)
  commits = {args.base: resolve(args.base, repo), args.head: resolve(args.head, repo)}
  labels = (args.base, args.head)
  if labels[0] == labels[1]:
    raise SystemExit("ab_commits: --base and --head name the same revision")
  runs = []
  with tempfile.TemporaryDirectory(prefix="ab_commits_") as parent:
    trees = {label: checkout(commits[label], parent, repo) for label in labels}
    try:
      for rnd in range(args.rounds):
        for label in benchmark.in_turn(labels, rnd):
          d = run_worker(trees[label], worker_args)
          runs.append(dict(round=rnd, label=label, commit=commits[label],
                           step_s_median=d["step_s_median"], step_s_min=d["step_s_min"],
                           peak_rss_mb=d["peak_rss_mb"],
                           temp_mb=d["xla_memory_analysis"]["temp_size_mb"],
                           final_loss=d["final_loss"], worker=d))
          print(f"round {rnd} {label}: {d['step_s_median']:.3f} s (best {d['step_s_min']:.3f}),"
                f" {d['peak_rss_mb']:.0f} MB", flush=True)
    finally:
      for tree in trees.values():
        remove(tree, repo)
  report = dict(base=args.base, head=args.head, commits=commits, rounds=args.rounds,
                worker_args=worker_args, cpu=cpu_name(),
                command="python tools/ab_commits.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                runs=runs, summary=summarize(runs))
  write_report(report, markdown(report), args.out)


if __name__ == "__main__":
  main()
