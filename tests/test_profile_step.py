"""tools/profile_step.py: matmul FLOPs read back from optimized HLO, and the grouping."""
import importlib.util
import os
import re
import sys
import tempfile

import jax
import pytest
import jax.numpy as jnp

_TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
sys.path.insert(0, _TOOLS)
_spec = importlib.util.spec_from_file_location("slic_jax_tools_profile_step",
                                               os.path.join(_TOOLS, "profile_step.py"))
profile_step = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = profile_step  # (its dataclasses look their module up)
_spec.loader.exec_module(profile_step)


def test_dot_flops_from_optimized_hlo():
  f = lambda a, b, c: (jnp.tanh(a @ b), jnp.einsum("bqd,bkd->bqk", c, c))
  a, b, c = jnp.ones((8, 16)), jnp.ones((16, 4)), jnp.ones((3, 5, 7))
  text = jax.jit(f).lower(a, b, c).compile().as_text()
  comps, insts, shapes = profile_step.parse_hlo(text)
  entry = re.search(r"ENTRY %(\S+)", text).group(1)  # the ops a trace shows
  total = sum(profile_step.op_flops(name, comps, insts, shapes)
              for name, (comp, _) in insts.items() if comp == entry)
  assert total == 2 * 8 * 16 * 4 + 2 * 3 * 5 * 5 * 7


def test_grouping_folds_layers_and_splits_parts():
  src = "jit(train_step)/transpose(jvp(Transformer.encode))/encoder/layers_3/mlp/wo/dot_general"
  assert profile_step.fold(src) == "transpose(jvp(Transformer.encode))/encoder/L/mlp/wo/dot_general"
  assert profile_step.coarse(src) == "encoder backward MLP"
  assert profile_step.coarse("jit(train_step)/jvp(Transformer.decode)/decoder/layers_0/"
                             "encoder_decoder_attention/bqhd,bkhd->bhqk/dot_general") == (
                                 "decoder forward attention core")
  assert profile_step.coarse("jit(train_step)/jvp(_target_log_softmax)/reduce_max") == (
      "logits / loss / embeddings")
  assert profile_step.coarse("(no source: optimizer / runtime)") == "optimizer / other"
  assert profile_step.op_family("wrapped_reduce-window.90") == "wrapped_reduce-window"
  assert profile_step.op_family("copy.1.2") == "copy"
  assert profile_step.op_family("fusion") == "fusion"


def test_top_ops_lists_longest_non_matmul_ops():
  f = lambda a, b: jnp.tanh(a @ b) * 2.0
  a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
  text = jax.jit(f).lower(a, b).compile().as_text()
  comps, insts, shapes = profile_step.parse_hlo(text)
  entry = re.search(r"ENTRY %(\S+)", text).group(1)
  ops = [n for n, (comp, _) in insts.items() if comp == entry
         and not re.search(r" = \S+ (parameter|constant|tuple|get-tuple-element)\(", insts[n][1])]
  dots = [n for n in ops if profile_step.op_flops(n, comps, insts, shapes)]
  others = [n for n in ops if n not in dots]
  assert dots and others
  # A fake trace: every op twice, the matmul the longest; it must not be listed.
  events = [{"ph": "X", "name": n, "dur": 9000.0 if n in dots else 1000.0 * (i + 1)}
            for i, n in enumerate(ops) for _ in range(2)]
  table = profile_step.top_ops(events, comps, insts, shapes, 10).split("\n")
  assert len(table) == 1 + len(others)
  assert not any(d + ":" in line for d in dots for line in table)
  longest = max(others, key=lambda n: ops.index(n))
  ms, calls = table[1].split()[:2]
  assert table[1].split()[2] == longest + ":"
  assert float(ms) == 2 * (ops.index(longest) + 1) and int(calls) == 2
  assert profile_step.op_kind(longest, insts).split()[0] in text.split(f"%{longest} = ")[1]


