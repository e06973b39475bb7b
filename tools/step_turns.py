"""Worker processes that take turns step by step: one runs a step while the others wait.

On a VM whose speed drifts over minutes (`benchmarks/NOTES.md`), two frameworks timed
one after the other can land in different phases of the machine, and their ratio moves
with the phases. `run_in_turns` starts every process of a round at once; each compiles
or sets up on its own, then asks for a turn before each of its steps and waits for it.
The parent gives a turn to one process at a time, and only when every other process is
idle (waiting for its own next turn) or has exited, in an order reversed every cycle
(A B C, C B A, A B C, ...; cycle k: each process's k-th step). So no two steps overlap,
nor a step and another process's work between its steps, and each cycle holds one step of
every process within seconds of each other: the ratio of two processes' steps in one
cycle compares them in the same phase.

Protocol, one byte each way over two pipes per worker (their fds given to the worker as
``R,W``, see `Turns`): the worker writes ``r`` (ready for its next step) and blocks
reading; the parent writes ``g`` (go); the worker runs its step and writes ``d`` (done).
A worker that exits (or closes its end) leaves the rotation. Standard library only: the
TRL peer (`tools/bench_peer_trl.py`) imports it in its own environment.
"""
from __future__ import annotations

import dataclasses
import os
import select
import subprocess
import tempfile
import time

READY, GO, DONE = b"r", b"g", b"d"


class Turns:
  """A worker's side: `take` before a step, `give_back` after it; no-ops without a spec.

  spec: ``"R,W"``, the fds of the parent's pipes (R: read the parent's ``g``; W: write
  ``r`` and ``d``), or None / '' when the worker runs on its own.
  """

  def __init__(self, spec: str | None):
    self._r = self._w = None
    if spec:
      self._r, self._w = (int(x) for x in spec.split(","))

  def take(self) -> None:
    """Says it is ready and blocks until the parent gives it the turn."""
    if self._w is None:
      return
    os.write(self._w, READY)
    got = os.read(self._r, 1)
    if got != GO:
      raise RuntimeError(f"step_turns: expected {GO!r} from the parent, got {got!r}")

  def give_back(self) -> None:
    """Says its step is done (call after the step's results are ready)."""
    if self._w is not None:
      os.write(self._w, DONE)


@dataclasses.dataclass
class _Worker:
  name: str
  proc: subprocess.Popen
  to_fd: int
  from_fd: int
  stdout: object
  stderr: object
  ready: bool = False
  alive: bool = True
  turns: list = dataclasses.field(default_factory=list)


class TurnsTimeout(RuntimeError):
  pass


def _read_byte(w: _Worker, deadline: float) -> bytes:
  """One byte from the worker, b'' when it closed its end (exited); TurnsTimeout past
  ``deadline``."""
  left = deadline - time.monotonic()
  if left <= 0 or not select.select([w.from_fd], [], [], left)[0]:
    raise TurnsTimeout(f"{w.name}: no word from the worker in time")
  return os.read(w.from_fd, 1)


def _expect(w: _Worker, want: bytes, deadline: float) -> bool:
  """Reads ``want`` from the worker: True; False where it exited instead."""
  got = _read_byte(w, deadline)
  if got == b"":
    w.alive = False
    try:
      w.proc.wait(max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired as e:
      raise TurnsTimeout(f"{w.name}: closed its pipe but did not exit") from e
    return False
  if got != want:
    raise RuntimeError(f"step_turns: {w.name} wrote {got!r}, expected {want!r}")
  return True


def run_in_turns(workers: dict, timeout: float, flag: str = "--_turns",
                 cwd: str | None = None) -> dict:
  """Runs the workers' commands at once, their steps in turn (module doc).

  workers: {name: (cmd, env)}; each command gets ``flag R,W`` appended (`Turns`'s spec).
  The rotation is the dict's order, reversed every other cycle. Returns {name:
  {returncode, stdout, stderr, turns: [(cycle, start s, end s)], wall_s}}, the times
  from the start of the round; where the round ran past ``timeout`` seconds every
  worker still running is killed and its returncode is None with ``error``.
  """
  t0 = time.monotonic()
  deadline = t0 + timeout
  ws: list[_Worker] = []
  try:
    for name, (cmd, env) in workers.items():
      to_r, to_w = os.pipe()
      from_r, from_w = os.pipe()
      out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
      proc = subprocess.Popen([*cmd, flag, f"{to_r},{from_w}"], stdout=out, stderr=err,
                              env=env, cwd=cwd, pass_fds=(to_r, from_w))
      os.close(to_r)
      os.close(from_w)
      ws.append(_Worker(name, proc, to_w, from_r, out, err))
    error = None
    cycle = 0
    try:
      while any(w.alive for w in ws):
        order = ws if cycle % 2 == 0 else ws[::-1]
        for w in order:
          if not w.alive:
            continue
          for o in ws:  # every other process idle: ready for its next turn, or exited
            if o.alive and not o.ready:
              o.ready = _expect(o, READY, deadline)
          if not w.alive:
            continue
          start = time.monotonic() - t0
          w.ready = False
          try:
            os.write(w.to_fd, GO)
          except BrokenPipeError:  # it exited after saying it was ready
            w.alive = False
            continue
          if _expect(w, DONE, deadline):
            w.turns.append((cycle, start, time.monotonic() - t0))
        cycle += 1
    except TurnsTimeout as e:
      error = f"timeout after {timeout}s ({e})"
    results = {}
    for w in ws:
      if w.proc.poll() is None:
        w.proc.kill()
        w.proc.wait()
        rc = None
      else:
        rc = w.proc.returncode
      w.stdout.seek(0)
      w.stderr.seek(0)
      results[w.name] = {"returncode": rc, "stdout": w.stdout.read(),
                         "stderr": w.stderr.read(), "turns": w.turns,
                         "wall_s": time.monotonic() - t0,
                         **({"error": error} if rc is None else {})}
    return results
  finally:
    for w in ws:
      if w.proc.poll() is None:
        w.proc.kill()
        w.proc.wait()
      for fd in (w.to_fd, w.from_fd):
        try:
          os.close(fd)
        except OSError:
          pass
      w.stdout.close()
      w.stderr.close()
