r"""Where the SLiC-HF training step spends its time: a per-op profile mapped to the model.

Run (one real CPU device; a few minutes for T5 1.1 small)::

  .venv/bin/python tools/profile_step.py --size small --reg_target chosen --top 30

It builds the same step as ``tools/benchmark.py`` (slic_jax's update step, compiler
options, Adafactor + clipping), runs ``--warmup`` steps, then traces one step with
``jax.profiler`` and joins every executed XLA op of the trace with the optimized HLO:

* its matmul FLOPs (every ``dot`` in the op's fused computation: 2 · output size ·
  contracted size), hence the op's achieved GFLOP/s;
* its JAX source name (``op_name`` metadata, e.g.
  ``transpose(jvp(Transformer.encode))/encoder/layers_3/mlp/...``), with layer numbers
  folded so the 8 layers of one kind add up. Fusions XLA made without metadata take the
  source of an instruction inside them, else of the op that feeds them (`op_source`).
* with the input length (``--li``; live runs always), the split between the ops on the
  encoder's [B, H, Li, Li] attention arrays, whose work grows with Li², and the rest
  (`length_squared_times`).

It prints the top ``--top`` groups by time (ops without a JAX source grouped by their
HLO op family, e.g. XLA's ``wrapped_reduce-window`` rewrites of reductions) and a coarse
split (encoder / decoder, forward / backward, attention projections / attention core /
MLP, logits + loss, optimizer). Op times are as the trace reports them: XLA:CPU runs
independent ops concurrently, so per-op times of overlapping ops include contention and
their sum exceeds the step's wall time (both are printed); each group's ``shared`` column
is how much of its time ran beside another op, so a low GFLOP/s there is contention, not
a slow matmul. Times are self times: an op traced inside another on the same thread (a
conditional's branch) counts for itself, not again in its parent.

On a GPU the trace's kernels (the device's stream lines) are joined to the HLO by their
names (XLA names a fusion's kernel after the fusion, '.' as '_'); kernels of libraries
(cuBLAS / nvjet GEMMs, cuDNN attention) have no HLO name and are summed by kind. The
report then starts with the device's view: kernels' busy time against the step's wall
time (the rest is the GPU waiting for the host) and the longest host-side runtime
events (e.g. XLA's CUDA-graph ``command_buffer::update``). ``--from_trace DIR --hlo FILE``
reports a kept trace (``--trace_dir``) and HLO (``--dump_hlo``, gzipped or not) again,
off the machine that made them. ``--dots_alone ROUNDS`` then asks how near the step is to what XLA's own dots allow on
its shapes: each distinct dot the traced step ran (`executed_dots`) is jitted by itself
with the step's compiler options and timed, its time counted once per call in the step,
beside one step and the square float32 matmul peak in each round (`dots_alone`); the
report gives per round the step, its dots alone, their share of the step and their
aggregate GFLOP/s against the square peak. Like ``slic_jax.train``, it first calls
`slic_jax.host_memory.reuse_freed_memory` (``--host_malloc default``: glibc's defaults, under
which ops that first touch the step's temporaries also pay for their page faults).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402  (tools/, beside this file)

sys.path.insert(0, benchmark.REPO)  # slic_jax from this checkout, installed or not


# ----------------------------------------------------------------------------- HLO
def parse_hlo(text: str):
  """(computations: name -> lines, instructions: name -> (computation, line), shapes)."""
  comps, insts, shapes, cur = {}, {}, {}, None
  for line in text.split("\n"):
    m = re.match(r"^(?:ENTRY )?%(\S+) \((.*)\) -> .* \{$", line)
    if m:
      cur = m.group(1)
      comps[cur] = []
      for pm in re.finditer(r"(\S+): ([a-z0-9]+\[[0-9,]*\])", m.group(2)):
        shapes[(cur, pm.group(1))] = pm.group(2)
      continue
    if cur and line.strip() == "}":
      cur = None
      continue
    if cur:
      comps[cur].append(line)
      m = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+) ", line)
      if m:
        insts[m.group(1)] = (cur, line)
        shapes[(cur, m.group(1))] = m.group(2)
  return comps, insts, shapes


def _operands(line: str) -> tuple[str, list[str]] | None:
  """(result shape, operand names) of one HLO instruction line; None if it is not one.

  A tuple result (e.g. a custom call with two outputs) comes back as its whole text,
  "(f32[..], f32[..])"."""
  m = re.match(r"\s*(?:ROOT )?%\S+ = (\([^)]*\)|\S+) [a-z\-]+\(([^)]*)\)", line)
  return (m.group(1), re.findall(r"%([\w.\-]+)", m.group(2))) if m else None


def _dims(shape: str) -> list[int]:
  m = re.search(r"\[([0-9,]*)\]", shape)
  return [int(x) for x in m.group(1).split(",") if x] if m else []


@dataclasses.dataclass(frozen=True)
class Dot:
  """One HLO ``dot``'s operands, result and dimension numbers (shapes with dtype, e.g.
  ``f32[2048,512]``; XLA:CPU's layout assignment has made every dot operand row-major)."""
  lhs: str
  rhs: str
  out: str
  lhs_contracting: tuple[int, ...]
  rhs_contracting: tuple[int, ...]
  lhs_batch: tuple[int, ...] = ()
  rhs_batch: tuple[int, ...] = ()

  @property
  def flops(self) -> int:
    """2 · prod(result dims) · prod(lhs contracting dims)."""
    lhs, k, n = _dims(self.lhs), 1, 1
    for i in self.lhs_contracting if lhs else ():  # (an operand shape the HLO lacks: k = 1)
      k *= lhs[i]
    for d in _dims(self.out):
      n *= d
    return 2 * n * k

  def label(self) -> str:
    return f"{self.lhs.split('{')[0]} · {self.rhs.split('{')[0]} -> {self.out.split('{')[0]}"


