r"""Training throughput of ``python -m slic_jax.train`` vs ``python -m t5x.train``.

Run (from the repo root; T5X lives in its own environment, never a project dependency)::

  .venv/bin/python tools/bench_trainers.py --t5x_python /tmp/t5x_env/bin/python \
      --steps 60 --batch 32 --inputs 128 --targets 32 --model tiny --out /tmp/x.json

What is run: the SAME experiment, ``gin/slic_hf.gin`` (SLiC-HF-direct from scratch:
``INITIAL_CHECKPOINT_PATH = None``), by each trainer in its own subprocess, one after
the other, each with a fresh ``MODEL_DIR`` under ``--workdir``, cwd = repo root,
``PYTHONPATH`` = repo root, ``TF_CPP_MIN_LOG_LEVEL=2``. Both get the same gin files and
bindings (`common_bindings`):

* the model: ``--gin_file=gin/slic_hf.gin --gin_file=gin/models/t5_1_1_<model>.gin``.
  slic_hf.gin includes the tiny model first; the later file rebinds ``NETWORK`` and
  ``network.T5Config.*`` and wins in both trainers (gin parses files in order, later
  bindings override). The parameter count each trainer reports (slic_jax: its
  ``N params; starting at step`` log line; T5X: ``model-info.txt``) is read back and must
  agree, else the result carries a warning;
* ``TRAIN_STEPS``, ``BATCH_SIZE``, ``TASK_FEATURE_LENGTHS``, ``RANDOM_SEED = 0``,
  ``DROPOUT_RATE = 0.0``;
* ``EVAL_PERIOD = CHECKPOINT_PERIOD = TRAIN_STEPS`` and ``EVAL_STEPS = 1``: no evaluation or
  checkpoint inside the timed windows. Both trainers still evaluate (1 batch) and save a
  checkpoint once, after the last step: that is in the wall-clock time, not in seqs/s;
* ``train.stats_period = --stats_period``: both trainers' ``train()`` take
  ``stats_period`` (steps per training-metric write); ``TRAIN_STEPS`` must be a multiple.

What is measured, per trainer, from the trainer's OWN metric ``timing/seqs_per_second``
(sequences = prompts; a SLiC-HF sequence is one prompt with its chosen, rejected and
reference rows, in both trainers):

* slic_jax.train writes one value per report window to ``MODEL_DIR/metrics.jsonl``
  (``split == "train"``; also TensorBoard). Its window is host wall-clock
  (``time.perf_counter``) from one report to the next; each report first blocks on the
  window's metrics, so the window covers the device work, the host's batch fetches, and
  the previous report's own logging. The train step is compiled ahead of the loop (since
  session 2); its first window still holds the first batches and the warm-up.
* t5x.train writes one value per window to TensorBoard event files in ``MODEL_DIR/train``
  (clu's asynchronous SummaryWriter). Its duration is ``_AsyncTimer``: from "the train
  state that the window starts from is ready" to "the window's metrics are ready",
  measured in a background thread; it covers the steps and the batch fetches in the loop,
  not the host work between windows (summaries are written in another thread). T5X
  compiles the train step ahead of the loop (``timing/compilation_seconds``), so its first
  window holds no compile, but it is excluded too, for symmetry.

slic_jax.train pads each batch only as far as its longest example needs, rounded up to one
of ``LENGTH_BUCKETS`` (2) lengths per sequence axis (its run config's default;
`slic_jax.input_pipeline.trim_padding`); T5X pads every batch to ``TASK_FEATURE_LENGTHS``.
Each new batch shape compiles slic_jax's step once more, inside its timed windows (the
shapes are read back from its log, ``compiled_shapes``). ``--slic_fixed_lengths`` also runs
slic_jax.train with ``LENGTH_BUCKETS=1`` (every batch at the full lengths, as T5X),
reported as ``slic_jax_fixed``: that row and T5X's do the same arithmetic.

Reported: the seqs/s of every window, the median over windows 2..n (the first is
excluded), the process's total wall-clock seconds (imports, data, init, compile, training,
final eval and checkpoint), the command line and return code, and
``ratio = median(slic_jax) / median(t5x)`` (> 1: slic_jax is faster). Numbers on a shared
machine are noisy; compare only within one run.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time
from typing import Mapping, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT_GIN = "gin/slic_hf.gin"
METRIC = "timing/seqs_per_second"
MODELS = ("tiny", "small", "base", "large", "xl", "xxl")
STDERR_TAIL_CHARS = 4000
# One-off timings T5X writes next to its per-window metrics (seconds; reported as is).
T5X_ONE_OFF_TIMINGS = ("timing/init_or_restore_seconds", "timing/compilation_seconds",
                       "timing/train_iter_warmup", "timing/checkpoint_seconds",
                       "timing/evaluate_seconds")


class TrainerError(RuntimeError):
  """A trainer subprocess failed, or left no usable timing metric."""


# ----------------------------------------------------------------------------- reading metrics
def read_jsonl_metric(path: str, metric: str = METRIC, split: str = "train") -> list[tuple[int, float]]:
  """``[(step, value)]`` of ``metric`` from slic_jax's ``metrics.jsonl`` rows of ``split``,
  in file order (one row per write: ``{"step", "split", name: value, ...}``)."""
  out = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      row = json.loads(line)
      if row.get("split") == split and metric in row:
        out.append((int(row["step"]), float(row[metric])))
  return out


def _tfrecords(path: str):
  """The payloads of a TFRecord file (TensorBoard event files are TFRecords):
  each record is ``uint64 length, uint32 crc, data, uint32 crc`` (CRCs not checked)."""
  with open(path, "rb") as f:
    while True:
      header = f.read(12)
      if len(header) < 12:
        return
      (length,) = struct.unpack("<Q", header[:8])
      data = f.read(length)
      f.read(4)
      if len(data) < length:  # truncated last record (writer still running)
        return
      yield data


def _scalar_of(value) -> float | None:
  """A float from a ``Summary.Value``: TF1 ``simple_value`` or a TF2 scalar tensor
  (what ``tf.summary.scalar`` / clu's SummaryWriter write)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  kind = value.WhichOneof("value")
  if kind == "simple_value":
    return float(value.simple_value)
  if kind != "tensor":
    return None
  t = value.tensor
  for field in ("float_val", "double_val", "int64_val", "int_val"):
    vals = getattr(t, field)
    if len(vals):
      return float(vals[0])
  if t.tensor_content:
    dtype = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64}.get(t.dtype)
    if dtype is not None:
      return float(np.frombuffer(t.tensor_content, dtype=dtype).reshape(-1)[0])
  return None


