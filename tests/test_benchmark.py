"""tools/benchmark.py: the analytic FLOP count (no timing assertions)."""
import importlib.util
import os
import sys

import jax
import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "tools", "benchmark.py")
_spec = importlib.util.spec_from_file_location("slic_jax_tools_benchmark", _PATH)
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)


def test_flops_hand_derived():
  # D=4, H=2, K=3 (A=6), F=5, 1+1 layers, V=7, B=1 prompt, Li=2, Lt=3, 3 rows, gated (G=2).
  f = benchmark.model_flops(emb_dim=4, num_heads=2, head_dim=3, mlp_dim=5,
                            num_encoder_layers=1, num_decoder_layers=1, vocab_size=7,
                            batch=1, li=2, lt=3, n_targets=3)
  # encoder, per token: qkvo 2*4*4*6=192, mlp 2*3*4*5=120, attention 2*2*2*6=48 -> 360; 2 tokens.
  assert f["encoder"] == 2 * 360
  # decoder, per sequence: self-attn 3*(192 + 2*2*3*6=72)=792; cross q,o 3*2*2*4*6=288;
  # cross scores 3*2*2*2*6=144; mlp 3*120=360 -> 1584; 3 sequences; plus the cross k,v
  # projections 2*2*2*4*6=192 once for the prompt (grouped cross-attention).
  assert f["decoder"] == 3 * 1584 + 192
  assert f["cross_kv"] == 192
  assert f["logits"] == 3 * 3 * 2 * 4 * 7
  assert f["forward"] == 720 + 4944 + 504
  per_row = benchmark.model_flops(emb_dim=4, num_heads=2, head_dim=3, mlp_dim=5,
                                  num_encoder_layers=1, num_decoder_layers=1, vocab_size=7,
                                  batch=1, li=2, lt=3, n_targets=3, cross_kv_per_prompt=False)
  assert per_row["cross_kv"] == 3 * 192
  assert f["train_step"] == 3 * f["forward"]


def test_flops_peer_layout_and_scaling():
  dims = benchmark.size_dims("small")
  ours = benchmark.model_flops(**dims, batch=4, li=512, lt=64)
  peer = benchmark.peer_flops("small", 4, 512, 64)
  # TRL: encoder twice per pair, 2 decoded rows instead of 3.
  assert peer["encoder"] == pytest.approx(2 * ours["encoder"])
  assert peer["decoder"] - peer["cross_kv"] == pytest.approx(
      (ours["decoder"] - ours["cross_kv"]) * 2 / 3)
  assert peer["cross_kv"] == pytest.approx(2 * ours["cross_kv"])  # per row vs per prompt
  assert peer["logits"] == pytest.approx(ours["logits"] * 2 / 3)
  # Linear in batch.
  ours8 = benchmark.model_flops(**dims, batch=8, li=512, lt=64)
  assert ours8["train_step"] == pytest.approx(2 * ours["train_step"])
  # T5 1.1 small's parameter matmuls: about 2 * params * tokens (sanity, excluding attention).


def test_flops_match_xla_cost_analysis():
  cfg = benchmark.make_config("tiny")
  b, li, lt = 2, 64, 16
  batch = benchmark.random_pair_batch(b, li, lt, cfg.vocab_size, seed=0)
  shapes = {k: v.shape for k, v in batch.items()}
  step, init_state = benchmark.build_step(cfg, shapes)
  state = jax.jit(init_state)(jax.random.PRNGKey(0))
  compiled = step.lower(state, batch).compile()
  xla = benchmark.xla_cost_flops(compiled)
  if xla is None:
    pytest.skip("this backend has no cost_analysis flops")
  ours = benchmark.config_flops(cfg, b, li, lt)["train_step"]
  # XLA also counts elementwise work (softmax, norms, GELU, optimizer), so it is a bit higher.
  assert 1.0 <= xla / ours < 1.15, (xla, ours)
  state, metrics = compiled(state, batch)
  assert np.isfinite(float(metrics["loss"].compute()))


def test_two_row_step_flops_match_xla_and_are_lower():
  """reg_target='chosen' (TRL CPO's loss) decodes 2 rows: the FLOP count drops to match."""
  cfg = benchmark.make_config("tiny")
  b, li, lt = 2, 64, 16
  batch = benchmark.random_pair_batch(b, li, lt, cfg.vocab_size, seed=0)
  shapes = {k: v.shape for k, v in batch.items()}
  step, init_state = benchmark.build_step(cfg, shapes, reg_target="chosen")
  state = jax.jit(init_state)(jax.random.PRNGKey(0))
  xla = benchmark.xla_cost_flops(step.lower(state, batch).compile())
  if xla is None:
    pytest.skip("this backend has no cost_analysis flops")
  two = benchmark.config_flops(cfg, b, li, lt, n_targets=2)["train_step"]
  three = benchmark.config_flops(cfg, b, li, lt, n_targets=3)["train_step"]
  assert two < three
  assert 1.0 <= xla / two < 1.15, (xla, two)


def test_random_batch_follows_the_model():
  pairs = benchmark.random_batch("slic_hf", 2, 16, 8, 64)
  assert pairs["decoder_target_tokens"].shape == (2, 3, 8)
  sft = benchmark.random_batch("sft", 2, 16, 8, 64, pack=2)
  assert sft["decoder_target_tokens"].shape == (2, 8) and "encoder_segment_ids" in sft
  np.testing.assert_array_equal(sft["encoder_input_tokens"],
                                benchmark.random_sft_batch(2, 16, 8, 64, pack=2)[
                                    "encoder_input_tokens"])
  with pytest.raises(ValueError, match="pack=2 needs model 'sft'"):
    benchmark.random_batch("slic_hf", 2, 16, 8, 64, pack=2)