_HLO_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "f64": "float64"}


def _parse_dot(comp: str, line: str, shapes) -> Dot | None:
  m = re.match(r"\s*(?:ROOT )?%\S+ = (\S+) dot\(%([^,\s)]+), %([^,\s)]+)\)(.*)", line)
  if not m:
    return None
  out, lhs, rhs, rest = m.groups()

  def dims(key):
    d = re.search(key + r"=\{([0-9,]*)\}", rest)
    return tuple(int(x) for x in d.group(1).split(",") if x) if d else ()

  return Dot(shapes.get((comp, lhs), ""), shapes.get((comp, rhs), ""), out,
             dims("lhs_contracting_dims"), dims("rhs_contracting_dims"),
             dims("lhs_batch_dims"), dims("rhs_batch_dims"))


def dot_flops(comp: str, line: str, shapes) -> int:
  """2 · prod(output dims) · prod(lhs contracting dims) of one HLO ``dot`` line."""
  dot = _parse_dot(comp, line, shapes)
  return dot.flops if dot else 0


def op_flops(name: str, comps, insts, shapes) -> int:
  comp, line = insts[name]
  if " dot(" in line:
    return dot_flops(comp, line, shapes)
  called = re.search(r"calls=%([\w.\-]+)", line)
  if not called:
    return 0
  return sum(dot_flops(called.group(1), l, shapes) for l in comps.get(called.group(1), [])
             if " dot(" in l)


NO_SOURCE = "(no source: optimizer / runtime)"


def op_source(name: str, insts, comps=None, via_operand: bool = True) -> str:
  """The op's JAX source (``op_name`` metadata). An op XLA built without metadata of its
  own takes, in this order (both need ``comps``):

  * the source of the last instruction inside its fused computation that has one (nearest
    its output; e.g. a convert of activations merged with a layout copy);
  * '<its first operand's source>/<its op family>' (``via_operand``; e.g. XLA's
    rewrite of a softmax's max into a ``wrapped_reduce-window`` of the logits, or of a
    reduction of the optimizer's);

  NO_SOURCE where none of these has one (runtime copies of parameters)."""
  line = insts[name][1]
  m = re.search(r'op_name="([^"]*)"', line)
  if m:
    return m.group(1)
  called = re.search(r"calls=%([\w.\-]+)", line)
  for inner in reversed(comps.get(called.group(1), []) if comps and called else []):
    m = re.search(r'op_name="([^"]*)"', inner)
    if m:
      return m.group(1)
  operands = (_operands(line) or ("", []))[1]
  if comps is not None and via_operand and operands and operands[0] in insts:
    source = op_source(operands[0], insts, comps, via_operand=False)
    if source != NO_SOURCE:
      return f"{source}/{op_family(name)}"
  return NO_SOURCE


def op_family(name: str) -> str:
  """An HLO op's name without its numeric suffix ('wrapped_reduce-window.90' ->
  'wrapped_reduce-window'): ops without a JAX source (XLA's own reduction rewrites, copies,
  parameter casts) are grouped by it."""
  return re.sub(r"[.\d]+$", "", name) or name


# ----------------------------------------------------------------------------- grouping
def fold(source: str) -> str:
  return re.sub(r"layers_\d+", "L", source.replace("jit(train_step)/", ""))


def coarse(source: str) -> str:
  if any(s in source for s in ("log_softmax", "logits_dense", "take_along_axis",
                               "token_embedder", "_target_log_softmax", "logsumexp")):
    return "logits / loss / embeddings"
  for part, tag in (("Transformer.encode", "encoder"), ("Transformer.decode", "decoder")):
    if part in source:
      direction = "backward" if "transpose(" in source else "forward"
      if re.search(r"bhqk|bqhd|softmax|reduce_max|/div|/exp", source):
        kind = "attention core"
      elif "/mlp/" in source:
        kind = "MLP"
      elif "attention" in source:
        kind = "attention projections"
      else:
        kind = "other"
      return f"{tag} {direction} {kind}"
  return "optimizer / other"


def op_kind(name: str, insts) -> str:
  """'<opcode> <result shape> [fusion kind] [calls=<computation>]' of an HLO instruction."""
  line = insts[name][1]
  m = re.match(r"\s*(?:ROOT )?%\S+ = (\S+) ([a-z\-]+)\(", line)
  kind = re.search(r"kind=(k\w+)", line)
  calls = re.search(r"calls=%(\S+?)[,\s]", line)
  desc = f"{m.group(2)} {m.group(1)}" if m else line.strip()[:60]
  if kind:
    desc += f" {kind.group(1)}"
  if calls:
    desc += f" calls={calls.group(1)}"
  return desc


