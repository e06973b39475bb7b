"""tools/bench_trainers.py: reading each trainer's timing metric and the statistics.

No trainer is run (and t5x is not needed): the metric files are written here in the
formats the trainers write -- slic_jax's metrics.jsonl, and TensorBoard event files as
T5X writes them through clu (TF2 ``tf.summary.scalar``: a scalar tensor) and as TF1 /
tensorboard's own writer does (``simple_value``).
"""
import importlib.util
import json
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "tools", "bench_trainers.py")
_spec = importlib.util.spec_from_file_location("slic_jax_tools_bench_trainers", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

METRIC = "timing/seqs_per_second"


def test_read_jsonl_metric_takes_train_rows_with_the_metric(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [
      {"step": 10, "split": "train", "loss": 1.0, METRIC: 12.5, "timing/steps_per_second": 0.4},
      {"step": 20, "split": "train", "loss": 0.9, METRIC: 30.0},
      {"step": 20, "split": "train_eval", "loss": 0.8},
      {"step": 30, "split": "train", "loss": 0.7},  # no timing in this row
      {"step": 40, "split": "train", "loss": 0.6, METRIC: 32.0},
  ]
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
  assert bench.read_jsonl_metric(str(path)) == [(10, 12.5), (20, 30.0), (40, 32.0)]
  assert bench.read_jsonl_metric(str(path), "loss", split="train_eval") == [(20, 0.8)]


def test_read_tb_metric_from_tf2_summary_writer(tmp_path):
  # What T5X's MetricsManager writes (clu SummaryWriter = tf.summary.scalar), plus a text
  # summary (T5X writes the gin config as one) that must be skipped.
  tf = pytest.importorskip("tensorflow")
  log_dir = str(tmp_path / "train")
  writer = tf.summary.create_file_writer(log_dir)
  with writer.as_default():
    tf.summary.text("config", "MODEL = ...", step=0)
    for step, value in [(10, 5.0), (20, 40.25), (30, 41.5)]:
      tf.summary.scalar(METRIC, value, step=step)
      tf.summary.scalar("loss", 1.0 / step, step=step)
    tf.summary.scalar("timing/compilation_seconds", 3.5, step=0)
  writer.close()
  assert bench.read_tb_metric(log_dir) == [(10, 5.0), (20, 40.25), (30, 41.5)]
  scalars = bench.read_tb_scalars(log_dir)
  assert scalars["timing/compilation_seconds"] == [(0, 3.5)]
  assert "config" not in scalars
  assert bench.read_tb_metric(str(tmp_path / "nothing_here")) == []


def test_read_tb_metric_from_simple_values(tmp_path):
  # TF1-style Summary.Value.simple_value, via tensorboard's own (TF-free) event writer.
  from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.summary.writer.event_file_writer import EventFileWriter  # pylint: disable=g-import-not-at-top

  writer = EventFileWriter(str(tmp_path))
  for step, value in [(5, 1.5), (10, 7.0)]:
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=METRIC,
                                                                   simple_value=value)])
    writer.add_event(event_pb2.Event(step=step, wall_time=0.0, summary=summary))
  writer.close()
  assert bench.read_tb_metric(str(tmp_path)) == [(5, 1.5), (10, 7.0)]


def test_median_excludes_the_first_window():
  s = bench.summarize_windows([(20, 30.0), (10, 2.0), (40, 34.0), (30, 31.0)], "x")
  assert [w["step"] for w in s["windows"]] == [10, 20, 30, 40]  # sorted by step
  assert s["excluded_first_window_step"] == 10
  assert s["median_seqs_per_second"] == 31.0  # median of 30, 31, 34: the 2.0 is compile
  assert bench.summarize_windows([(1, 100.0), (2, 4.0), (3, 6.0)])[
      "median_seqs_per_second"] == 5.0


def test_one_window_is_not_enough():
  with pytest.raises(bench.TrainerError, match="need at least 2"):
    bench.summarize_windows([(10, 5.0)], "t5x")


def test_ratio():
  assert bench.ratio(30.0, 20.0) == pytest.approx(1.5)
  with pytest.raises(ValueError):
    bench.ratio(30.0, 0.0)


def test_param_counts_from_trainer_outputs(tmp_path):
  log = "I1122 train.py:160] 1234567 params; starting at step 0 of 40\n"
  assert bench.slic_jax_num_params(log) == 1234567
  assert bench.slic_jax_num_params("nothing") is None
  (tmp_path / "model-info.txt").write_text(
      "Variable decoder/x size 12 shape (3, 4)\nTotal number of parameters: 1234567\n")
  assert bench.t5x_num_params(str(tmp_path)) == 1234567
  assert bench.t5x_num_params(str(tmp_path / "missing")) is None