def test_random_sft_batch_packs_examples_as_seqio_does():
  b = benchmark.random_sft_batch(3, 40, 12, 512, seed=1, pack=3)
  for side, length in (("encoder", 40), ("decoder", 12)):
    ids, pos = b[f"{side}_segment_ids"], b[f"{side}_positions"]
    assert ids.shape == pos.shape == (3, length)
    for row_ids, row_pos in zip(ids, pos):
      assert list(np.unique(row_ids)) == [1, 2, 3]  # every example present, no padding
      assert np.all(np.diff(row_ids) >= 0)
      starts = np.flatnonzero(np.diff(row_ids, prepend=0))
      assert np.all(row_pos[starts] == 0)
      assert np.all(np.diff(row_pos)[np.diff(row_ids) == 0] == 1)
  tgt, dec_in, pos = b["decoder_target_tokens"], b["decoder_input_tokens"], b["decoder_positions"]
  assert np.all(dec_in[pos == 0] == 0)  # each example's decoder starts from BOS
  inner = pos[:, 1:] > 0
  assert np.array_equal(dec_in[:, 1:][inner], tgt[:, :-1][inner])  # shifted within examples
  ends = np.append(np.diff(b["decoder_segment_ids"]) != 0, np.ones((3, 1), bool), axis=1)
  assert np.all(tgt[ends] == 1) and np.all(tgt[~ends] >= 2)  # EOS ends each example only
  one = benchmark.random_sft_batch(2, 8, 4, 512, pack=1)
  assert sorted(one) == ["decoder_input_tokens", "decoder_loss_weights",
                         "decoder_target_tokens", "encoder_input_tokens"]
  assert np.array_equal(one["decoder_input_tokens"][:, 1:], one["decoder_target_tokens"][:, :-1])
  with pytest.raises(ValueError, match=r"pack must be 1\.\.min\(li, lt\) = 4 .*got 5"):
    benchmark.random_sft_batch(2, 8, 4, 512, pack=5)


def test_sft_step_flops_match_xla_on_a_packed_batch():
  """build_step(model='sft'): one decoded row per encoded row, packed or not."""
  cfg = benchmark.make_config("tiny")
  b, li, lt = 2, 64, 16
  batch = benchmark.random_sft_batch(b, li, lt, cfg.vocab_size, seed=0, pack=2)
  step, init_state = benchmark.build_step(cfg, {k: v.shape for k, v in batch.items()},
                                          model="sft")
  state = jax.jit(init_state)(jax.random.PRNGKey(0))
  compiled = step.lower(state, batch).compile()
  xla = benchmark.xla_cost_flops(compiled)
  if xla is None:
    pytest.skip("this backend has no cost_analysis flops")
  ours = benchmark.config_flops(cfg, b, li, lt, n_targets=1)["train_step"]
  assert 1.0 <= xla / ours < 1.15, (xla, ours)
  _, metrics = compiled(state, batch)
  assert float(metrics["num_examples"].compute()) == 2 * b  # 2 examples in each row
  with pytest.raises(ValueError, match="'slic_hf' or 'sft'"):
    benchmark.build_step(cfg, {k: v.shape for k, v in batch.items()}, model="dpo")


def test_step_process_does_not_import_tensorflow():
  """The benchmark's step (and anything using slic_jax.update_step) runs without SeqIO/TF."""
  import subprocess
  import sys
  code = ("import sys; sys.path.insert(0, 'tools'); import benchmark; "
          "cfg = benchmark.make_config('tiny'); "
          "b = benchmark.random_pair_batch(1, 8, 4, cfg.vocab_size); "
          "benchmark.build_step(cfg, {k: v.shape for k, v in b.items()}); "
          "print('tensorflow' in sys.modules, 'seqio' in sys.modules)")
  repo = os.path.dirname(os.path.dirname(_PATH))
  out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split()[-2:] == ["False", "False"]


def test_markdown_report_has_all_rows():
  run = lambda s, fl, **kw: {"step_s_median": s, "step_s_min": s * 0.9, "pairs_per_s": 4 / s,
                             "model_flops_per_step": fl, "achieved_model_flops_per_s": fl / s,
                             "fraction_of_jax_f32_matmul_peak": fl / s / 3e11,
                             "peak_rss_mb": 1000.0, "compile_s": 1.0, **kw}
  res = {"command": "x", "date": "d", "machine": {}, "versions": {},
         "settings": {"batch_pairs": 4, "li": 512, "lt": 64, "steps": 5, "warmup": 2},
         "matmul": {"jax_numpy": {"jax_float32_flops_per_s": 3e11,
                                  "jax_bf16f32acc_flops_per_s": 1.2e12},
                    "torch": {"torch_bfloat16_flops_per_s": 1.5e12}},
         "comparison": [{"size": "small", "slic_jax": run(4.0, 5e11, speedup_pairs_per_s=1.5,
                                                          speedup_best=1.5),
                         "slic_jax_2row": run(3.0, 4e11, speedup_pairs_per_s=2.0,
                                              speedup_best=2.0),
                         "slic_jax_2row_mb4": run(3.1, 4e11, speedup_pairs_per_s=1.9,
                                                  speedup_best=1.9),
                         "slic_jax_bf16": run(2.2, 5e11, dtype="bfloat16",
                                              fraction_of_jax_bf16_matmul_peak=0.2),
                         "slic_jax_2row_bf16": run(2.0, 4e11, dtype="bfloat16",
                                                   speedup_pairs_per_s=3.0, speedup_best=3.0,
                                                   speedup_vs_trl_bf16=1.25,
                                                   speedup_vs_trl_bf16_nockpt=1.1),
                         "slic_jax_2row_bf16_mb4": run(2.1, 4e11, dtype="bfloat16"),
                         "slic_jax_2row_bf16_remat": run(2.4, 4e11, dtype="bfloat16"),
                         "slic_jax_2row_remat": run(3.9, 4e11),
                         "slic_jax_2row_glibc": run(3.3, 4e11, minor_faults_per_step=412000,
                                                    kernel_s_per_step=0.9),
                         "slic_jax_2row_bf16_glibc": run(2.3, 4e11, dtype="bfloat16",
                                                         minor_faults_per_step=201834,
                                                         kernel_s_per_step=0.697),
                         "slic_jax_2row_bf16_cudnn": run(1.9, 4e11, dtype="bfloat16"),
                         "slic_jax_2row_bf16_remat_cudnn": run(2.3, 4e11, dtype="bfloat16"),
                         "slic_jax_2row_bf16_fused_softmax": run(1.8, 4e11, dtype="bfloat16"),
                         "slic_jax_2row_fused_softmax": run(3.1, 4e11),
                         "slic_jax_2row_bf16_mixed_dots": run(2.6, 4e11, dtype="bfloat16"),
                         "slic_jax_2row_bf16_widen_all": run(2.5, 4e11, dtype="bfloat16"),
                         "slic_jax_2row_cpu_kernels": run(2.9, 4e11),
                         "slic_jax_2row_bf16_cpu_kernels": run(1.9, 4e11, dtype="bfloat16"),
                         "trl": run(6.0, 7.5e11),
                         "trl_bf16": run(2.5, 7.5e11),
                         "trl_reuse": run(5.5, 7.5e11, minor_faults_per_step=0,
                                          kernel_s_per_step=0.01),
                         "trl_nockpt": run(4.5, 7.5e11, num_params=76961152,
                                           lm_head="separate"),
                         "trl_bf16_nockpt": run(2.2, 7.5e11, dtype="bfloat16")}],
         "sweep": [], "levers": [], "t5x": {"status": "not run", "note": "n"}}
  md = benchmark.to_markdown(res)
  for label in benchmark.LABELS.values():
    assert label in md
  assert "2.00× / 2.00×" in md and "1.50× / 1.50×" in md
  assert "3.00× / 3.00×" in md and "| 17% / 19% | jax bf16→f32 |" in md
  assert "against TRL with bf16 autocast: slic_jax bf16 (2 rows, as TRL) 1.25×" in md
  assert ("against TRL with bf16 autocast, no gradient checkpointing: slic_jax bf16 (2 rows, "
          "as TRL) 1.10×") in md
  # bf16 peers against torch's bf16 matmul peak (0.75 TFLOP / 2.2 s of 1.5 TFLOP/s: 23%)
  assert "| 23% / 25% | torch bf16 |" in md
  # page faults and kernel time per step, where the worker measured them
  assert "| 201834 | 0.70 |" in md and "| 0 | 0.01 |" in md and "| – | – |" in md
  assert "- parameters: small TRL 77.0M, lm_head separate" in md