def self_and_shared_times(ops) -> tuple[list[float], list[float]]:
  """For each op event (``tid``, ``ts``, ``dur`` in µs): (its self time, the part of that
  during which an op ran on another thread), µs.

  An op that runs inside another on the same thread (the branch of a conditional, e.g.
  `slic_jax.matmul.materialized`'s copy) is its child: the parent's self time leaves the
  child's out, so self times add up to each thread's busy time. XLA:CPU runs independent
  ops at once on its threads; while two run, each has part of the cores, so its trace
  time (and its GFLOP/s) includes that contention.
  """
  edges = sorted([(e["ts"], 1, -e["dur"], i) for i, e in enumerate(ops)]
                 + [(e["ts"] + e["dur"], -1, e["dur"], i) for i, e in enumerate(ops)])
  own = [0.0] * len(ops)
  shared = [0.0] * len(ops)
  running = collections.defaultdict(list)  # tid -> its running ops, innermost last
  last = None
  # At one time: ends before starts, inner (shorter) ends first, outer (longer) starts first.
  for t, kind, _, i in edges:
    busy = [stack[-1] for stack in running.values() if stack]
    for j in busy:
      own[j] += t - last
      if len(busy) > 1:
        shared[j] += t - last
    last = t
    stack = running[ops[i]["tid"]]
    if kind > 0:
      stack.append(i)
    else:
      stack.remove(i)
  return own, shared


def traced_ops(trace_events, insts):
  """The trace's XLA op events, their self times and shared times (µs;
  `self_and_shared_times`; events without thread and start: their durations, none shared)."""
  ops = [e for e in trace_events if e.get("ph") == "X" and e.get("name") in insts]
  if all("ts" in e and "tid" in e for e in ops):
    return (ops,) + self_and_shared_times(ops)
  return ops, [e["dur"] for e in ops], [0.0] * len(ops)


def top_ops(trace_events, comps, insts, shapes, n: int) -> str:
  """The n longest single non-matmul ops (summed over their calls): ms, calls, opcode, source."""
  acc = collections.defaultdict(lambda: [0.0, 0])
  ops, own, _ = traced_ops(trace_events, insts)
  for e, us in zip(ops, own):
    if not op_flops(e["name"], comps, insts, shapes):
      acc[e["name"]][0] += us / 1e3
      acc[e["name"]][1] += 1
  out = ["     ms calls  op: opcode, shape; source"]
  for name, (ms, calls) in sorted(acc.items(), key=lambda x: -x[1][0])[:n]:
    out.append(f"{ms:7.1f} {calls:5d}  {name}: {op_kind(name, insts)[:90]}; "
               f"{fold(op_source(name, insts, comps))[-80:]}")
  return "\n".join(out)


def summarize(trace_events, comps, insts, shapes, top: int) -> str:
  ops, own, shared = traced_ops(trace_events, insts)
  rows = [(ms / 1e3, op_flops(e["name"], comps, insts, shapes), op_source(e["name"], insts, comps),
           sh / 1e3) for e, ms, sh in zip(ops, own, shared)]
  names = [e["name"] for e in ops]
  if not rows:
    return "no XLA ops found in the trace"
  total_ms = sum(r[0] for r in rows)
  total_fl = sum(r[1] for r in rows)
  dot_ms = sum(r[0] for r in rows if r[1])
  out = [f"ops: {len(rows)}, summed op time {total_ms:.0f} ms (self times), matmul GFLOP {total_fl / 1e9:.1f}, "
         f"matmul ops {dot_ms:.0f} ms ({total_fl / 1e6 / max(dot_ms, 1e-9):.0f} GFLOP/s), "
         f"other ops {total_ms - dot_ms:.0f} ms; of the summed time {sum(r[3] for r in rows):.0f} ms "
         "ran beside another op", "",
         "top groups (layers folded; 'shared': ms of the group's time beside another op):",
         "     ms  shared  ops   GFLOP/s  source"]
  groups = collections.defaultdict(lambda: [0.0, 0, 0, 0.0])
  for (ms, fl, src, sh), name in zip(rows, names):
    key = fold(src) if src != NO_SOURCE else f"{NO_SOURCE} {op_family(name)}"
    g = groups[("DOT " if fl else "    ") + key]
    g[0] += ms
    g[1] += fl
    g[2] += 1
    g[3] += sh
  for k, (ms, fl, n, sh) in sorted(groups.items(), key=lambda x: -x[1][0])[:top]:
    rate = f"{fl / 1e6 / ms:7.0f}" if fl else "       "
    out.append(f"{ms:7.1f} {sh:7.1f} {n:4d} {rate}   {k[:140]}")
  out += ["", "coarse split:", "     ms    GFLOP  part"]
  parts = collections.defaultdict(lambda: [0.0, 0])
  for ms, fl, src, _ in rows:
    parts[coarse(src)][0] += ms
    parts[coarse(src)][1] += fl
  for k, (ms, fl) in sorted(parts.items(), key=lambda x: -x[1][0]):
    out.append(f"{ms:7.1f} {fl / 1e9:8.1f}  {k}")
  return "\n".join(out)


def _logits_shaped(shape: str, li: int, heads: int) -> bool:
  """[.., H, .., Li, Li]: an attention logits-like array (not e.g. [B, Li, D] with D = Li)."""
  dims = _dims(shape)
  return dims[-2:] == [li, li] and heads in dims[:-2]