def test_summarize_groups_ops_without_source_by_family():
  f = lambda a, b: jnp.tanh(a @ b) * 2.0
  a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
  text = jax.jit(f).lower(a, b).compile().as_text()
  comps, insts, shapes = profile_step.parse_hlo(text)
  names = list(insts)
  # Strip the source of one op, as XLA's own rewrites have none.
  victim = next(n for n in names if 'op_name="' in insts[n][1]
                and not profile_step.op_flops(n, comps, insts, shapes))
  comp, line = insts[victim]
  insts[victim] = (comp, re.sub(r'op_name="[^"]*"', "", line))
  events = [{"ph": "X", "name": n, "dur": 1000.0} for n in names]
  out = profile_step.summarize(events, comps, insts, shapes, 50)
  assert out.startswith(f"ops: {len(names)}, summed op time {len(names)} ms")
  assert f"(no source: optimizer / runtime) {profile_step.op_family(victim)}" in out
  assert "DOT " in out


def test_fusion_without_metadata_takes_the_source_inside_it():
  f = lambda a, b: jnp.tanh(a @ b) * 2.0
  a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
  comps, insts, _ = profile_step.parse_hlo(jax.jit(f).lower(a, b).compile().as_text())
  fusion = next(n for n, (_, line) in insts.items()
                if " fusion(" in line and "tanh" in "\n".join(
                    comps[re.search(r"calls=%([\w.\-]+)", line).group(1)]))
  comp, line = insts[fusion]
  called = re.search(r"calls=%([\w.\-]+)", line).group(1)
  insts[fusion] = (comp, re.sub(r'op_name="[^"]*"', "", line))
  inner = [m.group(1) for l in comps[called] for m in [re.search(r'op_name="([^"]*)"', l)] if m]
  assert inner
  assert profile_step.op_source(fusion, insts, comps) == inner[-1]
  assert profile_step.op_source(fusion, insts) == profile_step.NO_SOURCE  # no computations
  # Nothing inside either: the source of the operand that feeds it (here the matmul).
  comps[called] = [re.sub(r'op_name="[^"]*"', "", l) for l in comps[called]]
  operand = re.search(r" fusion\(%([\w.\-]+)", insts[fusion][1]).group(1)
  assert profile_step.op_source(fusion, insts, comps) == (
      profile_step.op_source(operand, insts, comps, via_operand=False) + "/"
      + profile_step.op_family(fusion))
  assert "dot_general/" in profile_step.op_source(fusion, insts, comps)
  assert profile_step.op_source(fusion, insts, comps, via_operand=False) == profile_step.NO_SOURCE


def test_length_squared_split_separates_the_attention_logits_work():
  li, heads, d = 24, 3, 8

  def attention(x, w):  # projections [Li, H, d] (linear in Li), then softmax(q kᵀ) v per head
    q = jnp.einsum("ld,dhk->hlk", x, w)
    p = jax.nn.softmax(jnp.einsum("hqk,hlk->hql", q, q), axis=-1)
    # x itself is [Li, Li]-shaped (D = Li) but no attention array: it must not count
    return jnp.einsum("hql,hlk->hqk", p, q), x * 2.0

  x, w = jnp.ones((li, li)), jnp.ones((li, heads, d))
  text = jax.jit(attention).lower(x, w).compile().as_text()
  comps, insts, shapes = profile_step.parse_hlo(text)
  entry = re.search(r"ENTRY %(\S+)", text).group(1)
  ops = [n for n, (comp, line) in insts.items() if comp == entry and not re.search(
      r" = \S+ (parameter|constant|tuple|get-tuple-element|bitcast)\(", line)]
  events = [{"ph": "X", "name": n, "dur": 1000.0} for n in ops]  # 1 ms each
  acc = profile_step.length_squared_times(events, comps, insts, shapes, li, heads)
  flops = [profile_step.op_flops(n, comps, insts, shapes) for n in ops]
  # q kᵀ ([H, Li, Li] result) and p v ([H, Li, Li] operand): 2·H·Li·Li·d each.
  assert acc[(True, True)] == [2000.0, 2 * (2 * heads * li * li * d)]
  assert acc[(False, True)] == [1000.0, 2 * li * li * heads * d]
  assert acc[(True, False)][0] >= 1000.0  # the softmax (one fusion or several)
  assert acc[(False, False)][0] >= 1000.0  # x · 2 over the [Li, D = Li] input
  assert sum(us for us, _ in acc.values()) == 1000.0 * len(ops)
  assert sum(f for _, f in acc.values()) == sum(flops)
  table = profile_step.length_squared_split(events, comps, insts, shapes, li, heads)
  assert "Li² matmuls" in table and f"(Li {li})" in table