def read_tb_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
  """``{tag: [(step, value)]}`` from every ``events.out.tfevents.*`` in ``log_dir``
  (files in name order, i.e. creation order; events in file order). Uses tensorboard's
  protos only, not TensorFlow."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top

  out: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
    for record in _tfrecords(path):
      event = event_pb2.Event.FromString(record)
      if event.WhichOneof("what") != "summary":
        continue
      for value in event.summary.value:
        x = _scalar_of(value)
        if x is not None:
          out.setdefault(value.tag, []).append((int(event.step), x))
  return out


def read_tb_metric(log_dir: str, metric: str = METRIC) -> list[tuple[int, float]]:
  """``[(step, value)]`` of one tag from T5X's TensorBoard events (``MODEL_DIR/train``)."""
  return read_tb_scalars(log_dir).get(metric, [])


# ----------------------------------------------------------------------------- statistics
def summarize_windows(windows: Sequence[tuple[int, float]], what: str = "") -> dict:
  """Per-window values and their median, the first window excluded (the compile window
  for slic_jax; kept out for T5X too). Needs at least two windows."""
  windows = sorted(windows)
  if len(windows) < 2:
    raise TrainerError(
        f"{what or 'trainer'}: {len(windows)} report window(s) of {METRIC}; need at least 2 "
        "(the first is excluded): use TRAIN_STEPS >= 2 * stats_period")
  return {
      "windows": [{"step": s, "seqs_per_second": v} for s, v in windows],
      "excluded_first_window_step": windows[0][0],
      "median_seqs_per_second": statistics.median(v for _, v in windows[1:]),
  }


def ratio(slic_jax_median: float, t5x_median: float) -> float:
  """slic_jax / t5x throughput (> 1: slic_jax is faster)."""
  if t5x_median <= 0:
    raise ValueError(f"t5x median seqs/s must be positive, got {t5x_median}")
  return slic_jax_median / t5x_median