def test_sweep_runs_the_lengths_in_turn_and_shows_each_lengths_fastest(tmp_path, monkeypatch):
  """--repeats R: the sweep's processes run 128 256 256 128 128 256 (the order reversed
  every other round), each length's row is its
  fastest run (all runs kept), and the table gives each length's cost per FLOP against
  the cheapest length's."""
  calls, times = [], {128: [2.0, 1.0, 1.5], 256: [2.4, 3.0, 2.8]}

  def fake_run_json(cmd, timeout, env=None):
    if cmd[cmd.index("--_worker") + 1] == "matmul":
      return {"jax_float32_flops_per_s": 1e11}
    li = int(cmd[cmd.index("--li") + 1])
    calls.append(li)
    s = times[li][sum(1 for c in calls if c == li) - 1]
    return {"step_s_median": s, "step_s_min": s * 0.9, "pairs_per_s": 4 / s,
            "model_flops_per_step": li * 1e9, "achieved_model_flops_per_s": li * 1e9 / s,
            "peak_rss_mb": 100.0, "dtype": "float32"}

  monkeypatch.setattr(benchmark, "_run_json", fake_run_json)
  monkeypatch.setattr(benchmark, "peer_cmd", lambda *a, **k: None)
  args = benchmark.parse_args(["--sizes", "", "--sweep", "128,256", "--repeats", "3",
                               "--out_dir", str(tmp_path)])
  res = benchmark.orchestrate(args)
  assert calls == [128, 256, 256, 128, 128, 256]
  rows = {row["li"]: row["slic_jax"] for row in res["sweep"]}
  assert rows[128]["step_s_median"] == 1.0 and rows[256]["step_s_median"] == 2.4
  assert [r["step_s_median"] for r in rows[256]["runs"]] == [2.4, 3.0, 2.8]
  md = (tmp_path / "results.md").read_text()
  assert "each length the fastest of 3 runs in turn" in md
  # s per model TFLOP: 128: 1.0 / 0.128 = 7.81; 256: 2.4 / 0.256 = 9.38, +20% on 128
  assert "| mini | 128 | slic_jax | 1.00 | 0.90 | 128 | 7.81 / 7.03 | +0.0% / +0.0% |" in md
  assert "| mini | 256 | slic_jax | 2.40 | 2.16 | 256 | 9.38 / 8.44 | +20.0% / +20.0% |" in md