def length_squared_times(trace_events, comps, insts, shapes, li: int, heads: int) -> dict:
  """{(on [.., Li, Li] arrays, a matmul): [self µs, matmul FLOPs]} over the trace's ops.

  An op is on [.., Li, Li] arrays when its result or an operand is [.., H, .., Li, Li]
  (`heads` H among the leading dimensions): the encoder self-attention's [B, H, Li, Li]
  logits, probabilities and their gradients, the position bias's [H, Li, Li] gradient,
  and the reductions that read them (e.g. XLA's [.., Li, 32] reduce-windows of the
  softmax max, its sums as dots). That work grows with Li²; the rest with Li or not at
  all. The targets' length must differ from ``li`` (else the decoder's self-attention
  counts too)."""
  ops, own, _ = traced_ops(trace_events, insts)
  acc = {key: [0.0, 0] for key in ((True, True), (True, False), (False, True), (False, False))}
  for e, us in zip(ops, own):
    comp, line = insts[e["name"]]
    shape, operands = _operands(line) or ("", [])
    square = any(_logits_shaped(x, li, heads)
                 for x in [shape] + [shapes.get((comp, x), "") for x in operands])
    flops = op_flops(e["name"], comps, insts, shapes)
    acc[(square, bool(flops))][0] += us
    acc[(square, bool(flops))][1] += flops
  return acc


def length_squared_split(trace_events, comps, insts, shapes, li: int, heads: int) -> str:
  """`length_squared_times` as a table: ms, share of the summed op time, GFLOP, GFLOP/s."""
  acc = length_squared_times(trace_events, comps, insts, shapes, li, heads)
  total = sum(us for us, _ in acc.values()) or 1.0
  out = [f"ops on [.., Li, Li] arrays (Li {li}) against the rest:",
         "     ms   share    GFLOP  GFLOP/s  ops"]
  for key, label in (((True, True), "Li² matmuls (attention scores, p·v, their gradients)"),
                     ((True, False), "Li² other ops (bias add, softmax, their gradients)"),
                     ((False, True), "other matmuls"), ((False, False), "other ops")):
    us, flops = acc[key]
    rate = f"{flops / us / 1e3:8.0f}" if flops and us else "        "
    out.append(f"{us / 1e3:7.1f} {100 * us / total:6.1f}% {flops / 1e9:8.1f} {rate}  {label}")
  return "\n".join(out)


# ----------------------------------------------------------------------------- device traces
LIBRARY_KINDS = (("cuDNN attention", r"cudnn|fmha|sdpa|flash"),
                 ("cuBLAS / nvjet / CUTLASS GEMM", r"gemm|nvjet|xmma|cutlass|cublas"),
                 ("memset / memcpy", r"memset|memcpy"))


def device_stream_lines(trace_events) -> set:
  """(pid, tid) of the kernel lines of accelerator devices ('/device:GPU:0' processes;
  their 'Stream #N' threads where named so, else every thread). Empty on XLA:CPU."""
  pids = {e["pid"] for e in trace_events if e.get("ph") == "M" and e.get("name") ==
          "process_name" and str(e.get("args", {}).get("name", "")).startswith("/device:")}
  named = {(e["pid"], e["tid"]): str(e.get("args", {}).get("name", "")) for e in trace_events
           if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in pids}
  lines = {(e["pid"], e.get("tid")) for e in trace_events
           if e.get("ph") == "X" and e.get("pid") in pids}
  streams = {k for k in lines if named.get(k, "").startswith("Stream")}
  return streams or lines


def kernel_hlo_op(event, insts) -> str | None:
  """The HLO instruction a device kernel ran: its name as is, its name with the last '_N'
  as '.N' ('input_reduce_fusion_335' -> 'input_reduce_fusion.335'), or its ``hlo_op``
  argument (not the command buffer that launched it); None for library kernels."""
  name = event.get("name", "")
  if name in insts:
    return name
  m = re.fullmatch(r"(.+)_(\d+)", name)
  if m and f"{m.group(1)}.{m.group(2)}" in insts:
    return f"{m.group(1)}.{m.group(2)}"
  op = event.get("args", {}).get("hlo_op")
  return op if op in insts and not op.startswith("command_buffer") else None


def library_kind(name: str) -> str:
  for kind, pattern in LIBRARY_KINDS:
    if re.search(pattern, name, re.IGNORECASE):
      return kind
  return "other library kernels"


def split_device_kernels(trace_events, insts, lines: set | None = None):
  """(kernel events renamed to their HLO op, library kernel events) of the device lines
  (`device_stream_lines`, computed here unless given).

  The renamed kernels each get a line of their own, so `summarize`'s 'shared' column is
  the time a kernel ran beside another (a CUDA graph runs independent branches at once)."""
  lines = device_stream_lines(trace_events) if lines is None else lines
  mapped, library = [], []
  for e in trace_events:
    if e.get("ph") != "X" or (e.get("pid"), e.get("tid")) not in lines:
      continue
    op = kernel_hlo_op(e, insts)
    if op:  # each kernel its own line: kernels of a CUDA graph's branches overlap on
      # one stream line, which is concurrency, not nesting (`self_and_shared_times`)
      mapped.append(dict(e, name=op, tid=("kernel", len(mapped))))
    else:
      library.append(e)
  return mapped, library


def busy_us(events) -> float:
  """Length of the union of the events' [ts, ts + dur) intervals, µs."""
  total, end = 0.0, None
  for e in sorted(events, key=lambda e: e["ts"]):
    start, stop = e["ts"], e["ts"] + e["dur"]
    if end is None or start > end:
      total += stop - start
      end = stop
    elif stop > end:
      total += stop - end
      end = stop
  return total