# ----------------------------------------------------------------------------- parameter counts
def slic_jax_num_params(log: str) -> int | None:
  """From slic_jax.train's log line ``<N> params; starting at step ...``."""
  m = re.search(r"\b(\d+) params; starting at step", log)
  return int(m.group(1)) if m else None


def slic_jax_compiled_shapes(log: str) -> list[list[int]]:
  """[[Li, Lt], ...] of each step compile in slic_jax.train's log (``update step compiled
  for {...}``): the encoder_input_tokens and decoder_target_tokens lengths."""
  out = []
  for line in re.findall(r"update step compiled for (\{.*?\}) \(", log):
    li = re.search(r"'encoder_input_tokens': \((?:\d+, )*(\d+)\)", line)
    lt = re.search(r"'decoder_target_tokens': \((?:\d+, )*(\d+)\)", line)
    if li and lt:
      out.append([int(li.group(1)), int(lt.group(1))])
  return out


def slic_jax_compile_seconds(log: str) -> list[float]:
  """Seconds of each step compile in slic_jax.train's log (``... so far) in 81.2 s``)."""
  return [float(x) for x in re.findall(r"shape\(s\) so far\) in ([0-9.]+) s", log)]


def t5x_num_params(model_dir: str) -> int | None:
  """From T5X's ``MODEL_DIR/model-info.txt`` (``Total number of parameters: N``)."""
  path = os.path.join(model_dir, "model-info.txt")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    m = re.search(r"Total number of parameters: (\d+)", f.read())
  return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------- commands
def model_gin_path(model: str) -> str:
  """``tiny`` → ``gin/models/t5_1_1_tiny.gin`` (a path is returned unchanged)."""
  if model in MODELS:
    return f"gin/models/t5_1_1_{model}.gin"
  return model


def common_bindings(*, steps: int, batch: int, inputs_len: int, targets_len: int,
                    stats_period: int) -> list[str]:
  """The gin bindings both trainers get (``--gin.NAME=VALUE``), before any overrides."""
  return [
      f"TRAIN_STEPS={steps}",
      f"BATCH_SIZE={batch}",
      f"TASK_FEATURE_LENGTHS={{'inputs': {inputs_len}, 'targets': {targets_len}}}",
      "RANDOM_SEED=0",
      "DROPOUT_RATE=0.0",
      "INITIAL_CHECKPOINT_PATH=None",
      f"EVAL_PERIOD={steps}",
      f"CHECKPOINT_PERIOD={steps}",
      "EVAL_STEPS=1",
      # `train.stats_period`, not `train_script.train.stats_period`: T5X's command line
      # does not know the run config's `train_script` alias (slic_jax's accepts both).
      f"train.stats_period={stats_period}",
  ]


def trainer_command(python: str, module: str, *, model_gin: str, model_dir: str,
                    bindings: Sequence[str]) -> list[str]:
  """``python -m <module> --gin_file=gin/slic_hf.gin --gin_file=<model_gin> --gin.X=...``."""
  return [python, "-m", module, f"--gin_file={EXPERIMENT_GIN}", f"--gin_file={model_gin}",
          f"--gin.MODEL_DIR={model_dir!r}", *[f"--gin.{b}" for b in bindings]]


def subprocess_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
  """This process's environment plus ``PYTHONPATH`` = repo root, quiet TensorFlow, ``extra``."""
  env = {**os.environ, **(extra or {})}
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH", "")) if p)
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  return env


def tail(text: str, chars: int = STDERR_TAIL_CHARS) -> str:
  return text if len(text) <= chars else "..." + text[-chars:]


def check_t5x_python(t5x_python: str) -> None:
  """Raises `TrainerError` unless ``t5x_python`` exists and imports ``t5x.train``."""
  if not (os.path.isfile(t5x_python) and os.access(t5x_python, os.X_OK)):
    raise TrainerError(f"--t5x_python {t5x_python}: no such executable (T5X needs its own "
                       "environment; it is not a project dependency)")
  proc = subprocess.run([t5x_python, "-c", "import t5x, t5x.train"], cwd=REPO,
                        env=subprocess_env(), capture_output=True, text=True, timeout=600)
  if proc.returncode:
    raise TrainerError(f"{t5x_python} cannot import t5x (rc {proc.returncode}):\n"
                       f"{tail(proc.stderr)}")