def test_sweep_rounds_compare_each_length_with_the_other_lengths_of_its_round(
    tmp_path, monkeypatch):
  """The per-round table: round k is every length's k-th run; each length's cost per FLOP
  against the round's cheapest; a length reused from the side by side (its runs are not
  the rounds') and a round with a failed run are left out."""
  def row(li, medians):
    return {"size": "small", "li": li, "slic_jax": {
        "model_flops_per_step": li * 1e9, "runs": [{"step_s_median": m} for m in medians]}}

  res = {"settings": {"li": 512}, "comparison": [{"size": "small", "slic_jax": {}}], "sweep": [
      row(256, [1.0, 1.2, 1.0, 2.0]),
      row(512, [9.0, 9.0, 9.0, 9.0]),       # the side by side's row: not in the rounds
      row(1024, [4.4, 4.2, None, 8.8])]}    # round 3 failed at 1024
  rel = benchmark.sweep_rounds(res)[("small", "slic_jax")]
  assert sorted(rel) == [256, 1024]
  # s per GFLOP: 256: 1/256, 1.2/256, 2/256; 1024: 4.4/1024, 4.2/1024, 8.8/1024
  assert rel[256][2] is None and rel[1024][2] is None
  assert [rel[256][k] for k in (0, 1, 3)] == pytest.approx([0.0, 1.2 / 1.05 - 1, 0.0])
  assert [rel[1024][k] for k in (0, 1, 3)] == pytest.approx([0.1, 0.0, 0.1])
  # The side by side's bf16 row is not the float32 sweep's: 512 ran in the rounds, the
  # dearest length in each.
  res["comparison"] = [{"size": "small", "slic_jax_bf16": {}}]
  rel = benchmark.sweep_rounds(res)[("small", "slic_jax")]
  assert [rel[512][k] for k in (0, 1, 3)] == pytest.approx(
      [9.0 / 2 - 1, 9.0 / 2.1 - 1, 9.0 / 4 - 1])
  for r in res["sweep"]:  # one round only (repeats 1): no table
    r["slic_jax"]["runs"] = r["slic_jax"]["runs"][:1]
  assert benchmark.sweep_rounds(res) == {}

  # The report of a sweep-only run: the table, and no empty side-by-side section.
  times = {256: iter([1.0, 1.2, 1.0, 2.0]), 1024: iter([4.4, 4.2, None, 8.8])}

  def fake_run_json(cmd, timeout, env=None):
    if cmd[cmd.index("--_worker") + 1] == "matmul":
      return {"jax_float32_flops_per_s": 1e11}
    li = int(cmd[cmd.index("--li") + 1])
    s = next(times[li])
    if s is None:
      return {"error": "timed out"}
    return {"step_s_median": s, "step_s_min": s, "pairs_per_s": 4 / s,
            "model_flops_per_step": li * 1e9, "achieved_model_flops_per_s": li * 1e9 / s,
            "peak_rss_mb": 100.0, "dtype": "float32"}

  monkeypatch.setattr(benchmark, "_run_json", fake_run_json)
  monkeypatch.setattr(benchmark, "peer_cmd", lambda *a, **k: None)
  benchmark.orchestrate(benchmark.parse_args(
      ["--sizes", "", "--sweep", "256,1024", "--repeats", "4", "--out_dir", str(tmp_path)]))
  md = (tmp_path / "results.md").read_text()
  assert "| mini | slic_jax | 256 | +0.0% | +14.3% | – | +0.0% | +0.0% |" in md
  assert "| mini | slic_jax | 1024 | +10.0% | +0.0% | – | +10.0% | +10.0% |" in md
  assert "## Side by side" not in md


def test_matmul_peaks_are_measured_again_at_the_end_and_the_higher_one_is_used(tmp_path, monkeypatch):
  """A run that timed steps measures the matmul peaks at its start and its end; every
  "% of peak" is against the higher best of the two (a peak caught in a slow phase of the
  machine would flatter it), and the report shows both measurements."""
  peaks = iter([{"jax_float32_flops_per_s": 1e11, "jax_float32_flops_per_s_median": 0.9e11},
                {"jax_float32_flops_per_s": 2e11, "jax_float32_flops_per_s_median": 1.8e11}])

  def fake_run_json(cmd, timeout, env=None):
    if cmd[cmd.index("--_worker") + 1] == "matmul":
      return next(peaks)
    return {"step_s_median": 1.0, "step_s_min": 0.8, "pairs_per_s": 4.0,
            "model_flops_per_step": 1.5e11, "achieved_model_flops_per_s": 1.5e11,
            "peak_rss_mb": 100.0, "dtype": "float32"}

  monkeypatch.setattr(benchmark, "_run_json", fake_run_json)
  monkeypatch.setattr(benchmark, "peer_cmd", lambda *a, **k: None)
  args = benchmark.parse_args(["--sizes", "", "--sweep", "128", "--out_dir", str(tmp_path)])
  res = benchmark.orchestrate(args)
  assert res["matmul"]["jax_numpy"]["jax_float32_flops_per_s"] == 1e11
  assert res["matmul"]["end_of_run"]["jax_numpy"]["jax_float32_flops_per_s"] == 2e11
  assert res["sweep"][0]["slic_jax"]["fraction_of_jax_f32_matmul_peak"] == pytest.approx(0.75)
  md = (tmp_path / "results.md").read_text()
  assert "| jax | float32 | 100.0 | 90.0 | 200.0 | 180.0 |" in md
  # The merge takes each rate's higher value, whichever measurement it came from.
  mm, _ = benchmark.run_matmul_peaks({
      "jax_numpy": {"jax_float32_flops_per_s": 3e11, "jax_bf16f32acc_flops_per_s": 1e11},
      "end_of_run": {"jax_numpy": {"jax_float32_flops_per_s": 2e11,
                                   "jax_bf16f32acc_flops_per_s": 4e11}}})
  assert mm == {"jax_float32_flops_per_s": 3e11, "jax_bf16f32acc_flops_per_s": 4e11}


def test_parse_xla_options():
  """--xla_option KEY=VALUE items become step_compiler_options overrides ('' kept: XLA's default)."""
  assert benchmark.parse_xla_options([]) is None
  assert benchmark.parse_xla_options(
      ["xla_cpu_experimental_ynn_fusion_type=A,B", "xla_cpu_scheduler_type="]) == {
          "xla_cpu_experimental_ynn_fusion_type": "A,B", "xla_cpu_scheduler_type": ""}
  with pytest.raises(SystemExit, match="expected KEY=VALUE"):
    benchmark.parse_xla_options(["no_equals_sign"])


def test_step_worker_applies_the_glibc_settings_only_where_the_step_runs_on_the_cpu(
    monkeypatch, recorded_mallopt):
  """As slic_jax.train: on a GPU/TPU host (no CPU step) mallopt is never called, although
  jax has not started (`recorded_mallopt`), where forcing the settings would call it."""
  from slic_jax import host_memory
  monkeypatch.setattr(host_memory, "step_runs_on_cpu", lambda: False)
  assert benchmark.apply_host_malloc("reuse") is False
  assert benchmark.apply_host_malloc("reuse_arenas") is False
  assert benchmark.apply_host_malloc("default") is False
  assert recorded_mallopt == []
  monkeypatch.setattr(host_memory, "step_runs_on_cpu", lambda: True)
  assert benchmark.apply_host_malloc("reuse_arenas") is True
  assert (host_memory._M_ARENA_MAX, 1) not in recorded_mallopt
  assert (host_memory._M_MMAP_MAX, 0) in recorded_mallopt