def step_wall_us(trace_events) -> float | None:
  """Duration of this tool's traced ``one_step`` (its Python-frame event), if present."""
  steps = [e["dur"] for e in trace_events if e.get("ph") == "X"
           and str(e.get("name", "")).endswith(" one_step")]
  return max(steps) if steps else None


def device_summary(trace_events, mapped, library, wall_us: float | None,
                   model_flops: float | None = None, host_top: int = 14,
                   lines: set | None = None) -> str:
  """The device's view of one step: kernels, their busy time against the step's wall
  time, the library kernels by kind, and the longest host-side runtime events (those
  off the device lines, `device_stream_lines`, computed here unless given)."""
  kernels = mapped + library
  busy = busy_us(kernels)
  span = (max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
          if kernels else 0.0)
  out = [f"device: {len(kernels)} kernels ({len(mapped)} joined to HLO ops, {len(library)} "
         f"library kernels), busy {busy / 1e3:.2f} ms over a {span / 1e3:.2f} ms span"]
  if wall_us:
    out.append(f"step wall {wall_us / 1e3:.2f} ms: the device idle {(wall_us - busy) / 1e3:.2f} ms "
               f"of it ({100 * (1 - busy / wall_us):.0f}%)")
  if model_flops and busy:
    out.append(f"model FLOPs over the busy time: {model_flops / busy / 1e6:.0f} TFLOP/s")
  kinds = collections.defaultdict(lambda: [0.0, 0])
  for e in library:
    kind = kinds[library_kind(e["name"])]
    kind[0] += e["dur"]
    kind[1] += 1
  out += ["", "library kernels (no HLO name):", "     ms  kernels  kind"]
  out += [f"{us / 1e3:7.2f} {n:8d}  {k}" for k, (us, n) in sorted(kinds.items(), key=lambda x: -x[1][0])]
  lines = device_stream_lines(trace_events) if lines is None else lines
  host = collections.defaultdict(lambda: [0.0, 0])
  for e in trace_events:
    name = str(e.get("name", ""))
    if (e.get("ph") == "X" and (e.get("pid"), e.get("tid")) not in lines
        and not name.startswith("$") and e.get("dur", 0) >= 1000):
      host[name][0] += e["dur"]
      host[name][1] += 1
  out += ["", "host runtime events of 1 ms or more (nested ones included):", "     ms  calls  event"]
  out += [f"{us / 1e3:7.2f} {n:6d}  {k[:100]}"
          for k, (us, n) in sorted(host.items(), key=lambda x: -x[1][0])[:host_top]]
  return "\n".join(out)


def report(trace_events, hlo_text: str, args, wall_us: float | None = None,
           model_flops: float | None = None) -> None:
  """Print the profile of one traced step: the device's view first where the trace has
  device kernel lines (a GPU), then the grouped ops (`summarize`) and, with
  ``--top_ops``, the longest non-matmul ops. Returns the parsed HLO (`parse_hlo`)."""
  comps, insts, hlo_shapes = parse_hlo(hlo_text)
  lines = device_stream_lines(trace_events)
  mapped, library = split_device_kernels(trace_events, insts, lines)
  if mapped or library:
    print(device_summary(trace_events, mapped, library, wall_us, model_flops, lines=lines))
    print()
    trace_events = mapped
  _report(trace_events, comps, insts, hlo_shapes, args, "longest non-matmul ops")
  return comps, insts, hlo_shapes


def _read_text(path: str) -> str:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    return f.read()


# ----------------------------------------------------------------------------- dots alone
def executed_dots(trace_events, comps, insts, shapes):
  """The dots the traced step ran: ``({Dot: calls}, {Dot: source})``, each executed op's
  dot (a ``dot`` instruction, or the dots of the fusion it calls) counted once per traced
  run of the op, so a conditional's branch not taken counts nothing; the source is the
  first call's JAX ``op_name`` (else its op's, `op_source`) with layer numbers folded."""
  calls, source = collections.Counter(), {}
  for e in traced_ops(trace_events, insts)[0]:
    comp, line = insts[e["name"]]
    called = re.search(r"calls=%([\w.\-]+)", line)
    lines = ([(comp, line)] if " dot(" in line else
             [(called.group(1), x) for x in comps.get(called.group(1), []) if " dot(" in x]
             if called else [])
    for c, x in lines:
      d = _parse_dot(c, x, shapes)
      if d is not None and d.flops:
        calls[d] += 1
        name = re.search(r'op_name="([^"]*)"', x)
        source.setdefault(d, fold(name.group(1) if name else op_source(e["name"], insts, comps)))
  return calls, source


def dot_callable(dot: Dot, options=None):
  """``(compiled dot_general, its operands)``: the dot by itself, jitted with the step's
  compiler options, on random operands of its shapes."""
  import jax
  import jax.numpy as jnp
  dtype = lambda shape: jnp.dtype(_HLO_DTYPES[shape.split("[")[0]])
  a = jax.random.normal(jax.random.PRNGKey(0), _dims(dot.lhs), jnp.float32).astype(dtype(dot.lhs))
  b = jax.random.normal(jax.random.PRNGKey(1), _dims(dot.rhs), jnp.float32).astype(dtype(dot.rhs))
  dn = ((dot.lhs_contracting, dot.rhs_contracting), (dot.lhs_batch, dot.rhs_batch))
  f = jax.jit(lambda x, y: jax.lax.dot_general(x, y, dn, preferred_element_type=dtype(dot.out)))
  return f.lower(a, b).compile(options), (a, b)