def prepare_data(python: str) -> None:
  """Builds the TL;DR data directory before anything is timed: the default synthetic world
  is generated on first use, which would otherwise land in the first trainer's wall time."""
  proc = subprocess.run([python, "-c", "import tasks.tldr as t; print(t.tldr_data_dir())"],
                        cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                        timeout=1800)
  if proc.returncode:
    raise TrainerError(f"preparing the TL;DR data failed (rc {proc.returncode}):\n"
                       f"{tail(proc.stderr)}")


def run_trainer(name: str, cmd: list[str], log_dir: str, timeout: float,
                env: Mapping[str, str] | None = None) -> dict:
  """Runs one trainer to completion; stdout/stderr go to ``log_dir/<name>.{out,err}``.
  Returns command, return code, wall seconds and the captured stderr."""
  os.makedirs(log_dir, exist_ok=True)
  out_path, err_path = (os.path.join(log_dir, f"{name}.{s}") for s in ("out", "err"))
  t0 = time.perf_counter()
  try:
    with open(out_path, "w") as out, open(err_path, "w") as err:
      proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(env), stdout=out, stderr=err,
                            timeout=timeout)
    rc = proc.returncode
  except subprocess.TimeoutExpired:
    rc = None
  wall = time.perf_counter() - t0
  with open(err_path) as f:
    stderr = f.read()
  if rc != 0:
    why = f"timed out after {timeout:.0f} s" if rc is None else f"exited with code {rc}"
    raise TrainerError(f"{name} {why} ({wall:.1f} s): {' '.join(cmd)}\n"
                       f"--- last {STDERR_TAIL_CHARS} chars of stderr ({err_path}) ---\n"
                       f"{tail(stderr)}")
  return {"command": cmd, "returncode": rc, "wall_seconds": wall, "stderr": stderr,
          "stderr_path": err_path, "env": dict(env or {})}


def _result(run: dict, windows: list[tuple[int, float]], name: str, num_params, **extra) -> dict:
  if not windows:
    raise TrainerError(f"{name} finished but wrote no {METRIC}:\n{tail(run['stderr'])}")
  return {
      **summarize_windows(windows, name),
      "wall_seconds": run["wall_seconds"],
      "command": " ".join(run["command"]),
      "returncode": run["returncode"],
      "num_params": num_params,
      "log": run["stderr_path"],
      **extra,
  }