def test_an_op_with_a_tuple_result_counts_on_its_shapes():
  """The fused softmax kernels' backward returns (dlogits [B, H, Li, Li], ddiag [H, 2Li − 1])."""
  line = ('  %ffi_call.40 = (f32[4,6,512,512]{3,2,1,0}, f32[6,1023]{1,0}) custom-call(%a.1, '
          '%b, %c), custom_call_target="slic_fused_softmax_bwd_f32"')
  shape, operands = profile_step._operands(line)
  assert operands == ["a.1", "b", "c"]
  assert profile_step._logits_shaped(shape, 512, 6)


def test_self_and_shared_times_split_nesting_from_concurrency():
  # Thread 1: A [0, 10); C [15, 25) holding a nested branch D [17, 22); E [30, 40).
  # Thread 2: B [5, 20); F [38, 39).
  spans = [(1, 0, 10), (2, 5, 15), (1, 15, 10), (1, 17, 5), (1, 30, 10), (2, 38, 1)]
  ops = [{"tid": tid, "ts": float(t), "dur": float(d)} for tid, t, d in spans]
  own, shared = profile_step.self_and_shared_times(ops)
  # C's self time leaves out D; the nesting itself is not sharing.
  assert own == [10.0, 15.0, 5.0, 5.0, 10.0, 1.0]
  # A beside B [5, 10); B beside A, then C [15, 17), then D [17, 20); C's own [15, 17);
  # D [17, 20); E beside F [38, 39).
  assert shared == [5.0, 10.0, 2.0, 3.0, 1.0, 1.0]


def test_summarize_shows_each_groups_time_beside_another_op():
  f = lambda a, b: jnp.tanh(a @ b) * 2.0
  a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
  text = jax.jit(f).lower(a, b).compile().as_text()
  comps, insts, shapes = profile_step.parse_hlo(text)
  dot = next(n for n in insts if profile_step.op_flops(n, comps, insts, shapes))
  other = next(n for n in insts if not profile_step.op_flops(n, comps, insts, shapes)
               and 'op_name="' in insts[n][1])
  # The matmul [0, 4 ms) and another op [3, 5 ms): 1 ms of each beside the other.
  events = [{"ph": "X", "name": dot, "tid": 1, "ts": 0.0, "dur": 4000.0},
            {"ph": "X", "name": other, "tid": 2, "ts": 3000.0, "dur": 2000.0}]
  out = profile_step.summarize(events, comps, insts, shapes, 10)
  assert "summed op time 6 ms" in out and "2 ms ran beside another op" in out
  dot_row = next(r for r in out.split("\n") if r.lstrip().startswith("4.0"))
  assert dot_row.split()[:3] == ["4.0", "1.0", "1"] and "DOT " in dot_row


def test_median_call_threads_donated_state_and_constants():
  calls = []

  def fn(x, y, c):
    calls.append(c)
    return x + 1, y * 2

  median, state = profile_step._median_call_s(fn, (0, 1), 5, "c")
  assert state == (5, 32) and calls == ["c"] * 5 and median >= 0.0


