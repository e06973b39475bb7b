"""tools/step_turns.py: worker processes that take turns step by step."""
import json
import os
import sys
import time

import pytest

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
sys.path.insert(0, TOOLS)
import step_turns  # noqa: E402

# A fake worker: `steps` steps of `step_s` seconds each, `between_s` of other work after
# each; prints its steps' wall-clock intervals as JSON. argv: steps step_s between_s
# [exit_code_after_first_step] --_turns R,W
WORKER = f"""
import json, sys, time
sys.path.insert(0, {TOOLS!r})
import step_turns
args = sys.argv[1:]
turns = step_turns.Turns(args[args.index("--_turns") + 1])
steps, step_s, between_s = int(args[0]), float(args[1]), float(args[2])
fail = int(args[3]) if args[3] != "--_turns" else None
done = []
for i in range(steps):
  turns.take()
  t0 = time.time()
  time.sleep(step_s)
  done.append((t0, time.time()))
  turns.give_back()
  if fail is not None:
    sys.exit(fail)
  time.sleep(between_s)
print(json.dumps(done))
"""


def _cmd(steps, step_s=0.05, between_s=0.05, *extra):
  return [sys.executable, "-c", WORKER, str(steps), str(step_s), str(between_s),
          *map(str, extra)]


def test_steps_never_overlap_and_the_order_reverses_every_cycle():
  """Three workers, 3 steps each: cycles A B C, C B A, A B C; no step overlaps another
  worker's step or its work between steps (each ends its step and then works 0.05 s)."""
  out = step_turns.run_in_turns({n: (_cmd(3), None) for n in "ABC"}, timeout=60)
  assert all(o["returncode"] == 0 for o in out.values())
  turns = sorted((start, cycle, name) for name, o in out.items()
                 for cycle, start, _ in o["turns"])
  assert [(c, n) for _, c, n in turns] == [
      (0, "A"), (0, "B"), (0, "C"), (1, "C"), (1, "B"), (1, "A"), (2, "A"), (2, "B"), (2, "C")]
  # The workers' own clocks: every step and the 0.05 s after it are alone on the machine.
  spans = sorted((t0, t1 + 0.05, n) for n, o in out.items() for t0, t1 in json.loads(o["stdout"]))
  assert len(spans) == 9
  for (_, end, n), (start, _, m) in zip(spans, spans[1:]):
    assert n == m or start >= end - 0.01, (n, m, start, end)


def test_workers_with_more_steps_keep_their_turns_after_the_others_exit():
  out = step_turns.run_in_turns({"short": (_cmd(1), None), "long": (_cmd(3), None)},
                                timeout=60)
  assert [len(o["turns"]) for o in out.values()] == [1, 3]
  assert [c for c, _, _ in out["long"]["turns"]] == [0, 1, 2]
  assert len(json.loads(out["long"]["stdout"])) == 3


def test_a_worker_that_fails_leaves_the_rotation_with_its_exit_code():
  out = step_turns.run_in_turns({"bad": (_cmd(3, 0.05, 0.05, 7), None),
                                 "good": (_cmd(3), None)}, timeout=60)
  assert out["bad"]["returncode"] == 7 and len(out["bad"]["turns"]) == 1
  assert out["good"]["returncode"] == 0 and len(out["good"]["turns"]) == 3


def test_a_round_past_its_timeout_is_killed_and_says_so():
  t0 = time.monotonic()
  out = step_turns.run_in_turns({"slow": (_cmd(1, 30.0), None), "ok": (_cmd(1), None)},
                                timeout=2)
  assert time.monotonic() - t0 < 20
  assert out["slow"]["returncode"] is None and "timeout after 2" in out["slow"]["error"]


def test_without_a_spec_the_worker_side_does_nothing():
  turns = step_turns.Turns(None)
  turns.take()
  turns.give_back()
  with pytest.raises(ValueError):
    step_turns.Turns("not,fds")