def test_compiled_shapes_from_slic_jax_log():
  log = ("I1202 train.py:190] update step compiled for {'decoder_input_tokens': (4, 3, 32), "
         "'decoder_target_tokens': (4, 3, 32), 'encoder_input_tokens': (4, 256)} "
         "(1 shape(s) so far)\nI1202 other line\n"
         "I1202 train.py:190] update step compiled for {'decoder_target_tokens': (4, 3, 16), "
         "'encoder_input_tokens': (4, 128)} (2 shape(s) so far) in 71.5 s\n")
  assert bench.slic_jax_compiled_shapes(log) == [[256, 32], [128, 16]]
  assert bench.slic_jax_compile_seconds(log) == [71.5]
  assert bench.slic_jax_compiled_shapes("nothing") == []


def test_markdown_table_shows_the_fixed_length_row_and_its_ratio():
  def row(v, shapes=None):
    r = {"windows": [{"step": 4, "seqs_per_second": v / 2}, {"step": 8, "seqs_per_second": v}],
         "median_seqs_per_second": v, "wall_seconds": 10.0, "num_params": 7}
    return r if shapes is None else {**r, "compiled_shapes": shapes}
  result = {"experiment": "gin/slic_hf.gin", "model_gin": "m.gin", "steps": 8, "batch": 4,
            "inputs_len": 512, "targets_len": 64, "stats_period": 4,
            "slic_jax": {**row(2.0, [[256, 32]]), "compile_seconds": [80.4]},
            "slic_jax_fixed": row(0.6, [[512, 64]]),
            "t5x": row(0.5), "ratio_slic_jax_over_t5x": 4.0,
            "ratio_slic_jax_fixed_over_t5x": 1.2, "warnings": []}
  table = bench.markdown_table(result)
  assert "| slic_jax | 1.00, 2.00 | 2.00 | 10.0 | 7 | [256, 32] (80) |" in table
  assert "| slic_jax_fixed | 0.30, 0.60 | 0.60 | 10.0 | 7 | [512, 64] |" in table
  assert "| t5x | 0.25, 0.50 | 0.50 | 10.0 | 7 | - |" in table
  assert "ratio slic_jax / t5x (median seqs/s): 4.00x" in table
  assert "as T5X) / t5x: 1.20x" in table


def test_commands_share_the_experiment_model_and_bindings():
  b = bench.common_bindings(steps=40, batch=8, inputs_len=64, targets_len=16, stats_period=10)
  assert "TRAIN_STEPS=40" in b and "EVAL_PERIOD=40" in b and "CHECKPOINT_PERIOD=40" in b
  assert "train.stats_period=10" in b
  model_gin = bench.model_gin_path("small")
  assert model_gin == "gin/models/t5_1_1_small.gin"
  assert os.path.exists(os.path.join(bench.REPO, model_gin))
  ours = bench.trainer_command("py", "slic_jax.train", model_gin=model_gin,
                               model_dir="/tmp/a", bindings=b)
  theirs = bench.trainer_command("py5", "t5x.train", model_gin=model_gin,
                                 model_dir="/tmp/a", bindings=b)
  assert ours[3:] == theirs[3:]
  # the model file comes after the experiment, so its bindings win
  assert ours[3:5] == ["--gin_file=gin/slic_hf.gin", "--gin_file=gin/models/t5_1_1_small.gin"]
  assert "--gin.MODEL_DIR='/tmp/a'" in ours


def test_missing_t5x_python_is_a_clear_error(tmp_path, capsys):
  missing = str(tmp_path / "no_python")
  with pytest.raises(bench.TrainerError, match="no such executable"):
    bench.check_t5x_python(missing)
  assert bench.main(["--t5x_python", missing, "--steps", "20", "--stats_period", "10",
                     "--workdir", str(tmp_path / "w")]) == 1
  assert "no_python" in capsys.readouterr().err


def test_steps_must_cover_two_whole_windows(tmp_path):
  with pytest.raises(ValueError, match="multiple of stats_period"):
    bench.compare_trainers(t5x_python="x", steps=25, batch=8, inputs_len=64, targets_len=16,
                           model_gin="tiny", stats_period=10, workdir=str(tmp_path))
  with pytest.raises(ValueError, match="at least 2 windows"):
    bench.compare_trainers(t5x_python="x", steps=10, batch=8, inputs_len=64, targets_len=16,
                           model_gin="tiny", stats_period=10, workdir=str(tmp_path))
