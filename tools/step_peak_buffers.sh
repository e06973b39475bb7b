#!/usr/bin/env bash
# Where the SLiC-HF step's XLA buffers peak, and what is alive there.
#
#   bash tools/step_peak_buffers.sh [tools/benchmark.py step-worker flags]
#   e.g. bash tools/step_peak_buffers.sh --batch 4 --dtype float32 --logits_dtype float32 --remat full
#
# Compiles the step exactly as tools/benchmark.py's step worker does (T5 1.1 small, Li 512,
# Lt 64, TRL's 2-row loss unless overridden; one step is run) with XLA dumping its
# buffer live ranges, then prints XLA's own total at the peak ("Stack trace breakdown
# for peak usage", parameters and optimizer state included) and the buffers alive there
# grouped by the JAX op that made them (layer numbers folded: layers_N), largest first.
# Used in session 12 to find the buffers that XLA:CPU kept (benchmarks/NOTES.md).
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DUMP=$(mktemp -d)
trap 'rm -rf "$DUMP"' EXIT
XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=$DUMP --xla_dump_hlo_module_re=train_step" \
  "$PY" tools/benchmark.py --_worker slic --size small --li 512 --lt 64 --steps 1 --warmup 0 \
  --seed 0 --reg_target chosen --microbatches 1 --host_malloc reuse --remat none "$@" \
  >/dev/null 2>"$DUMP/worker.log" || { cat "$DUMP/worker.log" >&2; exit 1; }
f=$(ls "$DUMP"/*train_step*live-range.txt | head -1)
"$PY" - "$f" <<'PY'
import collections, re, sys
text = open(sys.argv[1]).read()
peak = re.search(r"Live ranges at (\d+) \(peak\)", text)
total = re.search(r"Stack trace breakdown for peak usage: ([\d ]+) bytes", text)
print(f"peak at instruction {peak.group(1)}: {int(total.group(1).replace(' ', '')) / 2**20:.1f} MB")
by_op = collections.Counter()
for line in text[total.end():].splitlines():
  m = re.match(r"^      (├|└)── (\S+) \(.*current: ([\d ]+) bytes", line)
  if m and m.group(2) != "state":
    by_op[re.sub(r"layers_\d+", "layers_N", m.group(2)).replace("jit(train_step)/", "")] += \
        int(m.group(3).replace(" ", ""))
print(f"{sum(by_op.values()) / 2**20:8.1f} MB  (all but the state: parameters, optimizer)")
for name, size in by_op.most_common(int(__import__('os').environ.get('TOP', 20))):
  print(f"{size / 2**20:8.1f} MB  {name}")
PY