# ----------------------------------------------------------------------------- the comparison
def compare_trainers(*, t5x_python: str, steps: int, batch: int, inputs_len: int,
                     targets_len: int, model_gin: str, stats_period: int, workdir: str,
                     gin_overrides: Sequence[str] = (), slic_python: str = sys.executable,
                     timeout: float = 3600, t5x_reuse_malloc: bool = False,
                     slic_fixed_lengths: bool = False) -> dict:
  """Runs slic_jax.train, then t5x.train, on gin/slic_hf.gin with the same settings and
  returns their ``timing/seqs_per_second`` (JSON-serialisable; see the module docstring).

  ``gin_overrides``: extra ``NAME=VALUE`` bindings for both trainers, after
  `common_bindings` (later bindings win). ``t5x_reuse_malloc``: also run t5x.train with
  slic_jax.train's host-memory settings (``GLIBC_TUNABLES`` =
  `slic_jax.host_memory.GLIBC_TUNABLES` and `slic_jax.host_memory.INLINE_DISPATCH_ARG` on
  its command line; slic_jax.train sets them itself with ``mallopt`` and ``jax.config``),
  reported as ``t5x_reuse``. ``slic_fixed_lengths``: also run slic_jax.train with
  ``LENGTH_BUCKETS=1`` (no padding trimmed), reported as ``slic_jax_fixed``. Raises
  `TrainerError` (with the tail of the failing process's stderr) if T5X is unusable, a
  trainer fails or writes no timing.
  """
  if steps % stats_period or steps < 2 * stats_period:
    raise ValueError(f"steps ({steps}) must be a multiple of stats_period ({stats_period}) "
                     "and at least 2 windows long (the first window is excluded)")
  model_gin = model_gin_path(model_gin)
  if not os.path.exists(os.path.join(REPO, model_gin)):
    raise ValueError(f"model gin file not found: {model_gin}")
  check_t5x_python(t5x_python)
  prepare_data(slic_python)
  bindings = common_bindings(steps=steps, batch=batch, inputs_len=inputs_len,
                             targets_len=targets_len, stats_period=stats_period)
  bindings += list(gin_overrides)
  workdir = os.path.abspath(workdir)
  dirs = {n: os.path.join(workdir, n)
          for n in ("slic_jax", "slic_jax_fixed", "t5x", "t5x_reuse")}
  for d in dirs.values():  # a fresh MODEL_DIR each: no resuming from an older run
    shutil.rmtree(d, ignore_errors=True)
  logs = os.path.join(workdir, "logs")

  def run_slic(name, extra_bindings=()):
    run = run_trainer(name, trainer_command(
        slic_python, "slic_jax.train", model_gin=model_gin, model_dir=dirs[name],
        bindings=bindings + list(extra_bindings)), logs, timeout)
    return _result(run, read_jsonl_metric(os.path.join(dirs[name], "metrics.jsonl")),
                   name, slic_jax_num_params(run["stderr"]), model_dir=dirs[name],
                   compiled_shapes=slic_jax_compiled_shapes(run["stderr"]),
                   compile_seconds=slic_jax_compile_seconds(run["stderr"]))

  ours = run_slic("slic_jax")
  extra = {}
  if slic_fixed_lengths:
    extra["slic_jax_fixed"] = run_slic("slic_jax_fixed", ["LENGTH_BUCKETS=1"])

  def run_t5x(name, env=None, args=()):
    run = run_trainer(name, trainer_command(
        t5x_python, "t5x.train", model_gin=model_gin, model_dir=dirs[name],
        bindings=bindings) + list(args), logs, timeout, env=env)
    tb = read_tb_scalars(os.path.join(dirs[name], "train"))
    return _result(run, tb.get(METRIC, []), name, t5x_num_params(dirs[name]),
                   model_dir=dirs[name],
                   t5x_timing={k: tb[k][-1][1] for k in T5X_ONE_OFF_TIMINGS if k in tb})

  theirs = run_t5x("t5x")
  if slic_fixed_lengths:
    extra["ratio_slic_jax_fixed_over_t5x"] = ratio(
        extra["slic_jax_fixed"]["median_seqs_per_second"], theirs["median_seqs_per_second"])
  if t5x_reuse_malloc:
    if REPO not in sys.path:
      sys.path.insert(0, REPO)
    from slic_jax import host_memory  # pylint: disable=g-import-not-at-top
    extra["t5x_reuse"] = run_t5x("t5x_reuse", {"GLIBC_TUNABLES": host_memory.GLIBC_TUNABLES},
                                 [host_memory.INLINE_DISPATCH_ARG])
    extra["ratio_slic_jax_over_t5x_reuse"] = ratio(
        ours["median_seqs_per_second"], extra["t5x_reuse"]["median_seqs_per_second"])

  warnings = []
  if ours["num_params"] and theirs["num_params"] and ours["num_params"] != theirs["num_params"]:
    warnings.append(f"parameter counts differ: slic_jax {ours['num_params']}, "
                    f"t5x {theirs['num_params']} -- not the same model")
  return {
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "host": platform.node(), "cpus": os.cpu_count(),
      "experiment": EXPERIMENT_GIN, "model_gin": model_gin,
      "steps": steps, "batch": batch, "inputs_len": inputs_len, "targets_len": targets_len,
      "stats_period": stats_period, "gin_bindings": bindings,
      "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "TF_ENABLE_ONEDNN_OPTS",
                                              "CUDA_VISIBLE_DEVICES", "JAX_PLATFORMS")},
      "slic_jax": ours, "t5x": theirs,
      "ratio_slic_jax_over_t5x": ratio(ours["median_seqs_per_second"],
                                       theirs["median_seqs_per_second"]),
      **extra,
      "warnings": warnings,
  }