def test_optimizer_only_profiles_the_update_beside_a_bandwidth_pass(capsys, tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the trace goes
  assert profile_step.main(["--size", "tiny", "--optimizer_only", "--repeats", "2",
                            "--warmup", "0", "--top", "3"]) == 0
  assert os.listdir(tmp_path) == []  # the trace's temporary directory is gone
  out = capsys.readouterr().out
  from slic_jax import network
  import benchmark
  cfg = benchmark.make_config("tiny", "float32")
  params = jax.eval_shape(lambda: network.Transformer(cfg).init(
      jax.random.PRNGKey(0), *[jnp.ones((1, 4), jnp.int32)] * 3))["params"]
  leaves = jax.tree.leaves(params)
  n = sum(x.size for x in leaves)
  assert f"optimizer update alone ({len(leaves)} parameter arrays, {n / 1e6:.1f}M float32)" in out
  ratio = float(re.search(r"ratio ([0-9.]+)", out).group(1))
  assert ratio > 0.0
  assert "(no source: optimizer / runtime)" in out or "jit(update)" in out


def _gpu_like_trace(fusion: str):
  """A trace shaped as jax 0.11's GPU traces: a '/device:GPU:0' process whose 'Stream #N'
  line holds the kernels (a fusion's kernel named with '_' for '.', launched from a CUDA
  graph: hlo_op 'command_buffer_1'), library kernels, and host runtime events."""
  kernel = re.sub(r"\.(\d+)$", r"_\1", fusion)
  meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "process_name", "pid": 701, "args": {"name": "/host:CPU"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 14,
           "args": {"name": "Stream #14(Memset,Compute)"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 99,
           "args": {"name": "XLA Ops"}}]
  graph = {"hlo_op": "command_buffer_1", "hlo_module": "jit_f"}
  dev = [{"ph": "X", "pid": 1, "tid": 14, "ts": 10000.0, "dur": 3000.0, "name": kernel,
          "args": graph},
         {"ph": "X", "pid": 1, "tid": 14, "ts": 13000.0, "dur": 2000.0,
          "name": "nvjet_sm90_tss_128x128_64x6_1x2_h_bz_NTT", "args": graph},
         {"ph": "X", "pid": 1, "tid": 14, "ts": 14000.0, "dur": 1000.0,  # overlaps the GEMM
          "name": "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7",
          "args": graph},
         {"ph": "X", "pid": 1, "tid": 14, "ts": 16000.0, "dur": 500.0,
          "name": "Memset (Device)", "args": {}},
         # A derived line of the same ops: not kernels, must not count twice.
         {"ph": "X", "pid": 1, "tid": 99, "ts": 10000.0, "dur": 3000.0, "name": fusion}]
  host = [{"ph": "X", "pid": 701, "tid": 5, "ts": 0.0, "dur": 20000.0,
           "name": "$profile_step.py:394 one_step"},
          {"ph": "X", "pid": 701, "tid": 5, "ts": 500.0, "dur": 9000.0,
           "name": "command_buffer::update"},
          {"ph": "X", "pid": 701, "tid": 5, "ts": 9600.0, "dur": 300.0, "name": "short"}]
  return meta + dev + host


def test_gpu_trace_kernels_join_hlo_by_name_and_libraries_by_kind():
  f = lambda a: jnp.tanh(a) * 2.0 + 1.0
  text = jax.jit(f).lower(jnp.ones((8, 16))).compile().as_text()
  comps, insts, shapes = profile_step.parse_hlo(text)
  # An instruction named 'x.N' (a kernel 'x_N'); the HLO's own names, renamed if it has none.
  fusion = next((n for n in insts if re.fullmatch(r".*fusion.*\.\d+", n)), None)
  if fusion is None:
    old = next(n for n in insts if "fusion" in n)
    text = re.sub(rf"%{re.escape(old)}\b(?!\.)", f"%{old}.7", text)
    comps, insts, shapes = profile_step.parse_hlo(text)
    fusion = f"{old}.7"
  events = _gpu_like_trace(fusion)
  assert profile_step.device_stream_lines(events) == {(1, 14)}
  mapped, library = profile_step.split_device_kernels(events, insts)
  assert [e["name"] for e in mapped] == [fusion]
  assert [profile_step.library_kind(e["name"]) for e in library] == [
      "cuBLAS / nvjet / CUTLASS GEMM", "cuDNN attention", "memset / memcpy"]
  # Kernels [10, 15) and [16, 16.5) ms: 5.5 ms busy over a 6.5 ms span; the step 20 ms.
  assert profile_step.busy_us(mapped + library) == 5500.0
  assert profile_step.step_wall_us(events) == 20000.0
  out = profile_step.device_summary(events, mapped, library, 20000.0, model_flops=11e9)
  assert "4 kernels (1 joined to HLO ops, 3 library kernels), busy 5.50 ms over a 6.50 ms span" in out
  assert "the device idle 14.50 ms of it (72%)" in out
  assert "model FLOPs over the busy time: 2 TFLOP/s" in out
  assert re.search(r"\n\s+2\.00\s+1  cuBLAS / nvjet / CUTLASS GEMM", out)
  assert re.search(r"\n\s+9\.00\s+1  command_buffer::update", out)
  assert "one_step" not in out and "short" not in out  # Python frames, < 1 ms
  # A CPU trace has no device lines: nothing is taken as a kernel.
  cpu = [e for e in events if e.get("pid") != 1]
  assert profile_step.split_device_kernels(cpu, insts) == ([], [])


def test_from_trace_reports_the_kept_h200_trace(capsys):
  """The session 25 H200 trace and HLO kept in benchmarks/ (bf16 + cuDNN step, 32 pairs):
  the figures of benchmarks/NOTES.md's session 25 finding come back from them."""
  raw = os.path.join(os.path.dirname(_TOOLS), "benchmarks", "gpu_h200_session25", "raw", "call1")
  assert profile_step.main(["--from_trace", os.path.join(raw, "trace"),
                            "--hlo", os.path.join(raw, "hlo.txt.gz"), "--top", "3"]) == 0
  out = capsys.readouterr().out
  assert "traced step 50.47 ms wall" in out
  assert "2546 kernels (2310 joined to HLO ops, 236 library kernels), busy 19.09 ms" in out
  assert re.search(r"\n\s+4\.35\s+112  cuDNN attention", out)
  assert re.search(r"\n\s+19\.30\s+1  command_buffer::update", out)
  # The optimizer's kernels: the largest part of the coarse split (3.4 of 13 ms; 3.5 in
  # session 25's note, before kernels without a source took their operand's).
  coarse = out.split("coarse split:")[1].split("\n")
  assert coarse[2].split() == ["3.4", "0.0", "optimizer", "/", "other"]
  assert "summed op time 13 ms" in out


def test_executed_dots_count_each_traced_run_of_the_ops_holding_them():
  """The dots of the ops a trace shows, with their shapes and dimension numbers, counted
  per traced run; an op the trace does not show (a branch not taken) counts nothing."""
  f = lambda a, b, c: (jnp.tanh(a @ b), jnp.einsum("bqd,bkd->bqk", c, c))
  a, b, c = jnp.ones((8, 16)), jnp.ones((16, 4)), jnp.ones((3, 5, 7))
  text = jax.jit(f).lower(a, b, c).compile().as_text()
  comps, insts, shapes = profile_step.parse_hlo(text)
  entry = re.search(r"ENTRY %(\S+)", text).group(1)
  with_dots = [n for n, (comp, _) in insts.items()
               if comp == entry and profile_step.op_flops(n, comps, insts, shapes)]
  assert len(with_dots) == 2
  events = [{"ph": "X", "name": n, "dur": 5.0} for n in with_dots + with_dots[:1]]
  dots, source = profile_step.executed_dots(events, comps, insts, shapes)
  by_flops = {d.flops: (d, n) for d, n in dots.items()}
  assert sorted(by_flops) == [2 * 8 * 16 * 4, 2 * 3 * 5 * 5 * 7]
  mm, batched = by_flops[2 * 8 * 16 * 4][0], by_flops[2 * 3 * 5 * 5 * 7][0]
  assert sum(dots.values()) == 3
  assert profile_step._dims(mm.out) == [8, 4] and mm.lhs_contracting == (1,)
  assert batched.lhs_batch == (0,) and batched.rhs_batch == (0,)
  assert profile_step._dims(batched.out) == [3, 5, 5]
  assert set(source) == set(dots)
  only_second, _ = profile_step.executed_dots(events[1:2], comps, insts, shapes)
  assert only_second == {d: 1 for d, n in dots.items() if n == 1}


def test_dot_callable_computes_the_dot_it_stands_for():
  dot = profile_step.Dot("f32[2,3,4]{2,1,0}", "f32[2,5,4]{2,1,0}", "f32[2,3,5]{2,1,0}",
                         lhs_contracting=(2,), rhs_contracting=(2,), lhs_batch=(0,), rhs_batch=(0,))
  assert dot.flops == 2 * 2 * 3 * 5 * 4
  compiled, (a, b) = profile_step.dot_callable(dot)
  out = compiled(a, b)
  assert out.shape == (2, 3, 5) and out.dtype == jnp.float32
  assert jnp.allclose(out, jnp.einsum("bqd,bkd->bqk", a, b), atol=1e-5)
  half = profile_step.Dot("bf16[8,16]{1,0}", "bf16[16,4]{1,0}", "f32[8,4]{1,0}", (1,), (0,))
  compiled, (a, b) = profile_step.dot_callable(half)
  assert a.dtype == jnp.bfloat16 and compiled(a, b).dtype == jnp.float32


def test_dots_alone_weighs_each_dot_by_its_calls_round_by_round():
  """Each round: the step's time, then Σ calls × (each dot's time alone), and the square
  peak; the report gives the dots' share of the step per round and their median."""
  big = profile_step.Dot("f32[64,64]{1,0}", "f32[64,64]{1,0}", "f32[64,64]{1,0}", (1,), (0,))
  small = profile_step.Dot("f32[64,64]{1,0}", "f32[64,1]{1,0}", "f32[64,1]{1,0}", (1,), (0,))
  dots = {big: 3, small: 5}
  steps = iter([0.5, 0.25])
  res = profile_step.dots_alone(dots, lambda: next(steps), rounds=2, peak_n=64)
  assert [r["step_s"] for r in res["rounds"]] == [0.5, 0.25]
  for k, r in enumerate(res["rounds"]):
    per = {d: res["per_dot"][d][k] for d in dots}
    assert all(t >= 0 for t in per.values())
    assert r["dots_s"] == pytest.approx(3 * per[big] + 5 * per[small])
    assert r["peak_flops_per_s"] > 0 and r["dispatch_s"] > 0
  text = profile_step.dots_alone_report(dots, {big: "encoder/L/mlp", small: ""}, res)
  assert "2 distinct dots, 8 calls" in text
  share = [f"{r['dots_s'] / r['step_s']:.0%}" for r in res["rounds"]]
  lines = text.splitlines()
  assert lines[3].split()[:2] == ["1", "0.500"] and share[0] in lines[3]
  assert lines[4].split()[:2] == ["2", "0.250"] and share[1] in lines[4]
  assert lines[5].startswith("median")
  assert "f32[64,64] · f32[64,64] -> f32[64,64]; encoder/L/mlp" in text


def test_main_times_the_traced_steps_dots_beside_further_steps(capsys):
  """--dots_alone after a live profile: the step keeps running on its donated state, and
  the report counts the dots the traced step ran (FLOPs as the profile's matmul total)."""
  assert profile_step.main(["--size", "tiny", "--batch", "2", "--li", "64", "--lt", "16",
                            "--reg_target", "chosen", "--top", "2", "--warmup", "1",
                            "--dots_alone", "2"]) == 0
  out = capsys.readouterr().out
  total = re.search(r"matmul GFLOP ([0-9.]+)", out).group(1)
  head = re.search(r"the step's dots alone: (\d+) distinct dots, (\d+) calls, ([0-9.]+) GFLOP", out)
  assert float(total) > 0
  assert head and int(head.group(1)) <= int(head.group(2)) and head.group(3) == total
  rounds = [l.split() for l in out.splitlines() if re.match(r"\s+[12] ", l)]
  assert len(rounds) == 2 and all(float(r[1]) > 0 and float(r[2]) > 0 for r in rounds)
  assert re.search(r"^median ", out, re.M)
