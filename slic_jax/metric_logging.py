"""Where training metrics go: TensorBoard event files, a JSON-lines file, a progress line."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping

import numpy as np
from clu import metric_writers


class MetricLogger:
  """Writes scalars for one run.

  - TensorBoard: ``{model_dir}/{split}/events.out.tfevents.*`` (clu SummaryWriter).
  - JSON lines: ``{model_dir}/metrics.jsonl``, one ``{"step", "split", name: value}``
    object per write.

  write_files: False writes nothing (the processes other than 0 of a multi-host run,
    whose metrics are the same global values; as in T5X, process 0 writes them).
  """

  def __init__(self, model_dir: str, *, write_files: bool = True):
    self._model_dir = model_dir
    self._write_files = write_files
    self._writers: dict[str, metric_writers.MetricWriter] = {}
    self._jsonl = None
    if write_files:
      os.makedirs(model_dir, exist_ok=True)
      self._jsonl = open(os.path.join(model_dir, "metrics.jsonl"), "a")

  def _writer(self, split: str) -> metric_writers.MetricWriter:
    if split not in self._writers:
      self._writers[split] = metric_writers.SummaryWriter(os.path.join(self._model_dir, split))
    return self._writers[split]

  def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
    if not self._write_files:
      return
    scalars = {k: float(v) for k, v in scalars.items() if np.isfinite(v)}
    self._writer(split).write_scalars(step, scalars)
    self._jsonl.write(json.dumps({"step": step, "split": split, **scalars}) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    for w in self._writers.values():
      w.flush()
      w.close()
    if self._jsonl is not None:
      self._jsonl.close()


class Progress:
  """One line per report: step, loss, examples/s and ETA."""

  def __init__(self, total_steps: int, start_step: int):
    self.total = total_steps
    self._t0 = time.perf_counter()
    self._step0 = start_step
    self._last_t = self._t0
    self._last_step = start_step

  def rates(self, step: int, batch_size: int) -> dict[str, float]:
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    dt = max(now - self._last_t, 1e-9)
    self._last_t, self._last_step = now, step
    return {
        "timing/steps_per_second": steps / dt,
        "timing/seqs_per_second": steps * batch_size / dt,
    }

  def line(self, step: int, loss: float, examples_per_s: float, steps_per_s: float) -> str:
    eta = (self.total - step) / max(steps_per_s, 1e-9)
    return (f"step {step}/{self.total}  loss {loss:.4f}  "
            f"{examples_per_s:.1f} examples/s  ETA {_fmt(eta)}")


def _fmt(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def print_line(text: str) -> None:
  print(text, file=sys.stderr, flush=True)
