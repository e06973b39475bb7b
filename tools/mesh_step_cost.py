r"""The update step on a device mesh: what each device computes, sends and holds.

Run (nothing is run but the compiler: T5 1.1 small, 3 compiles, about 2 minutes on 2 cores)::

  .venv/bin/python tools/mesh_step_cost.py --size small --dtype bfloat16 --batch 32 \
      --li 512 --lt 64 --mesh 8x1 --mesh 4x2 --out OUT.json --md OUT.md

It compiles the step exactly as ``slic_jax.train`` does on a ('data', 'model') mesh
(`partitioning.Partitioner`: T5X's logical-axis rules, the train state placed by
`Partitioner.train_state_shardings`, the batch split over 'data', ``jax.jit`` with
``in_shardings``/``out_shardings`` and donated state, slic_jax's compiler options), once
on one device and once per ``--mesh DxM``, and reads from each compiled program (the
per-device program that SPMD partitioning made):

* the matmul FLOPs per device (every ``dot`` of the program, a loop body's once per
  trip: `matmul_flops`; XLA's own ``cost_analysis`` count, elementwise work included but
  a loop body counted once, is in the JSON) and ``devices × per device / one device``,
  the *compute overhead*: 1.00 when the mesh divides the step's matmuls evenly, more for
  matmuls every device repeats, ``devices`` if the step were not partitioned;
* every collective per step: all-reduce / all-gather / reduce-scatter / all-to-all /
  collective-permute, how many and the bytes of their results per device (a loop body's
  once per trip: the microbatch loop, ``--microbatches``), and the largest by JAX source
  (``op_name``, layer numbers folded), where an unexpected all-gather shows up by name;
* XLA's buffer sizes per device (``memory_analysis``): arguments (the state's and the
  batch's shards), temporaries.

Nothing is timed: this says what a multi-device step does, not how fast a given
interconnect runs it. By default the devices are fake CPU devices
(``--xla_force_host_platform_device_count``, set here before jax starts), so the program
is XLA:CPU's, including slic_jax's CPU-only code paths (`slic_jax.matmul`'s layouts);
the partitioning (GSPMD / Shardy) is backend-independent, the fusion, layouts and
collective passes are not. ``--fake_cpu_devices 0`` compiles for the devices the process
has. ``--topology v5e:2x4`` (any TPU slice libtpu knows: 'v4:2x2x1', 'v5e:4x4', …)
compiles for the chips of that slice on this host, no TPU needed
(`jax.experimental.topologies`; libtpu from ``bash tools/setup_tpu_compiler.sh DIR`` on
``PYTHONPATH``): the TPU's own program, traced with the TPU's code paths
(`slic_jax.platforms`), after libtpu's collective passes (all-reduces combined,
reassociated, moved out of loops), which XLA:CPU does not run. libtpu writes its matmuls
as convolutions, so a TPU row's FLOPs are XLA's cost analysis (elementwise work
included, a loop body counted once) and its loops' trips come from their conditions;
its ``temp`` size is libtpu's report (0 for some programs). The result is JSON
(``--out``) and a markdown table (stdout, ``--md``).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402  (tools/, beside this file; imports no jax at load)
import profile_step  # noqa: E402

sys.path.insert(0, benchmark.REPO)  # slic_jax from this checkout, installed or not

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
          "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
          "c64": 8, "c128": 16}
_COLLECTIVE_LINE = re.compile(
    r"^\s*(?:ROOT )?%\S+ = (.*?) (" + "|".join(COLLECTIVES) + r")(-start)?\(")


# ----------------------------------------------------------------------------- HLO
def shape_bytes(shape_text: str) -> int:
  """Bytes of every array in an HLO result type: 'f32[4,8]{1,0}' → 128; a tuple
  '(f32[2], bf16[3])' → 14; a scalar 'f32[]' → 4."""
  total = 0
  for dtype, dims in re.findall(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]", shape_text):
    if dtype not in _BYTES:
      raise ValueError(f"unknown HLO element type {dtype!r} in {shape_text!r}")
    n = 1
    for d in dims.split(","):
      n *= int(d) if d else 1
    total += n * _BYTES[dtype]
  return total


_CALLEE = re.compile(
    r"\b(condition|body|to_apply|calls|true_computation|false_computation)=%([\w.\-]+)")


def _condition_bound(lines: list[str]) -> int | None:
  """N of a loop condition whose root is ``compare(counter, constant(N)), direction=LT``
  (how `lax.scan` and `lax.fori_loop` lower: a counter from 0 in steps of 1, so N trips);
  None for any other condition."""
  root = next((l for l in lines if l.lstrip().startswith("ROOT ")), "")
  m = re.search(r" compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT\b", root)
  if not m:
    return None
  const = next((l for l in lines if re.match(rf"\s*%{re.escape(m.group(1))} = s32\[\]", l)), "")
  n = re.search(r" constant\((\d+)\)", const)
  return int(n.group(1)) if n else None


def computation_multipliers(hlo_text: str) -> dict[str, int]:
  """How many times each computation of a program runs per execution of its ENTRY.

  A while loop's body runs its ``known_trip_count`` times (its condition once more),
  read from the loop's backend config (XLA:CPU) or, where that is absent (libtpu's
  programs), from a condition ``counter < constant(N)`` (`_condition_bound`); a loop
  with neither counts once. Every other call (fusions, reductions' ``to_apply``,
  conditional branches) runs once per run of its caller: the microbatch loop of
  `update_step.make_train_step` (k trips) multiplies what its body computes and sends.
  """
  comps, _, _ = profile_step.parse_hlo(hlo_text)
  entry = re.search(r"^ENTRY %(\S+) ", hlo_text, re.M)
  callers = collections.defaultdict(list)  # callee -> [(caller, factor)]
  for comp, lines in comps.items():
    for line in lines:
      trips = None
      if " while(" in line:
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        cond = re.search(r"\bcondition=%([\w.\-]+)", line)
        trips = (int(known.group(1)) if known else
                 _condition_bound(comps.get(cond.group(1), [])) if cond else None)
      n = trips or 1
      for kind, callee in _CALLEE.findall(line):
        callers[callee].append((comp, n + 1 if kind == "condition" and trips else
                                n if kind == "body" else 1))
      branches = re.search(r"branch_computations=\{([^}]*)\}", line)
      for callee in re.findall(r"%([\w.\-]+)", branches.group(1) if branches else ""):
        callers[callee].append((comp, 1))
  memo = {}

  def times(comp: str, seen=()) -> int:
    if comp not in memo:
      memo[comp] = 1 if entry and comp == entry.group(1) else sum(
          times(c, seen + (comp,)) * f for c, f in callers.get(comp, ()) if c not in seen)
    return memo[comp]

  return {comp: times(comp) for comp in comps}


def matmul_flops(hlo_text: str) -> float:
  """Matmul FLOPs of one execution of a program, every ``dot`` counted (2 · output size ·
  contracted size, `profile_step.dot_flops`) as many times as its computation runs
  (`computation_multipliers`; XLA's own ``cost_analysis`` counts a loop body once)."""
  comps, _, shapes = profile_step.parse_hlo(hlo_text)
  mult = computation_multipliers(hlo_text)
  return float(sum(profile_step.dot_flops(comp, line, shapes) * mult.get(comp, 0)
                   for comp, lines in comps.items() for line in lines if " dot(" in line))


def collectives(hlo_text: str) -> list[dict]:
  """Every collective instruction of a compiled program: its ``kind`` (an entry of
  `COLLECTIVES`; an async ``*-start`` counts as its kind, ``*-done`` not again), the
  ``bytes`` of its result per device, how many ``times`` it runs per step (a loop body's
  collectives once per trip, `computation_multipliers`) and its JAX ``source``
  (``op_name`` with layer numbers folded, `profile_step.fold`; '(no source)' without
  metadata).
  """
  mult = computation_multipliers(hlo_text)
  out, comp = [], None
  for line in hlo_text.split("\n"):
    header = re.match(r"^(?:ENTRY )?%(\S+) \(.*\) -> .* \{$", line)
    if header:
      comp = header.group(1)
      continue
    m = _COLLECTIVE_LINE.match(line)
    if not m:
      continue
    result = m.group(1)
    if m.group(3) and result.startswith("(("):  # async start: ((operands), outputs, ...)
      result = result[result.index(")") + 1:]
    source = re.search(r'op_name="([^"]*)"', line)
    out.append({"kind": m.group(2), "bytes": shape_bytes(result), "times": mult.get(comp, 1),
                "source": profile_step.fold(source.group(1)) if source else "(no source)"})
  return out


def by_kind(items: list[dict]) -> dict:
  """{kind: {'count', 'mb'}} per step (each collective × its ``times``, default 1), in
  `COLLECTIVES`' order, kinds that occur only."""
  out = {}
  for kind in COLLECTIVES:
    sel = [(c.get("times", 1), c["bytes"]) for c in items if c["kind"] == kind]
    if sel:
      out[kind] = {"count": sum(t for t, _ in sel), "mb": sum(t * b for t, b in sel) / 1e6}
  return out


def largest(items: list[dict], n: int) -> list[dict]:
  """The n largest (kind, source) groups by bytes per step: {'kind', 'source', 'count',
  'mb'}."""
  groups = collections.defaultdict(lambda: [0, 0])
  for c in items:
    g = groups[(c["kind"], c["source"])]
    g[0] += c.get("times", 1)
    g[1] += c.get("times", 1) * c["bytes"]
  rows = sorted(groups.items(), key=lambda kv: -kv[1][1])[:n]
  return [{"kind": k, "source": s, "count": c, "mb": b / 1e6} for (k, s), (c, b) in rows]


def parse_mesh(text: str) -> tuple[int, int]:
  """'4x2' → (data 4, model 2)."""
  m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
  if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
    raise argparse.ArgumentTypeError(f"--mesh {text!r}: expected DATAxMODEL, e.g. 4x2")
  return int(m.group(1)), int(m.group(2))


# ----------------------------------------------------------------------------- compile
def require_libtpu() -> None:
  """SystemExit naming the setup step unless libtpu (the TPU compiler) can be loaded."""
  import importlib.util
  if not (importlib.util.find_spec("libtpu") or os.environ.get("TPU_LIBRARY_PATH")):
    raise SystemExit(
        "mesh_step_cost: --topology needs libtpu, the TPU compiler (not a project "
        "dependency): bash tools/setup_tpu_compiler.sh DIR, then run with PYTHONPATH=DIR")


def tpu_topology_devices(name: str) -> list:
  """The chips of the TPU slice ``name`` ('v5e:2x4', 'v4:2x2x1', …) as jax devices that
  can be compiled for, not run on (`jax.experimental.topologies`, libtpu's compiler; no
  TPU needed)."""
  require_libtpu()
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server off Cloud TPU VMs
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # not its lock file: no TPU used
  from jax.experimental import topologies
  try:
    return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
  except Exception as e:  # libtpu's errors name neither the flag nor the value
    raise SystemExit(f"mesh_step_cost: --topology {name!r}: {e}") from None


def build(args):
  """(network config, model, optimizer, numpy batch) of the experiment the arguments
  describe."""
  cfg = benchmark.make_config(args.size, args.dtype, remat=args.remat,
                              attention_implementation=args.attention_implementation)
  if args.vocab_size:
    cfg = dataclasses.replace(cfg, vocab_size=args.vocab_size)
  batch = benchmark.random_batch(args.model, args.batch, args.li, args.lt, cfg.vocab_size,
                                 args.pack)
  model, tx = benchmark.make_model(cfg, args.model, args.reg_target)
  return cfg, model, tx, batch


def compile_step(model, tx, batch: dict, partitioner, num_microbatches: int | None = None,
                 per_device_accumulation: bool = False):
  """The update step as slic_jax.train jits it on ``partitioner``'s mesh (with
  ``num_microbatches``, `update_step.check_microbatches` first, as the trainer), compiled
  for ``batch``'s shapes (nothing allocated, nothing run)."""
  import jax
  from slic_jax import update_step
  shapes = {k: v.shape for k, v in batch.items()}
  update_step.check_microbatches(next(iter(shapes.values()))[0], num_microbatches,
                                 partitioner.data_size)
  types = {k: v.dtype for k, v in batch.items()}
  abstract, state_sh = partitioner.train_state_shardings(model, tx, shapes, types)
  batch_sh = {k: partitioner.batch_sharding(len(s)) for k, s in shapes.items()}
  abstract_batch = {k: jax.ShapeDtypeStruct(shapes[k], types[k], sharding=batch_sh[k])
                    for k in shapes}
  with partitioner.activation_rules():
    step = jax.jit(update_step.make_train_step(model, tx, dropout_seed=1,
                                               num_microbatches=num_microbatches,
                                               per_device_accumulation=per_device_accumulation),
                   in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                   donate_argnums=(0,), compiler_options=benchmark.step_options())
    return step.lower(abstract, abstract_batch).compile()


def mesh_row(compiled, devices: int, one_device_flops: float | None, top: int) -> dict:
  """The per-device figures of one compiled step (see the module docstring).

  ``flops_source``: 'dots' (`matmul_flops`), or where the program has no ``dot`` (a TPU
  program: libtpu rewrites every matmul as a ``convolution``) 'xla' (XLA's
  ``cost_analysis``, elementwise work included, a loop body counted once).
  """
  text = compiled.as_text()
  flops, source = matmul_flops(text), "dots"
  xla_flops = benchmark.xla_cost_flops(compiled)
  if not flops:
    flops, source = xla_flops, "xla"
  items = collectives(text)
  mem = compiled.memory_analysis()
  if source == "xla" and max(computation_multipliers(text).values(), default=1) > 1:
    one_device_flops = None  # XLA's count takes a loop body once: no overhead to say
  row = {
      "devices": devices, "matmul_flops_per_device": flops, "flops_source": source,
      "xla_flops_per_device": xla_flops,
      "compute_overhead": (devices * flops / one_device_flops
                           if flops and one_device_flops else None),
      "collectives": by_kind(items),
      "collective_mb": sum(c["times"] * c["bytes"] for c in items) / 1e6,
      "largest_collectives": largest(items, top),
      "argument_mb": mem.argument_size_in_bytes / 1e6,
      "temp_mb": mem.temp_size_in_bytes / 1e6,
  }
  return row


# ----------------------------------------------------------------------------- report
def _short(source: str, n: int = 110) -> str:
  """A source cut to n characters (XLA's combined collectives join their ops' names)."""
  return source if len(source) <= n else source[:n - 1] + "…"


def to_markdown(res: dict) -> str:
  e = res["experiment"]
  lines = [
      f"# The update step on a mesh: {e['model']}, T5 1.1 {e['size']}, {e['dtype']}, "
      f"{e['batch']} {'pairs' if e['model'] == 'slic_hf' else 'rows'}, Li {e['li']}, "
      f"Lt {e['lt']}" + (f", {e['microbatches']} microbatches on the meshes"
                          if e.get("microbatches", 1) > 1 else "")
      + (", accumulated per device" if e.get("per_device_accumulation") else ""), "",
      f"`{res['command']}`", "",
      f"{res['backend']} ({res['device_kind']}); per device, from the compiled programs "
      f"(nothing run). Model FLOPs of the step (matmuls): {e['model_gflops']:.1f} G.", "",
      "| mesh (data×model) | matmul GFLOP per device | compute overhead | collectives | "
      "MB sent per device | arguments MB | temporaries MB |",
      "|---|---|---|---|---|---|---|",
  ]
  for name, r in res["meshes"].items():
    kinds = ", ".join(f"{v['count']} {k} ({v['mb']:.1f} MB)" for k, v in
                      r["collectives"].items()) or "none"
    overhead = f"{r['compute_overhead']:.3f}" if r["compute_overhead"] else "–"
    lines.append(f"| {name} | {r['matmul_flops_per_device'] / 1e9:.2f} | {overhead} | {kinds} | "
                 f"{r['collective_mb']:.1f} | {r['argument_mb']:.1f} | {r['temp_mb']:.1f} |")
  lines += ["", "MB sent per device: the collectives' result bytes per step. Compute "
            "overhead: devices × per-device matmul FLOPs / the one-device step's (1.00: "
            "evenly divided; the one-device step takes the batch whole)."]
  if any(r.get("flops_source") == "xla" for r in res["meshes"].values()):
    lines[-1] += (" GFLOP per device: XLA's cost analysis (this platform's program has its "
                  "matmuls as convolutions, not dots), elementwise work included and a loop "
                  "body counted once (so no compute overhead is given for a step with a "
                  "microbatch loop).")
  for name, r in res["meshes"].items():
    if r["largest_collectives"]:
      lines += ["", f"Largest collectives, {name}:", "", "| kind | count | MB | source |",
                "|---|---|---|---|"]
      lines += [f"| {c['kind']} | {c['count']} | {c['mb']:.2f} | `{_short(c['source'])}` |"
                for c in r["largest_collectives"]]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--mesh", action="append", type=parse_mesh, default=[], metavar="DxM",
                  help="a ('data', 'model') mesh, e.g. 4x2; repeatable (default 8x1, 4x2)")
  ap.add_argument("--size", default="tiny", choices=sorted(benchmark.SIZES))
  ap.add_argument("--model", default="slic_hf", choices=["slic_hf", "sft"])
  ap.add_argument("--reg_target", default="reference", choices=["reference", "chosen"])
  ap.add_argument("--batch", type=int, default=8, help="pairs (slic_hf) or rows (sft)")
  ap.add_argument("--li", type=int, default=128)
  ap.add_argument("--lt", type=int, default=32)
  ap.add_argument("--pack", type=int, default=1, help="--model sft: examples per row")
  ap.add_argument("--vocab_size", type=int, default=None)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--attention_implementation", default="default",
                  choices=["default", "xla", "fused_softmax", "cudnn"])
  ap.add_argument("--remat", default="none", choices=["none", "full", "minimal"],
                  help="network.T5Config.remat_policy")
  ap.add_argument("--microbatches", type=int, default=1,
                  help="the meshes' steps accumulate gradients over K microbatches "
                       "(train.num_microbatches); the one-device reference takes the batch whole")
  ap.add_argument("--per_device_accumulation", action="store_true",
                  help="with --microbatches: train.per_device_accumulation (each device "
                       "accumulates its gradients, one all-reduce per step)")
  ap.add_argument("--parameter_partitioning_dims", type=int, default=1, choices=[1, 2],
                  help="T5X's rules: 2 also splits the params' 'embed' axis over 'data' "
                       "(2-D / FSDP-like, as for T5-XXL; partitioning."
                       "standard_logical_axis_rules)")
  ap.add_argument("--fake_cpu_devices", type=int, default=None,
                  help="fake CPU devices (default: the largest mesh's); 0: the process's own")
  ap.add_argument("--topology", default=None, metavar="NAME",
                  help="compile for the chips of a TPU slice instead, e.g. v5e:2x4 or "
                       "v4:2x2x1, on this host, without TPUs (libtpu's ahead-of-time "
                       "compiler: bash tools/setup_tpu_compiler.sh)")
  ap.add_argument("--top", type=int, default=8, help="largest collectives listed per mesh")
  ap.add_argument("--out", default=None, help="write the JSON here")
  ap.add_argument("--md", default=None, help="write the markdown here (also printed)")
  args = ap.parse_args(argv)
  meshes = args.mesh or [(8, 1), (4, 2)]
  if args.pack != 1 and args.model != "sft":
    ap.error("--pack needs --model sft (pair batches are never packed)")
  for d, m in meshes:
    if args.batch % (d * args.microbatches):
      ap.error(f"--batch {args.batch} is not divisible by mesh {d}x{m}'s data axis × "
               f"--microbatches ({d} × {args.microbatches})")
  needed = max(d * m for d, m in meshes)
  fake = 0 if args.topology else (
      needed if args.fake_cpu_devices is None else args.fake_cpu_devices)
  if args.topology:
    require_libtpu()
  if fake or args.topology:
    if "jax" in sys.modules:
      raise SystemExit("mesh_step_cost: jax was imported before its platform was set")
    os.environ["JAX_PLATFORMS"] = "cpu"
  if fake:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={fake}")
  import jax
  from slic_jax import partitioning
  devices = tpu_topology_devices(args.topology) if args.topology else jax.devices()
  if len(devices) < needed:
    ap.error(f"mesh of {needed} devices but {args.topology or 'jax'} has {len(devices)}")

  cfg, model, tx, batch = build(args)
  n_targets = 1 if args.model == "sft" else (2 if args.reg_target == "chosen" else 3)
  res = {
      "command": "python " + " ".join(["tools/mesh_step_cost.py", *(argv or sys.argv[1:])]),
      "backend": devices[0].platform, "device_kind": devices[0].device_kind,
      "topology": args.topology, "fake_cpu_devices": fake,
      "experiment": {**{k: getattr(args, k) for k in (
          "model", "size", "reg_target", "batch", "li", "lt", "pack", "dtype",
          "attention_implementation", "remat", "microbatches", "per_device_accumulation",
          "parameter_partitioning_dims")},
          "vocab_size": cfg.vocab_size,
          "model_gflops": benchmark.config_flops(cfg, args.batch, args.li, args.lt,
                                                 n_targets=n_targets)["train_step"] / 1e9},
      "meshes": {},
  }
  partitioners = {}
  shapes = {k: v.shape for k, v in batch.items()}
  for d, m in meshes:  # every mesh checked against the model before the first compile
    p = partitioning.Partitioner(
        num_partitions=m, devices=devices[:d * m],
        logical_axis_rules=partitioning.standard_logical_axis_rules(
            parameter_partitioning_dims=args.parameter_partitioning_dims))
    try:
      p.train_state_shardings(model, tx, shapes)
    except ValueError as e:
      raise SystemExit(f"mesh_step_cost: mesh {d}x{m}: {e}") from None
    partitioners[f"{d}x{m}"] = p
  t0 = time.perf_counter()
  one = compile_step(model, tx, batch, partitioning.Partitioner(devices=devices[:1]))
  res["meshes"]["1x1"] = mesh_row(one, 1, None, args.top)
  one_flops = res["meshes"]["1x1"]["matmul_flops_per_device"]
  res["meshes"]["1x1"]["compute_overhead"] = 1.0
  for name, p in partitioners.items():
    res["meshes"][name] = mesh_row(
        compile_step(model, tx, batch, p, args.microbatches, args.per_device_accumulation),
        p.mesh.size, one_flops, args.top)
  res["compile_s"] = time.perf_counter() - t0
  md = to_markdown(res)
  print(md)
  if args.md:
    with open(args.md, "w") as f:
      f.write(md)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