def test_peer_command_on_a_gpu():
  """--peer_python / --peer_device / --peer_tf32 reach bench_peer_trl.py's command line."""
  args = benchmark.parse_args(["--peer_python", "/usr/bin/env", "--peer_device", "cuda",
                               "--peer_tf32", "--batch", "32"])
  cmd = benchmark.peer_cmd(args, "small", 512)
  assert cmd[0] == "/usr/bin/env" and cmd[1].endswith("tools/bench_peer_trl.py")
  assert cmd[-3:] == ["--device", "cuda", "--tf32"]
  assert cmd[cmd.index("--batch") + 1] == "32"
  mm = benchmark.peer_cmd(args, None, None, matmul_only=True)
  assert "--matmul_only" in mm and mm[-3:] == ["--device", "cuda", "--tf32"]
  cpu = benchmark.peer_cmd(benchmark.parse_args(["--peer_python", "/usr/bin/env"]), "small", 512)
  assert cpu[-2:] == ["--device", "cpu"]
  missing = benchmark.parse_args(["--peer_python", "/nonexistent/python"])
  assert benchmark.peer_cmd(missing, "small", 512) is None
  # TRL's CPOConfig default (gradient checkpointing on) unless the row asks for it off.
  assert cpu[cpu.index("--gradient_checkpointing") + 1] == "default"
  off = benchmark.peer_cmd(args, "small", 512, checkpointing="off")
  assert off[off.index("--gradient_checkpointing") + 1] == "off"
  # TRL's T5 gets its own lm_head (the same 77.0M-parameter model) unless asked as built.
  assert cpu[cpu.index("--lm_head") + 1] == "separate"
  tied = benchmark.peer_cmd(benchmark.parse_args(["--peer_python", "/usr/bin/env",
                                                  "--peer_lm_head", "as_built"]), "small", 512)
  assert tied[tied.index("--lm_head") + 1] == "as_built"


def test_markdown_report_on_a_gpu_shows_the_accelerator_and_device_memory():
  run = lambda s, **kw: {"step_s_median": s, "step_s_min": s, "pairs_per_s": 32 / s,
                         "model_flops_per_step": 1e13, "achieved_model_flops_per_s": 1e13 / s,
                         "peak_rss_mb": 3000.0, **kw}
  res = {"command": "x", "date": "d", "machine": {}, "versions": {},
         "settings": {"batch_pairs": 32, "li": 512, "lt": 64, "steps": 10, "warmup": 3},
         "matmul": {"jax_numpy": {"jax_float32_flops_per_s": 3.6e14,
                                  "jax_float32highest_flops_per_s": 5e13,
                                  "jax_bf16f32acc_flops_per_s": 6.6e14,
                                  "jax_backend": "gpu", "device_kind": "NVIDIA H200"},
                    "torch": {"torch_bfloat16_flops_per_s": 7.8e14, "device": "cuda",
                              "tf32": True}},
         "comparison": [{"size": "small",
                         "slic_jax_2row": run(0.05, peak_device_memory_mb=4321.0),
                         "trl": run(0.1, peak_device_memory_mb=8765.4)}],
         "sweep": [], "levers": [], "t5x": {"status": "not run", "note": "n"}}
  md = benchmark.to_markdown(res)
  assert ("- accelerator: NVIDIA H200 (jax backend 'gpu'; slic_jax runs there, TRL on "
          "'cuda', TF32 allowed)") in md
  assert "| jax | float32, precision HIGHEST | 50000.0 |" in md
  assert "| 3000 | 4321 |" in md and "| 3000 | 8765 |" in md
  # 1e13 FLOP in 0.05 s = 2e14 FLOP/s: 56% of jax's (TF32) float32 peak
  assert "| 56% / 56% | jax f32 |" in md


def _fake_step_result(cmd):
  """What a step worker returns, for orchestrate() tests that fake the workers."""
  return {"step_s_median": 3.0, "step_s_min": 2.9, "pairs_per_s": 4 / 3.0,
          "model_flops_per_step": 4.38e11, "peak_rss_mb": 100.0,
          "dtype": cmd[cmd.index("--dtype") + 1]}


def test_cudnn_rows_ask_their_workers_for_cudnn_attention_and_only_they_do():
  args = benchmark.parse_args(["--batch", "32"])
  for key in benchmark.SLIC_ROWS:
    assert key in benchmark.SLIC_CONFIGS and key in benchmark.LABELS, key
  cmd = benchmark.slic_cmd(args, "small", 512, dtype="bfloat16",
                           attention_implementation="cudnn")
  assert cmd[cmd.index("--attention_implementation") + 1] == "cudnn"
  plain = benchmark.slic_cmd(args, "small", 512)
  assert plain[plain.index("--attention_implementation") + 1] == "default"
  assert set(benchmark.CUDNN_ROWS) == {k for k in benchmark.SLIC_ROWS if k.endswith("_cudnn")}
  assert all(benchmark.SLIC_CONFIGS[k][2] == "bfloat16" for k in benchmark.CUDNN_ROWS)
  # the worker flag is refused side by side, where it would be ignored
  with pytest.raises(SystemExit, match="add the rows slic_jax_2row_bf16_cudnn"):
    benchmark.main(["--attention_implementation", "cudnn"])
  # the CPU softmax kernels' rows, bf16 and float32, and no other row
  assert {k for k in benchmark.SLIC_ROWS if benchmark.row_attention(k) == "fused_softmax"} == {
      "slic_jax_2row_bf16_fused_softmax", "slic_jax_2row_fused_softmax"}
  assert benchmark.SLIC_CONFIGS["slic_jax_2row_fused_softmax"][2] == "float32"


