"""tools/ab_steps.py: two variants of the step compiled in one process, their steps paired."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import ab_steps  # noqa: E402


def test_paired_ratios():
  r = ab_steps.paired_ratios([2.0, 2.0, 4.0, 1.0], [1.0, 3.0, 2.0, 1.0])
  assert r["ratios"] == [0.5, 1.5, 0.5, 1.0]
  assert (r["median"], r["q1"], r["q3"]) == (0.75, 0.5, 1.125)
  assert (r["head_wins"], r["pairs"]) == (2, 4)  # a tie is no win
  with pytest.raises(ValueError, match="3 base and 2 head"):
    ab_steps.paired_ratios([1.0, 1.0, 1.0], [1.0, 1.0])


def test_the_first_step_whose_losses_differ():
  assert ab_steps.first_difference([3.0, 2.0, 1.0], [3.0, 2.0, 1.0]) is None
  assert ab_steps.first_difference([3.0, 2.0, 1.0], [3.0, 2.5, 0.9]) == dict(
      step=2, base=2.0, head=2.5)
  with pytest.raises(ValueError, match="2 base and 1 head"):
    ab_steps.first_difference([1.0, 1.0], [1.0])
  report = dict(losses={"base": [3.0, 2.0, 1.0], "head": [3.0, 2.5, 0.9]},
                losses_part=dict(step=2, base=2.0, head=2.5))
  assert ab_steps.losses_line(report) == (
      "Losses: the same through step 1 of 3 (warm-up included); at step 2 base 2.00000, head "
      "2.50000 (relative difference 2.5e-01); after the last step as in the table.")
  report["losses_part"] = None
  assert ab_steps.losses_line(report) == "Losses: the same at all 3 steps (warm-up included)."
  assert "only the last" in ab_steps.losses_line({})


def test_a_variants_own_arguments_come_after_the_common_ones():
  common = ["--size", "tiny", "--li", "64", "--dtype", "float32"]
  a = ab_steps.variant_args(common, "--dtype bfloat16 --xla_option 'k=a b'")
  assert (a.size, a.li, a.dtype, a.xla_option) == ("tiny", 64, "bfloat16", ["k=a b"])
  assert ab_steps.variant_args(common, "").dtype == "float32"


def test_malloc_settings_must_agree_before_anything_starts():
  with pytest.raises(SystemExit, match="--host_malloc is per process"):
    ab_steps.run(["--size", "tiny"], "", "--host_malloc default", pairs=1, warmup=0)


def test_two_variants_run_in_turn_each_traced_with_its_own_matmul_settings(tmp_path):
  """Real steps of the tiny model: both variants time one step per pair, each traces with
  its own widening threshold and row-max level, and the module's defaults are back
  afterwards."""
  from slic_jax import matmul
  default = matmul.WIDEN_MIN_FLOPS_PER_ELEMENT
  out = str(tmp_path / "ab.json")
  ab_steps.main(["--pairs", "2", "--warmup", "1", "--out", out,
                 "--head", "--widen_min_flops_per_element 0 --row_max_level 0", "--",
                 "--size", "tiny", "--li", "16", "--lt", "4", "--batch", "1",
                 "--dtype", "bfloat16", "--logits_dtype", "bfloat16", "--reg_target", "chosen"])
  assert (matmul.WIDEN_MIN_FLOPS_PER_ELEMENT, matmul.ROW_MAX_LEVEL) == (default, 32)
  report = json.load(open(out))
  s = report["summary"]
  assert (s["base"]["widen_min_flops_per_element"], s["head"]["widen_min_flops_per_element"]) == (
      default, 0)
  assert (s["base"]["row_max_level"], s["head"]["row_max_level"]) == (32, 0)
  assert len(report["times"]["base"]) == len(report["times"]["head"]) == 2
  assert report["head_over_base"]["pairs"] == 2
  assert all(v["final_loss"] > 0 and v["temp_mb"] > 0 for v in s.values())
  for label in ("base", "head"):  # every step's loss, the warm-up pair's included
    assert len(report["losses"][label]) == 3
    assert report["losses"][label][-1] == s[label]["final_loss"]
  md = open(str(tmp_path / "ab.md")).read()
  assert "| head | `--widen_min_flops_per_element 0 --row_max_level 0` |" in md
  assert "the head the faster in" in md


def test_the_pairs_alternate_which_variant_runs_first(monkeypatch):
  """A B, then B A, ...: `benchmark.in_turn` over the pairs (the steps stubbed to record
  their order; the compiled steps themselves are exercised above)."""
  import benchmark
  order = []
  monkeypatch.setattr(benchmark, "apply_host_malloc", lambda _: False)
  monkeypatch.setattr(benchmark, "compile_slic_step",
                      lambda a, t: dict(compiled=a.dtype, state=None, batch=None, mem={}))

  class Loss:
    def compute(self):
      return 1.0

  def step(compiled, state, batch):
    order.append(compiled)
    return state, {"loss": Loss()}, 1.0 if compiled == "float32" else 0.5, 0, 0.0
  monkeypatch.setattr(benchmark, "timed_step", step)
  report = ab_steps.run(["--size", "tiny"], "--dtype float32", "--dtype bfloat16", pairs=3,
                        warmup=1)
  assert order == ["float32", "bfloat16", "bfloat16", "float32"] * 2
  assert report["head_over_base"]["median"] == 0.5
  assert report["head_over_base"]["head_wins"] == 3
  assert report["losses"]["base"] == [1.0] * 4 and report["losses_part"] is None
