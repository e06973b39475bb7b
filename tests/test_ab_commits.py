"""tools/ab_commits.py: two commits' step processes in turn, on a throw-away git repository
whose `tools/benchmark.py` is a stand-in worker that reports a fixed step time."""
import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import ab_commits  # noqa: E402

WORKER = '''import json, os, sys
STEP = {step}
if "--fail" in sys.argv:
  sys.exit("worker: told to fail")
print("compiling ...")
print(json.dumps(dict(step_s_median=STEP, step_s_min=STEP * 0.9, peak_rss_mb=100.0 + STEP,
                      xla_memory_analysis=dict(temp_size_mb=10.0 * STEP), final_loss=1.25,
                      argv=sys.argv[1:], pythonpath=os.environ["PYTHONPATH"], cwd=os.getcwd())))
'''


def _git(repo, *args):
  return subprocess.run(["git", "-C", repo, "-c", "user.name=t", "-c", "user.email=t@t", *args],
                        check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
  """A repository with two commits: the worker's step takes 2.0 s, then 1.0 s."""
  path = str(tmp_path / "repo")
  os.makedirs(os.path.join(path, "tools"))
  _git(path, "init", "-q")
  commits = []
  for step in (2.0, 1.0):
    with open(os.path.join(path, "tools", "benchmark.py"), "w") as f:
      f.write(WORKER.format(step=step))
    _git(path, "add", "-A")
    _git(path, "commit", "-q", "-m", f"step {step}")
    commits.append(_git(path, "rev-parse", "HEAD"))
  return path, commits


def test_runs_both_commits_in_turn_and_reports_the_faster(repo, tmp_path):
  path, (base, head) = repo
  out = str(tmp_path / "ab.json")
  ab_commits.main(["--repo", path, "--base", base, "--head", head, "--rounds", "3",
                   "--out", out, "--", "--size", "tiny", "--steps", "2"])
  report = json.load(open(out))
  # A B, then B A, then A B: the order swapped every other round.
  assert [r["label"] for r in report["runs"]] == [base, head, head, base, base, head]
  for r in report["runs"]:
    w = r["worker"]
    assert w["argv"] == ["--_worker", "slic", "--size", "tiny", "--steps", "2"]
    assert w["pythonpath"] == w["cwd"] != path  # each commit's own checkout
    assert r["step_s_median"] == (2.0 if r["label"] == base else 1.0)
  s = report["summary"]
  assert (s[base]["fastest_s"], s[head]["fastest_s"]) == (2.0, 1.0)
  assert (s[base]["wins"], s[head]["wins"]) == (0, 3)
  assert (s[base]["temp_mb"], s[head]["peak_rss_mb"]) == (20.0, 101.0)
  assert s[head]["final_losses"] == [1.25]
  assert s["head_over_base"] == {"fastest": 0.5, "median": 0.5}
  md = open(str(tmp_path / "ab.md")).read()
  assert f"| {head} | 1.000 | 1.000 | 3/3 | 101 | 10 | 1.25000 |" in md
  assert "head / base: fastest 0.500, median 0.500" in md
  # The temporary worktrees are gone.
  assert len(_git(path, "worktree", "list").splitlines()) == 1


def test_the_working_tree_against_a_commit(repo, tmp_path):
  path, (base, _) = repo
  with open(os.path.join(path, "tools", "benchmark.py"), "w") as f:
    f.write(WORKER.format(step=4.0))  # uncommitted
  out = str(tmp_path / "ab.json")
  ab_commits.main(["--repo", path, "--base", base, "--rounds", "1", "--out", out])
  report = json.load(open(out))
  s = report["summary"]
  assert (s[base]["fastest_s"], s["WORKTREE"]["fastest_s"]) == (2.0, 4.0)
  assert report["runs"][1]["worker"]["cwd"] == path


def test_bad_revisions_and_failing_workers_are_named(repo, tmp_path):
  path, (base, head) = repo
  out = str(tmp_path / "ab.json")
  with pytest.raises(SystemExit, match="'nosuchrev' is not a commit"):
    ab_commits.main(["--repo", path, "--base", "nosuchrev", "--head", head, "--out", out])
  with pytest.raises(SystemExit, match="same revision"):
    ab_commits.main(["--repo", path, "--base", head, "--head", head, "--out", out])
  with pytest.raises(SystemExit, match="(?s)failed \\(exit 1\\).*told to fail"):
    ab_commits.main(["--repo", path, "--base", base, "--head", head, "--rounds", "1",
                     "--out", out, "--", "--fail"])
  assert len(_git(path, "worktree", "list").splitlines()) == 1
  assert not os.path.exists(out)