def test_cpu_kernels_rows_ask_their_workers_for_the_kernel_optimizer_and_only_they_do(
    tmp_path, monkeypatch):
  """The two `_cpu_kernels` rows (float32, bf16) run their workers with
  `--optimizer_implementation cpu_kernels`, every other row with 'fused'."""
  seen = {}

  def fake_run_json(cmd, timeout, env=None):
    if cmd[cmd.index("--_worker") + 1] == "matmul":
      return {"jax_float32_flops_per_s": 2.8e11, "jax_bf16f32acc_flops_per_s": 2.5e11}
    key = (cmd[cmd.index("--dtype") + 1], cmd[cmd.index("--optimizer_implementation") + 1])
    seen[key] = seen.get(key, 0) + 1
    return _fake_step_result(cmd)

  monkeypatch.setattr(benchmark, "_run_json", fake_run_json)
  monkeypatch.setattr(benchmark, "peer_cmd", lambda *a, **k: None)
  args = benchmark.parse_args(["--sizes", "small", "--sweep", "", "--rows",
                               "slic_jax_2row,slic_jax_2row_cpu_kernels,slic_jax_2row_bf16,"
                               "slic_jax_2row_bf16_cpu_kernels", "--out_dir", str(tmp_path)])
  benchmark.orchestrate(args)
  assert seen == {("float32", "fused"): 1, ("float32", "cpu_kernels"): 1,
                  ("bfloat16", "fused"): 1, ("bfloat16", "cpu_kernels"): 1}
  assert set(benchmark.CPU_KERNELS_OPTIMIZER_ROWS) == {
      k for k in benchmark.SLIC_ROWS if k.endswith("_cpu_kernels")}


def test_the_mixed_dots_row_runs_xlas_mixed_bf16_dots_and_the_peaks_show_both(tmp_path,
                                                                                monkeypatch):
  """slic_jax_2row_bf16_mixed_dots: its step process gets
  SLIC_JAX_CPU_LOW_PRECISION_DOTS=native, the bf16 row the CPU's own choice; the report
  names a widened bf16 peak as such and shows XLA's mixed dot beside it."""
  envs, widen = {}, []

  def fake_run_json(cmd, timeout, env=None):
    if cmd[cmd.index("--_worker") + 1] == "matmul":
      return {"jax_float32_flops_per_s": 2.8e11, "jax_bf16f32acc_flops_per_s": 2.5e11,
              "jax_bf16f32acc_native_flops_per_s": 2.0e11, "cpu_low_precision_dots": "float32"}
    envs.setdefault(cmd[cmd.index("--dtype") + 1], []).append(env)
    flag = "--widen_min_flops_per_element"
    widen.append(cmd[cmd.index(flag) + 1] if flag in cmd else None)
    return _fake_step_result(cmd)

  monkeypatch.setattr(benchmark, "_run_json", fake_run_json)
  monkeypatch.setattr(benchmark, "peer_cmd", lambda *a, **k: None)
  args = benchmark.parse_args(["--sizes", "small", "--sweep", "", "--rows",
                               "slic_jax_2row_bf16,slic_jax_2row_bf16_mixed_dots,"
                               "slic_jax_2row_bf16_widen_all",
                               "--out_dir", str(tmp_path)])
  res = benchmark.orchestrate(args)
  assert envs == {"bfloat16": [None, {"SLIC_JAX_CPU_LOW_PRECISION_DOTS": "native"}, None]}
  # the widen-all row: every bf16 dot widened (threshold 0), the others the library's
  assert widen == [None, None, "0"]
  md = benchmark.to_markdown(res)
  assert ("| jax | bfloat16 × bfloat16 → float32 (slic_jax's bf16 matmuls: operands widened "
          "to float32 on this CPU) | 250.0 |") in md
  assert "| jax | bfloat16 × bfloat16 → float32, XLA's mixed dot | 200.0 |" in md


def test_side_by_side_processes_run_in_turn_with_the_order_reversed_every_other_round(
    tmp_path, monkeypatch):
  """--repeats 3 with two slic_jax rows and TRL (default and without checkpointing):
  A B C D, D C B A, A B C D; each row is its fastest process, all kept in "runs"."""
  order, steps = [], iter([3.0, 2.0, 6.0, 5.0, 5.5, 6.5, 2.5, 2.8, 3.1, 2.1, 6.2, 5.2])

  def fake_run_json(cmd, timeout, env=None):
    if "--_worker" in cmd and cmd[cmd.index("--_worker") + 1] == "matmul":
      return {"jax_float32_flops_per_s": 2.8e11}
    if "--_worker" in cmd:
      name = cmd[cmd.index("--dtype") + 1]
    else:
      name = "trl_" + cmd[cmd.index("--gradient_checkpointing") + 1]
    order.append(name)
    s = next(steps)
    return {"step_s_median": s, "step_s_min": s, "pairs_per_s": 4 / s,
            "model_flops_per_step": 4.38e11, "peak_rss_mb": 100.0}

  monkeypatch.setattr(benchmark, "_run_json", fake_run_json)
  monkeypatch.setattr(benchmark, "peer_cmd", lambda args, size, li, bf16=False,
                      checkpointing="default", matmul_only=False: None if matmul_only else [
                          "peer", "--gradient_checkpointing", checkpointing])
  res = benchmark.orchestrate(benchmark.parse_args(
      ["--sizes", "small", "--sweep", "", "--rows", "slic_jax_2row,slic_jax_2row_bf16",
       "--peer_no_checkpointing", "--repeats", "3", "--out_dir", str(tmp_path)]))
  one = ["float32", "bfloat16", "trl_default", "trl_off"]
  assert order == one + one[::-1] + one
  row = res["comparison"][0]
  assert [r["step_s_median"] for r in row["slic_jax_2row"]["runs"]] == [3.0, 2.8, 3.1]
  assert [r["step_s_median"] for r in row["trl_nockpt"]["runs"]] == [5.0, 5.5, 5.2]
  assert row["slic_jax_2row"]["step_s_median"] == 2.8
  assert row["slic_jax_2row_bf16"]["step_s_median"] == 2.0
  assert row["trl"]["step_s_median"] == 6.0
  assert "run in turn, the order reversed every other round" in (tmp_path / "results.md").read_text()
  # Round by round: TRL's median step over slic_jax's in the same round, and the median of
  # those ratios (the fastest processes above: 6.0 / 2.8 = 2.14 against TRL's default).
  rounds = benchmark.side_by_side_rounds(res)
  assert rounds[("small", "slic_jax_2row", "trl")] == pytest.approx([6.0 / 3.0, 6.5 / 2.8, 6.2 / 3.1])
  assert rounds[("small", "slic_jax_2row", "trl_nockpt")] == pytest.approx(
      [5.0 / 3.0, 5.5 / 2.8, 5.2 / 3.1])
  assert rounds[("small", "slic_jax_2row_bf16", "trl")] == pytest.approx([3.0, 2.6, 6.2 / 2.1])
  assert len(rounds) == 4
  md = (tmp_path / "results.md").read_text()
  assert ("| small | slic_jax (2 rows: y⁺, y⁻; NLL on y⁺ as TRL) | TRL CPOTrainer, "
          "gradient_checkpointing=False (`--peer_no_checkpointing`) | 1.67× | 1.96× | 1.68× "
          "| 1.68× |") in md


