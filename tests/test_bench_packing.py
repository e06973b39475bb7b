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
