#!/usr/bin/env bash
# Prepared in session 25 for the next session with an NVIDIA GPU; NOT YET RUN ON A GPU.
# One device call (BUDGET seconds of work, default 420; give timeout_s BUDGET + 40), rows in
# order of priority, each skipped when the budget runs short. bf16 + cuDNN step, T5 1.1
# small, 32 pairs, Li 512 / Lt 64, TRL's 2-row loss, as session 25's calls:
#  1. the default (XLA re-records the step's CUDA graphs on every call: ~10 of 29 ms of host
#     time, NOTES session 25 finding 1) against XLA's command-buffer update modes that keep
#     buffer addresses fixed (xla_gpu_command_buffer_update_mode: SKIP_TEMP / SKIP_PROFILED in
#     the newest XLA, NEVER_UPDATE in jaxlib 0.10.2's; XLA aborts at once on a value it does
#     not know, so the rows that do not apply cost seconds). A mode that skipped a needed
#     update would compute with stale addresses: compare each row's final_loss with the
#     default row's (bf16 rows of one configuration agree to ~0.05);
#  2. the grouped Adafactor update (--optimizer_implementation grouped; the per-array update
#     was 1550 of the step's 2546 kernels);
#  3. the default again (the spread between two runs of one row), jax's bf16 matmul peak;
#  4. a profile of the fastest correct variant (trace and HLO kept: re-read them off the
#     device with tools/profile_step.py --from_trace DIR --hlo FILE);
#  5. that variant at 128 pairs.
#   run: OUT=dir bash benchmarks/gpu_h200_session25/next_gpu_call.sh   (carry .whl: the gin,
#   clu and ml_collections wheels under .whl/base, as the session 24/25 calls)
set -u
T0=$(date +%s)
BUDGET=${BUDGET:-420}
W=/tmp/next; mkdir -p $W
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/base/gin_config*.whl .whl/base/clu*.whl .whl/base/ml_coll*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONFAULTHANDLER=1 JAX_THREEFRY_GPU_KERNEL_LOWERING=1 PYTHONUNBUFFERED=1
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
pack() { tar -czf $OUT/results.tar.gz -C $W . 2>/dev/null; }
row() { # name batch xla_flags optimizer_implementation
  local name=$1 b=$2 flags=$3 impl=$4; local l; l=$(left)
  if (( l < 45 )); then echo "SKIP $name (time)"; return; fi
  local lim=$(( l < 90 ? l : 90 ))
  echo "=== $name (limit $lim s; XLA_FLAGS='$flags', optimizer $impl)"
  XLA_FLAGS="$flags" timeout -s ABRT $lim python3 tools/benchmark.py --_worker slic --size small \
    --li 512 --lt 64 --batch $b --steps 10 --warmup 3 --seed 0 --reg_target chosen \
    --logits_dtype float32 --host_malloc reuse --microbatches 1 --dtype bfloat16 --remat none \
    --attention_implementation cudnn --optimizer_implementation $impl >"$W/$name.json" 2>"$W/$name.err"
  echo "rc=$? at $(( $(date +%s) - T0 )) s"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d.get(k) for k in ('step_s_median','step_s_min','pairs_per_s','achieved_model_flops_per_s','peak_device_memory_mb','compile_s','final_loss')})" "$W/$name.json" 2>/dev/null || tail -c 600 $W/$name.err
  pack
}
M=--xla_gpu_command_buffer_update_mode
row default_1 32 "" fused
row skip_temp 32 "$M=SKIP_TEMP" fused
row skip_profiled 32 "$M=SKIP_PROFILED" fused
row never_update 32 "$M=NEVER_UPDATE" fused
row grouped 32 "" grouped
row default_2 32 "" fused
timeout 40 python3 tools/benchmark.py --_worker matmul --matmul_n 8192 --matmul_reps 10 > $W/mm_jax.json 2>$W/mm_jax.err
head -c 400 $W/mm_jax.json; echo; pack
# The fastest row whose loss is within 0.1 of the default rows' (its XLA flags, optimizer).
read -r BEST_NAME BEST_FLAGS BEST_IMPL <<<"$(python3 - "$W" "$M" <<'PY'
import json, sys
w, m = sys.argv[1], sys.argv[2]
flags = {"skip_temp": f"{m}=SKIP_TEMP", "skip_profiled": f"{m}=SKIP_PROFILED",
         "never_update": f"{m}=NEVER_UPDATE"}
rows = {}
for n in ("default_1", "default_2", "skip_temp", "skip_profiled", "never_update", "grouped"):
  try:
    rows[n] = json.load(open(f"{w}/{n}.json"))
  except Exception:
    pass
ref = [r["final_loss"] for n, r in rows.items() if n.startswith("default")]
ok = {n: r for n, r in rows.items() if ref and abs(r["final_loss"] - ref[0]) < 0.1}
best = max(ok, key=lambda n: ok[n]["pairs_per_s"]) if ok else "default_1"
print(best, flags.get(best, "-"), "grouped" if best == "grouped" else "fused")
PY
)"
[ "$BEST_FLAGS" = "-" ] && BEST_FLAGS=""
echo "best: $BEST_NAME (XLA_FLAGS='$BEST_FLAGS', optimizer $BEST_IMPL)"
if (( $(left) > 150 )); then
  echo "=== profile, $BEST_NAME, 32 pairs"
  XLA_FLAGS="$BEST_FLAGS" timeout -s ABRT 140 python3 tools/profile_step.py --size small --batch 32 \
    --li 512 --lt 64 --dtype bfloat16 --logits_dtype float32 --reg_target chosen \
    --attention_implementation cudnn --optimizer_implementation $BEST_IMPL --top 30 --top_ops 20 \
    --warmup 3 --trace_dir $W/trace --dump_hlo $W/hlo.txt > $W/profile.txt 2>&1
  echo "rc=$? at $(( $(date +%s) - T0 )) s"; head -c 2500 $W/profile.txt
  gzip -f $W/hlo.txt 2>/dev/null; find $W/trace -name "*.xplane.pb" -delete 2>/dev/null; pack
fi
row best_b128 128 "$BEST_FLAGS" $BEST_IMPL
echo "done at $(( $(date +%s) - T0 )) s"; ls -la $OUT
