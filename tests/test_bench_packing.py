"""tools/bench_packing.py's reading of slic_jax.train's metrics (no training here)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import bench_packing  # noqa: E402


def test_examples_per_second_counts_examples_not_rows_and_skips_the_first_window():
  # Windows of 6 steps, 8 rows per step: 48 rows per window.
  records = [
      {"step": 6, "split": "train", "num_examples": 96, "timing/steps_per_second": 0.1,
       "timing/seqs_per_second": 0.8},  # the compile window: left out
      {"step": 12, "split": "train", "num_examples": 96, "timing/steps_per_second": 2.0,
       "timing/seqs_per_second": 16.0},
      {"step": 12, "split": "train_eval", "num_examples": 16},
      {"step": 18, "split": "train", "num_examples": 144, "timing/steps_per_second": 3.0,
       "timing/seqs_per_second": 24.0},
      {"step": 24, "split": "train", "num_examples": 120, "timing/steps_per_second": 1.0,
       "timing/seqs_per_second": 8.0},
  ]
  out = bench_packing.examples_per_second(records, stats_period=6)
  # examples/s per window: 96·2/6 = 32, 144·3/6 = 72, 120·1/6 = 20 → median 32
  assert out["examples_per_second"] == pytest.approx(32.0)
  assert out["rows_per_second"] == pytest.approx(16.0)
  assert out["examples_per_row"] == pytest.approx(2.5)  # 96/48, 144/48, 120/48 → 2.5
  assert out["windows"] == 3
  with pytest.raises(ValueError, match="raise --steps"):
    bench_packing.examples_per_second(records[:1], stats_period=6)


def _run(variant, pack, examples, repeat=0):
  return {"variant": variant, "pack": pack, "repeat": repeat, "examples_per_second": examples,
          "rows_per_second": examples / (3 if pack else 1), "examples_per_row": 3 if pack else 1}


def test_summarize_compares_each_variant_with_default_at_the_same_packing():
  runs = [_run("default", False, 10.0), _run("default", True, 20.0),
          _run("kernels", False, 12.0), _run("kernels", True, 30.0),
          _run("default", False, 14.0, 1), _run("default", True, 24.0, 1),
          _run("kernels", False, 16.0, 1), _run("kernels", True, 26.0, 1)]
  out = bench_packing.summarize(runs)
  med = out["median_over_runs"]
  assert med["pack_False"]["examples_per_second"] == pytest.approx(12.0)  # (10 + 14) / 2
  assert med["kernels/pack_True"]["examples_per_second"] == pytest.approx(28.0)
  assert out["packed_vs_padded"] == pytest.approx({"default": 22.0 / 12.0, "kernels": 28.0 / 14.0})
  assert out["vs_default"] == pytest.approx({"kernels/pack_False": 14.0 / 12.0,
                                             "kernels/pack_True": 28.0 / 22.0})


def test_runs_without_a_variant_field_count_as_default():
  runs = [{k: v for k, v in _run("default", p, e).items() if k != "variant"}
          for p, e in ((False, 10.0), (True, 25.0))]
  out = bench_packing.summarize(runs)
  assert out["packed_vs_padded"] == pytest.approx({"default": 2.5})
  assert out["vs_default"] == {}


@pytest.mark.parametrize("text", ["kernels", "=a=1", "kernels=", "default=x=1", "kernels= ; "])
def test_a_malformed_variant_names_the_expected_form(text):
  with pytest.raises(Exception, match="NAME=BINDING"):
    bench_packing.parse_variant(text)


def test_a_variant_splits_its_bindings_on_semicolons():
  assert bench_packing.parse_variant("k=a.b = 1; c.d='x' ") == ("k", ["a.b = 1", "c.d='x'"])