# ----------------------------------------------------------------------------- report
def markdown_table(result: dict) -> str:
  """A small markdown table of one `compare_trainers` result."""
  lines = [
      f"{result['experiment']} + {result['model_gin']}: {result['steps']} steps, batch "
      f"{result['batch']}, inputs {result['inputs_len']}, targets {result['targets_len']}, "
      f"stats every {result['stats_period']} steps",
      "",
      "| trainer | seqs/s per window (first excluded from the median) | median seqs/s "
      "| wall s | params | step compiled for [Li, Lt] (seconds) |",
      "|---|---|---|---|---|---|",
  ]
  for name in ("slic_jax", "slic_jax_fixed", "t5x", "t5x_reuse"):
    if name not in result:
      continue
    r = result[name]
    per = ", ".join(f"{w['seqs_per_second']:.2f}" for w in r["windows"])
    secs = list(r.get("compile_seconds", []))
    secs += [None] * (len(r.get("compiled_shapes", [])) - len(secs))
    shapes = (", ".join(f"[{li}, {lt}]" + (f" ({t:.0f})" if t is not None else "")
                        for (li, lt), t in zip(r["compiled_shapes"], secs))
              if "compiled_shapes" in r else "-")
    lines.append(f"| {name} | {per} | {r['median_seqs_per_second']:.2f} | "
                 f"{r['wall_seconds']:.1f} | {r['num_params'] or '?'} | {shapes} |")
  lines += ["", f"ratio slic_jax / t5x (median seqs/s): "
                f"{result['ratio_slic_jax_over_t5x']:.2f}x"]
  if "ratio_slic_jax_fixed_over_t5x" in result:
    lines += [f"ratio slic_jax_fixed (LENGTH_BUCKETS=1: every batch at the full lengths, "
              f"as T5X) / t5x: {result['ratio_slic_jax_fixed_over_t5x']:.2f}x"]
  if "ratio_slic_jax_over_t5x_reuse" in result:
    lines += [f"ratio slic_jax / t5x with slic_jax's host-memory settings (t5x_reuse: "
              f"GLIBC_TUNABLES, --jax_cpu_enable_async_dispatch=false): "
              f"{result['ratio_slic_jax_over_t5x_reuse']:.2f}x"]
  lines += [f"WARNING: {w}" for w in result["warnings"]]
  return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--t5x_python", required=True, help="python of an environment with t5x")
  ap.add_argument("--slic_python", default=sys.executable)
  ap.add_argument("--steps", type=int, default=60)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--inputs", type=int, default=128)
  ap.add_argument("--targets", type=int, default=32)
  ap.add_argument("--model", default="tiny",
                  help=f"one of {','.join(MODELS)} or a model gin file")
  ap.add_argument("--stats_period", type=int, default=10)
  ap.add_argument("--workdir", default="/tmp/slic_jax_bench_trainers")
  ap.add_argument("--gin", action="append", default=[], metavar="NAME=VALUE",
                  help="extra gin binding for both trainers (repeatable)")
  ap.add_argument("--timeout", type=float, default=3600, help="seconds per trainer")
  ap.add_argument("--out", default=None, help="write the JSON result here")
  ap.add_argument("--t5x_reuse_malloc", action="store_true",
                  help="also run t5x.train with slic_jax.train's host-memory settings "
                       "(GLIBC_TUNABLES and --jax_cpu_enable_async_dispatch=false)")
  ap.add_argument("--slic_fixed_lengths", action="store_true",
                  help="also run slic_jax.train with LENGTH_BUCKETS=1 (no padding trimmed)")
  return ap.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    result = compare_trainers(
        t5x_python=args.t5x_python, steps=args.steps, batch=args.batch,
        inputs_len=args.inputs, targets_len=args.targets, model_gin=args.model,
        stats_period=args.stats_period, workdir=args.workdir, gin_overrides=args.gin,
        slic_python=args.slic_python, timeout=args.timeout,
        t5x_reuse_malloc=args.t5x_reuse_malloc, slic_fixed_lengths=args.slic_fixed_lengths)
  except (TrainerError, ValueError) as e:
    print(f"bench_trainers: {e}", file=sys.stderr)
    return 1
  print(markdown_table(result))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
    print(f"\nwrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
