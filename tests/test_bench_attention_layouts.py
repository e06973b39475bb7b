"""tools/bench_attention_layouts.py: its rows compare like with like."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import bench_attention_layouts as bal  # noqa: E402

SIZES = {"b": 2, "h": 3, "q": 5, "k": 5, "d": 4}
# Each group's product in one layout: logits [B, H, Lq, Lk], p·v [B, Lq, H, K], dk [B, Lk, H, K].
GROUPS = {"logits": "bhqk", "p·v": "bqhd", "dk": "bkhd"}


def test_rows_of_a_group_compute_the_same_product_from_the_same_arrays():
  results = {}
  for name, equation, names in bal.ROWS:
    group = next(g for g in GROUPS if name.startswith(g))
    out = equation.split("->")[1]
    y = np.einsum(equation, *map(np.asarray, bal.operands(equation, names, SIZES)))
    results.setdefault(group, []).append((name, np.einsum(f"{out}->{GROUPS[group]}", y)))
  assert {g: len(r) for g, r in results.items()} == {"logits": 3, "p·v": 2, "dk": 4}
  for group, rows in results.items():
    for name, y in rows[1:]:
      np.testing.assert_allclose(y, rows[0][1], rtol=1e-5, atol=1e-5, err_msg=name)
  # and the groups differ (the arrays are not all the same)
  assert not np.allclose(results["p·v"][0][1], results["dk"][0][1])


def test_main_prints_one_table_row_per_einsum(capsys):
  bal.main(["--batch", "1", "--heads", "2", "--head_dim", "4", "--length", "8", "--reps", "1"])
  table = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| ") and "`" in l]
  assert [l.split("`")[1] for l in table] == [eq for _, eq, _ in bal.ROWS]