def test_side_by_side_rounds_pair_runs_of_the_same_round_and_skip_failed_ones():
  """A round where either process failed is '–' and left out of the median; a float32
  row is not compared with TRL's bf16 autocast, a bf16 row is; fewer than two complete
  rounds (--repeats 1) give no table."""
  def runs(*medians):
    return {"runs": [{"step_s_median": m} for m in medians]}

  res = {"comparison": [{"size": "small",
                         "slic_jax_2row": runs(2.0, None, 3.0, 2.5),
                         "slic_jax_2row_bf16": runs(1.0, 1.5, 1.2, 1.1),
                         "trl": runs(5.0, 6.0, None, 6.0),
                         "trl_bf16": runs(8.0, 9.0, 8.4, 7.7)}]}
  rounds = benchmark.side_by_side_rounds(res)
  assert sorted(rounds) == [("small", "slic_jax_2row", "trl"),
                            ("small", "slic_jax_2row_bf16", "trl"),
                            ("small", "slic_jax_2row_bf16", "trl_bf16")]
  assert rounds[("small", "slic_jax_2row", "trl")] == pytest.approx([2.5, None, None, 2.4])
  assert rounds[("small", "slic_jax_2row_bf16", "trl_bf16")] == pytest.approx([8, 6, 7, 7])
  md = "\n".join(benchmark._side_by_side_rounds_markdown(res))
  assert "| 2.50× | – | – | 2.40× | 2.45× |" in md
  res["comparison"][0]["slic_jax_2row"] = runs(2.0, None, 3.0, None)
  assert ("small", "slic_jax_2row", "trl") not in benchmark.side_by_side_rounds(res)
  for k in ("slic_jax_2row", "slic_jax_2row_bf16", "trl", "trl_bf16"):
    res["comparison"][0][k]["runs"] = res["comparison"][0][k]["runs"][:1]
  assert benchmark.side_by_side_rounds(res) == {}
  assert benchmark._side_by_side_rounds_markdown(res) == []


def test_interleaved_rounds_start_every_row_at_once_and_pair_the_steps_of_each_cycle(
    tmp_path, monkeypatch):
  """--interleave --repeats 2: each round hands all its processes (the order reversed in
  the second) to the turn-taking runner at once; TRL gets slic_jax's --steps/--warmup;
  the report pairs each cycle's steps (TRL's / slic_jax's) over both rounds."""
  rounds = []
  slic_steps = iter([[2.0, 2.5, 3.0], [2.0, 2.0, 4.0]])
  trl_steps = iter([[5.0, 4.0, 6.3], [4.2, 5.0, 7.0]])

  def fake_in_turns(cmds, timeout):
    rounds.append(list(cmds))
    out = {}
    for key, (cmd, _) in cmds.items():
      st = next(slic_steps if "--_worker" in cmd else trl_steps)
      if "--_worker" not in cmd:
        assert cmd[cmd.index("--steps") + 1] == "3" and cmd[cmd.index("--warmup") + 1] == "1"
      out[key] = {"step_times_s": st, "step_s_median": sorted(st)[1], "step_s_min": min(st),
                  "pairs_per_s": 4 / sorted(st)[1], "model_flops_per_step": 4.38e11,
                  "peak_rss_mb": 100.0, "turns": [(c, c, c + 0.5) for c in range(4)]}
    return out

  monkeypatch.setattr(benchmark, "_run_json", lambda cmd, timeout, env=None: {
      "jax_float32_flops_per_s": 2.8e11})
  monkeypatch.setattr(benchmark, "_run_in_turns", fake_in_turns)
  monkeypatch.setattr(benchmark, "peer_cmd", lambda args, size, li, bf16=False,
                      checkpointing="default", matmul_only=False: None if matmul_only else [
                          "peer", "--steps", str(args.peer_steps), "--warmup",
                          str(args.peer_warmup)])
  res = benchmark.orchestrate(benchmark.parse_args(
      ["--sizes", "small", "--sweep", "", "--rows", "slic_jax_2row", "--interleave",
       "--repeats", "2", "--steps", "3", "--warmup", "1", "--out_dir", str(tmp_path)]))
  assert rounds == [["slic_jax_2row", "trl"], ["trl", "slic_jax_2row"]]
  assert res["settings"]["interleave"] and res["settings"]["peer_steps"] == 3
  cycles = benchmark.interleaved_cycles(res)
  assert cycles == {("small", "slic_jax_2row", "trl"): pytest.approx(
      [2.5, 1.6, 2.1, 2.1, 2.5, 1.75])}
  md = (tmp_path / "results.md").read_text()
  assert "| 6 | 2.10× | 1.84–2.40× | 4 of 6 |" in md
  # Rounds that did not run in turns (or failed) pair nothing.
  del res["comparison"][0]["trl"]["runs"][1]["turns"]
  res["comparison"][0]["slic_jax_2row"]["runs"][0] = {"error": "exit 1"}
  assert benchmark.interleaved_cycles(res) == {}
  assert benchmark._interleaved_cycles_markdown(res) == []


