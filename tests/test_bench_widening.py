"""tools/bench_widening.py: widened against mixed bf16 dots per shape."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import bench_widening  # noqa: E402

from slic_jax import matmul, platforms  # noqa: E402


def test_flops_per_operand_element_is_matmuls_measure():
  # [2048, 512] × [512, 64]: 2·2048·64 / (2048 + 64)
  assert bench_widening.flops_per_operand_element("mk,kn->mn", (2048, 512), (512, 64)) == (
      pytest.approx(2 * 2048 * 64 / 2112))
  # p·v at Li 512, head_dim 64: 2·Q·D / (Q + D), under the threshold
  fpe = bench_widening.flops_per_operand_element(
      "bhqk,bkhd->bqhd", (4, 6, 512, 512), (4, 512, 6, 64))
  assert fpe == pytest.approx(2 * 512 * 64 / 576) and fpe < matmul.WIDEN_MIN_FLOPS_PER_ELEMENT
  # the scores q·kᵀ: K per element of q and k
  assert bench_widening.flops_per_operand_element(
      "bqhd,bkhd->bhqk", (4, 512, 6, 64), (4, 512, 6, 64)) == pytest.approx(512)


@pytest.mark.skipif(sys.platform != "linux", reason="CPU timing tool")
def test_small_run_writes_both_forms_of_each_dot(tmp_path, monkeypatch):
  monkeypatch.delenv(platforms.LOW_PRECISION_DOTS_ENV, raising=False)
  out = tmp_path / "w.json"
  res = bench_widening.main(["--small", "--reps", "3", "--out", str(out)])
  # the mode it forced is undone, and so is the threshold it varied
  assert platforms.LOW_PRECISION_DOTS_ENV not in os.environ
  assert res["threshold"] == matmul.WIDEN_MIN_FLOPS_PER_ELEMENT
  saved = json.loads(out.read_text())
  assert [c["name"] for c in saved["cases"]] == [c["name"] for c in bench_widening.cases(True)]
  assert len(saved["cases"]) == 6
  for c in saved["cases"]:
    assert len(c["times_s"]["widened"]) == len(c["times_s"]["mixed"]) == 3
    assert c["widened_ms"] > 0 and c["mixed_ms"] > 0 and 0 <= c["mixed_faster"] <= 3
    assert c["slic_jax_widens"] == (c["flops_per_operand_element"]
                                    >= matmul.WIDEN_MIN_FLOPS_PER_ELEMENT)
  # the small shapes have dots on both sides of the threshold
  assert {c["slic_jax_widens"] for c in saved["cases"]} == {True, False}
  md = (tmp_path / "w.md").read_text()
  assert "| mk,kn->mn M 256 K 32 N 512 | 341 |" in md and "| widened |" in md
  assert "| p·v Li 32 |" in md and "| mixed |" in md