def _best_call_s(f, xs, calls: int) -> float:
  """The fastest of ``calls`` synchronous calls ``f(*xs)``, in seconds."""
  import jax
  best = float("inf")
  for _ in range(calls):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*xs))
    best = min(best, time.perf_counter() - t0)
  return best


def dots_alone(dots: dict, run_step, rounds: int, options=None, peak_n: int = 2048,
               calls: int = 3):
  """Round by round: one step (``run_step()``, seconds), then each distinct dot by itself
  (`dot_callable`; the fastest of ``calls`` calls, less jax's dispatch) counted as many
  times as the step ran it, then the square float32 matmul ``peak_n``² (the fastest of
  ``calls``). The step and the dots it holds run seconds apart, so their ratio holds
  through this VM's drifts. Jax's dispatch per call (a jitted scalar add, the fastest of
  5 calls) is taken off each dot's time, floored at 0: the step pays no dispatch per op.

  Returns ``{"rounds": [{"step_s", "dots_s", "dispatch_s", "peak_flops_per_s"}, ...],
  "per_dot": {Dot: [s per call, one per round]}}``.
  """
  import jax
  import jax.numpy as jnp
  fns = {d: dot_callable(d, options) for d in dots}
  x = jnp.ones((peak_n, peak_n), jnp.float32)
  square = jax.jit(jnp.dot).lower(x, x).compile(options)
  one = jnp.float32(1)
  noop = jax.jit(lambda v: v + 1).lower(one).compile(options)
  for f, xs in [*fns.values(), (square, (x, x)), (noop, (one,))]:
    jax.block_until_ready(f(*xs))
  out = {"rounds": [], "per_dot": {d: [] for d in dots}}
  for _ in range(rounds):
    step_s = run_step()
    dispatch = _best_call_s(noop, (one,), 5)
    total = 0.0
    for d, (f, xs) in fns.items():
      t = max(_best_call_s(f, xs, calls) - dispatch, 0.0)
      out["per_dot"][d].append(t)
      total += dots[d] * t
    out["rounds"].append({"step_s": step_s, "dots_s": total, "dispatch_s": dispatch,
                          "peak_flops_per_s": 2.0 * peak_n ** 3 / _best_call_s(square, (x, x), calls)})
  return out


def dots_alone_report(dots: dict, source: dict, res: dict, top: int = 20) -> str:
  """The table of `dots_alone`: per round the step, its dots alone and their share, the
  square peak; then the dots by their time alone (median over rounds)."""
  flops = sum(n * d.flops for d, n in dots.items())
  rows = res["rounds"]
  med = statistics.median
  out = [f"the step's dots alone: {len(dots)} distinct dots, {sum(dots.values())} calls, "
         f"{flops / 1e9:.1f} GFLOP; each jitted by itself with the step's compiler options "
         "and timed once per round (the fastest of 3 calls, less jax's dispatch per call: "
         f"{med([r['dispatch_s'] for r in rows]) * 1e6:.0f} µs), times "
         "its calls; the step once per round, seconds before", "",
         " round  step s  dots alone s  dots / step  dots' GFLOP/s  square f32 peak GFLOP/s"
         "  step at the peak's rate s"]
  for k, r in enumerate(rows):
    out.append(f"{k + 1:6d} {r['step_s']:7.3f} {r['dots_s']:13.3f} {r['dots_s'] / r['step_s']:11.0%} "
               f"{flops / r['dots_s'] / 1e9:14.0f} {r['peak_flops_per_s'] / 1e9:24.0f} "
               f"{flops / r['peak_flops_per_s']:26.3f}")
  out.append(f"median {med([r['step_s'] for r in rows]):7.3f} "
             f"{med([r['dots_s'] for r in rows]):13.3f} "
             f"{med([r['dots_s'] / r['step_s'] for r in rows]):11.0%} "
             f"{med([flops / r['dots_s'] for r in rows]) / 1e9:14.0f} "
             f"{med([r['peak_flops_per_s'] for r in rows]) / 1e9:24.0f} "
             f"{med([flops / r['peak_flops_per_s'] for r in rows]):26.3f}")
  per = sorted(((dots[d] * med(ts), d) for d, ts in res["per_dot"].items()), key=lambda x: -x[0])
  out += ["", f"dots by their time alone (median over rounds; the top {top}):",
          "  ms all  calls  ms/call  GFLOP/s  dot; source"]
  for ms, d in per[:top]:
    each = ms / dots[d]
    rate = f"{d.flops / each / 1e9:8.0f}" if each else "       –"
    out.append(f"{ms * 1e3:8.1f} {dots[d]:6d} {each * 1e3:8.3f} {rate}  "
               f"{d.label()}; {source.get(d, '')[-70:]}")
  return "\n".join(out)


# ----------------------------------------------------------------------------- main
def _traced(run, trace_dir: str | None):
  """``(run(), the trace's events)`` with jax's profiler on around ``run()``.

  Without ``--trace_dir`` the trace goes to a temporary directory, removed once read.
  """
  import jax
  with contextlib.ExitStack() as stack:
    if trace_dir is None:
      trace_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="slic_jax_profile_"))
    jax.profiler.start_trace(trace_dir)
    try:
      out = run()
    finally:
      jax.profiler.stop_trace()
    return out, _trace_events(trace_dir)


def _trace_events(trace_dir: str):
  """The events of the last trace under `trace_dir` (None, with a message, if none)."""
  files = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz")))
  if not files:
    print(f"no trace written under {trace_dir}", file=sys.stderr)
    return None
  return json.load(gzip.open(files[-1]))["traceEvents"]