def test_interleaved_sweep_runs_each_rounds_lengths_at_once_and_compares_each_cycle(
    tmp_path, monkeypatch):
  """--sweep 128,256,512 --interleave --repeats 2: each round hands its lengths to the
  turn-taking runner at once (the order reversed in the second round); the report gives
  each length's cost per FLOP over the next shorter length's, cycle by cycle, and a round
  where a length failed pairs nothing with it."""
  rounds = []
  steps = {128: iter([[1.0, 1.0], [1.1, 0.9]]), 256: iter([[2.0, 2.2], [2.0, 2.0]]),
           512: iter([[4.0, 4.4], None])}  # 512 fails in round 2

  def fake_in_turns(cmds, timeout):
    rounds.append(list(cmds))
    out = {}
    for name, (cmd, _) in cmds.items():
      li = int(cmd[cmd.index("--li") + 1])
      st = next(steps[li])
      out[name] = ({"error": "exit 1", "turns": []} if st is None else
                   {"step_times_s": st, "step_s_median": max(st), "step_s_min": min(st),
                    "pairs_per_s": 4 / max(st), "model_flops_per_step": li * 1e9,
                    "achieved_model_flops_per_s": li * 1e9 / max(st), "peak_rss_mb": 100.0,
                    "turns": [(c, c, c + 0.5) for c in range(3)]})
    return out

  monkeypatch.setattr(benchmark, "_run_json", lambda cmd, timeout, env=None: {
      "jax_float32_flops_per_s": 1e11})
  monkeypatch.setattr(benchmark, "_run_in_turns", fake_in_turns)
  monkeypatch.setattr(benchmark, "peer_cmd", lambda *a, **k: None)
  res = benchmark.orchestrate(benchmark.parse_args(
      ["--sizes", "", "--sweep", "128,256,512", "--interleave", "--repeats", "2",
       "--steps", "2", "--warmup", "1", "--out_dir", str(tmp_path)]))
  assert rounds == [["slic_jax_128", "slic_jax_256", "slic_jax_512"],
                    ["slic_jax_512", "slic_jax_256", "slic_jax_128"]]
  cycles = benchmark.sweep_cycles(res)[("mini", "slic_jax")]
  # 256 against 128 per FLOP: (2.0/256)/(1.0/128) = 1.0, (2.2/256)/(1.0/128) = 1.1, then
  # 2.0/(2·1.1), 2.0/(2·0.9): median 1.05, quartiles 0.977 and 1.103; 512 against 256 in
  # round 1 only (512 failed in round 2).
  assert cycles[256][0] == 128 and cycles[256][1] == pytest.approx(
      [1.0, 1.1, 2.0 / 2.2, 2.0 / 1.8])
  assert cycles[512][0] == 256 and cycles[512][1] == pytest.approx([1.0, 1.0])
  # The marginal cost: the time added over the FLOPs added (128e9 and 256e9), s per TFLOP.
  assert cycles[256][2] == pytest.approx([1e12 / 128e9, 1.2e12 / 128e9, 0.9e12 / 128e9,
                                          1.1e12 / 128e9])
  assert cycles[512][2] == pytest.approx([2e12 / 256e9, 2.2e12 / 256e9])
  md = (tmp_path / "results.md").read_text()
  assert "each length the fastest of 2 runs; each round's lengths at once, their steps in turns" in md
  assert ("| mini | slic_jax | 256 | 128 | 4 | +5.0% | -2.3% to +10.3% | 2 of 4 | 8.20 | "
          "7.62 to 8.79 |") in md
  assert "| mini | slic_jax | 512 | 256 | 2 | +0.0% | +0.0% to +0.0% | 0 of 2 | 8.20 |" in md
  # Rounds that did not run in turns pair nothing.
  for row in res["sweep"]:
    for r in row["slic_jax"]["runs"]:
      r.pop("turns", None)
  assert benchmark.sweep_cycles(res) == {}
  assert benchmark._sweep_cycles_markdown(res) == []


def test_the_step_worker_runs_in_turns_for_real(tmp_path):
  """The step worker itself under the turn-taking runner, beside a stand-in worker of 0.2
  s steps: the tiny model, 1 warm-up and 2 timed steps: 3 turns each, one cycle after
  the other, every timed step inside its turn, no two turns overlapping, the order
  reversed every cycle."""
  args = benchmark.parse_args(["--steps", "2", "--warmup", "1", "--lt", "8", "--batch", "1"])
  tools = os.path.dirname(_PATH)
  stand_in = [sys.executable, "-c",
              f"import sys, time; sys.path.insert(0, {tools!r}); import step_turns; "
              "t = step_turns.Turns(sys.argv[-1])\n"
              "for _ in range(3):\n  t.take(); time.sleep(0.2); t.give_back()\n"
              "print('{\"step_times_s\": []}')"]
  cmds = {"slic_jax": (benchmark.slic_cmd(args, "tiny", 32, reg_target="chosen"), None),
          "stand_in": (stand_in, None)}
  out = benchmark._run_in_turns(cmds, timeout=600)
  turns = []
  for name, r in out.items():
    assert "error" not in r, r.get("stderr_tail")
    assert [c for c, _, _ in r["turns"]] == [0, 1, 2]
    turns += [(start, end) for _, start, end in r["turns"]]
  for (_, start, end), step in zip(out["slic_jax"]["turns"][1:], out["slic_jax"]["step_times_s"]):
    assert step <= end - start
  assert len(out["slic_jax"]["step_times_s"]) == 2
  turns.sort()
  assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(turns, turns[1:]))
  assert [out["slic_jax"]["turns"][c][1] < out["stand_in"]["turns"][c][1]
          for c in range(3)] == [True, False, True]