def _report(events, comps, insts, hlo_shapes, args, top_ops_title: str) -> None:
  print(summarize(events, comps, insts, hlo_shapes, args.top))
  if args.li and not args.optimizer_only:
    print()
    heads = benchmark.size_dims(args.size)["num_heads"]
    print(length_squared_split(events, comps, insts, hlo_shapes, args.li, heads))
  if args.top_ops:
    print(f"\n{top_ops_title}:")
    print(top_ops(events, comps, insts, hlo_shapes, args.top_ops))


def _median_call_s(fn, state: tuple, repeats: int, *consts) -> tuple[float, tuple]:
  """Median wall time of ``state = fn(*state, *consts)`` over `repeats` calls, and the last
  state (donated: each call's outputs feed the next)."""
  import jax
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state = fn(*state, *consts)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  return sorted(times)[len(times) // 2], state


def profile_optimizer(params, args) -> int:
  """The update ``params' = params + tx(g)`` alone (`benchmark.make_optimizer`: clipping by
  global norm + Adafactor; the step's compiler options), with g = 1e-3 · params (op times do
  not depend on the values). Beside it, in the same process, one elementwise pass
  ``x' = 1.0001 · x`` over a flat float32 array of the parameters' total size: that pass
  reads and writes the bytes once, so its time is a memory-bandwidth yardstick for the
  update (which must read g and params and write params at least once).
  """
  import jax
  import jax.numpy as jnp
  import optax
  options = benchmark.step_options(args.xla_default, benchmark.parse_xla_options(args.xla_option))
  tx = benchmark.make_optimizer(implementation=args.optimizer_implementation)
  grads = jax.tree.map(lambda p: 1e-3 * p, params)

  def update(params, opt_state, grads):  # grads an argument: no constant folding
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  compiled = jax.jit(update, donate_argnums=(0, 1)).lower(
      params, opt_state, grads).compile(options)
  n = sum(x.size for x in jax.tree.leaves(params))
  scale = jax.jit(lambda x: (x * 1.0001,), donate_argnums=(0,)).lower(
      jax.ShapeDtypeStruct((n,), jnp.float32)).compile(options)
  _, state = _median_call_s(compiled, (params, opt_state), args.warmup + 1, grads)
  update_s, state = _median_call_s(compiled, state, args.repeats, grads)
  _, flat = _median_call_s(scale, (jnp.ones((n,), jnp.float32),), args.warmup + 1)
  pass_s, _ = _median_call_s(scale, flat, args.repeats)
  _, events = _traced(lambda: jax.block_until_ready(compiled(*state, grads)), args.trace_dir)
  if events is None:
    return 1
  comps, insts, hlo_shapes = parse_hlo(compiled.as_text())
  print(f"{args.size}: optimizer update alone ({len(jax.tree.leaves(params))} parameter arrays, "
        f"{n / 1e6:.1f}M float32): median {update_s * 1e3:.0f} ms of {args.repeats}; one "
        f"elementwise pass over {n * 4 / 2**20:.0f} MB (read + write): {pass_s * 1e3:.1f} ms "
        f"({2 * n * 4 / pass_s / 1e9:.0f} GB/s); ratio {update_s / pass_s:.1f}")
  _report(events, comps, insts, hlo_shapes, args, "longest ops")
  return 0


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", default="small", choices=sorted(benchmark.SIZES))
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--li", type=int, default=None,
                  help="input length (default 512); with --from_trace, the traced step's, "
                       "for the split of the ops on [.., Li, Li] arrays")
  ap.add_argument("--lt", type=int, default=64)
  ap.add_argument("--reg_target", default="reference", choices=["reference", "chosen"])
  ap.add_argument("--model", default="slic_hf", choices=["slic_hf", "sft"],
                  help="the step's model: SLiC-HF on pair batches (--batch pairs), or SFT "
                       "(`models.EncoderDecoderModel`, --batch rows of random full-length "
                       "examples; --pack)")
  ap.add_argument("--pack", type=int, default=1,
                  help="--model sft: examples per row (> 1: packed, with segment ids and "
                       "positions as seqio packs them)")
  ap.add_argument("--vocab_size", type=int, default=None,
                  help="network.T5Config.vocab_size (default: the size's; gin/sft.gin's "
                       "synthetic world has 512)")
  ap.add_argument("--xla_default", action="store_true")
  benchmark.add_xla_option_flag(ap)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--attention_block_bytes", type=int, default=0,
                  help="network.T5Config.attention_block_bytes (0: unblocked)")
  ap.add_argument("--attention_implementation", default="default",
                  choices=["default", "cudnn", "xla", "fused_softmax"],
                  help="network.T5Config.attention_implementation")
  ap.add_argument("--logits_dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--top", type=int, default=30)
  ap.add_argument("--top_ops", type=int, default=0,
                  help="also list the N longest single ops that are not matmuls "
                       "(layout copies, reductions, elementwise fusions)")
  ap.add_argument("--dump_hlo", default=None, help="write the compiled step's HLO text here")
  ap.add_argument("--trace_dir", default=None, help="keep the trace here (default: a temp dir)")
  ap.add_argument("--host_malloc", default="reuse", choices=["reuse", "default"],
                  help="host_memory.reuse_freed_memory() first where the step runs on the "
                       "CPU (as slic_jax.train), or not")
  ap.add_argument("--optimizer_only", action="store_true",
                  help="profile the optimizer update alone (clipping + Adafactor + apply) on "
                       "the model's parameters, beside one elementwise pass over as many bytes")
  ap.add_argument("--optimizer_implementation", default="fused",
                  choices=["fused", "grouped", "cpu_kernels", "optax"],
                  help="optimizers.create_optimizer(implementation=...)")
  ap.add_argument("--repeats", type=int, default=9,
                  help="--optimizer_only: timed calls (median) besides the traced one")
  ap.add_argument("--dots_alone", type=int, default=0, metavar="ROUNDS",
                  help="after the profile, time the step's dots each by itself beside the "
                       "step, ROUNDS rounds (`dots_alone`): how much of the step its dots "
                       "take at XLA's own rate for their shapes")
  ap.add_argument("--from_trace", default=None, metavar="DIR",
                  help="report the trace kept under DIR (an earlier --trace_dir) with --hlo, "
                       "building and running nothing")
  ap.add_argument("--hlo", default=None, metavar="FILE",
                  help="--from_trace: the step's HLO text (an earlier --dump_hlo; .gz read too)")
  args = ap.parse_args(argv)

  if args.from_trace:
    if not args.hlo:
      ap.error("--from_trace needs --hlo (the HLO text the traced step ran)")
    events = _trace_events(args.from_trace)
    if events is None:
      return 1
    wall_us = step_wall_us(events)
    print(f"trace {args.from_trace}, HLO {args.hlo}: traced step "
          f"{'%.2f ms wall' % (wall_us / 1e3) if wall_us else 'wall time not in the trace'}")
    report(events, _read_text(args.hlo), args, wall_us)
    return 0

  args.li = args.li or 512
  if args.pack != 1 and args.model != "sft":
    ap.error("--pack needs --model sft (pair batches are never packed)")
  # Before jax starts, as the benchmark worker and slic_jax.train: slic_jax's malloc
  # settings only where the step runs on the CPU. (They used to be forced here: on a GPU
  # host, one malloc arena for XLA's many compile threads is the likely reason session 25's
  # GPU profiles compiled for 100+ s where the workers took 28-32 s; not confirmed on a GPU.)
  benchmark.apply_host_malloc(args.host_malloc)
  import jax
  from slic_jax import partitioning
  cfg = benchmark.make_config(args.size, args.dtype, logits_dtype=args.logits_dtype,
                              attention_block_bytes=args.attention_block_bytes,
                              attention_implementation=args.attention_implementation)
  if args.vocab_size:
    cfg = dataclasses.replace(cfg, vocab_size=args.vocab_size)
  np_batch = benchmark.random_batch(args.model, args.batch, args.li, args.lt,
                                    cfg.vocab_size, args.pack)
  shapes = {k: v.shape for k, v in np_batch.items()}
  # The benchmark worker's step: one device, slic_jax's logical-axis rules.
  with partitioning.Partitioner(devices=jax.devices()[:1]).activation_rules():
    step, init_state = benchmark.build_step(
        cfg, shapes, reg_target=args.reg_target, xla_default=args.xla_default,
        xla_options=benchmark.parse_xla_options(args.xla_option),
        optimizer_implementation=args.optimizer_implementation, model=args.model)
    state = jax.jit(init_state)(jax.random.PRNGKey(0))
    batch = jax.device_put(np_batch)
    if args.optimizer_only:
      return profile_optimizer(state.params, args)
    compiled = step.lower(state, batch).compile()
  for _ in range(args.warmup):
    state, _ = compiled(state, batch)
  jax.block_until_ready(state)
  carry = [state]  # donated: each step's state feeds the next

  def one_step():
    t0 = time.perf_counter()
    carry[0], _ = compiled(carry[0], batch)
    jax.block_until_ready(carry[0])
    return time.perf_counter() - t0

  wall, events = _traced(one_step, args.trace_dir)
  if events is None:
    return 1
  hlo_text = compiled.as_text()
  if args.dump_hlo:
    with open(args.dump_hlo, "w") as f:
      f.write(hlo_text)
  if args.model == "sft":  # one decoded row per encoded row; packing changes no matmul
    n_targets, what = 1, (f"SFT, {args.batch} rows of {args.pack} example(s), vocab "
                          f"{cfg.vocab_size}")
  else:
    n_targets = 2 if args.reg_target == 'chosen' else 3
    what = f"{args.batch} pairs, reg_target {args.reg_target}"
  model_flops = benchmark.config_flops(
      cfg, args.batch, args.li, args.lt, n_targets=n_targets)['train_step']
  print(f"{args.size}, {what}, Li {args.li}, Lt {args.lt}, "
        f"dtype {args.dtype} (logits {args.logits_dtype}), attention "
        f"{args.attention_implementation}, "
        f"{'XLA defaults' if args.xla_default else 'slic_jax compiler options'}, backend "
        f"{jax.default_backend()}: profiled step {wall:.3f} s wall; model GFLOP/step "
        f"{model_flops / 1e9:.0f}")
  comps, insts, hlo_shapes = report(events, hlo_text, args, wall * 1e6, model_flops)
  if args.dots_alone:
    dots, source = executed_dots(events, comps, insts, hlo_shapes)
    options = benchmark.step_options(args.xla_default, benchmark.parse_xla_options(args.xla_option))
    print()
    print(dots_alone_report(dots, source, dots_alone(dots, one_step, args.dots_alone, options)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
