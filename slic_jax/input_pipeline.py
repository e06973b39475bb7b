"""SeqIO datasets → sharded global jax.Arrays for the trainer.

`DatasetConfig` mirrors `t5x.utils.DatasetConfig` field for field, so the same gin
bindings (``train/utils.DatasetConfig.mixture_or_task_name = %MIXTURE_OR_TASK_NAME``)
describe the data for both trainers.
"""
from __future__ import annotations

import dataclasses
import importlib
import queue
import threading
from typing import Any, Iterator, Mapping

import jax
import numpy as np
import seqio
import tensorflow as tf

from slic_jax import partitioning


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """What to read and how to batch it (T5X's field names)."""

  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  split: str
  batch_size: int
  shuffle: bool
  seed: int | None = None
  use_cached: bool = False
  pack: bool = False
  use_custom_packing_ops: bool = False
  module: str | None = None
  use_memory_cache: bool = True
  trim_output_features: bool = True


def get_dataset(
    cfg: DatasetConfig,
    feature_converter_cls: type[seqio.FeatureConverter],
    *,
    num_epochs: int | None = None,
    shard_id: int = 0,
    num_shards: int = 1,
) -> tf.data.Dataset:
  """Batched model features for this host: ``{feature: [B_host, ...]}``.

  ``num_epochs=None`` repeats forever (training); eval passes 1 and keeps the
  last partial batch (`pad_batch` fills it).
  """
  if cfg.module:
    importlib.import_module(cfg.module)
  if cfg.batch_size % num_shards:
    raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {num_shards} hosts")
  ds = seqio.get_dataset(
      cfg.mixture_or_task_name,
      task_feature_lengths=dict(cfg.task_feature_lengths),
      dataset_split=cfg.split,
      shuffle=cfg.shuffle,
      num_epochs=num_epochs,
      feature_converter=feature_converter_cls(
          pack=cfg.pack, use_custom_packing_ops=cfg.use_custom_packing_ops
      ),
      shard_info=seqio.ShardInfo(index=shard_id, num_shards=num_shards),
      use_cached=cfg.use_cached,
      seed=cfg.seed,
      trim_output_features=cfg.trim_output_features,
  )
  host_batch = cfg.batch_size // num_shards
  return ds.batch(host_batch, drop_remainder=num_epochs is None).prefetch(tf.data.AUTOTUNE)


def pad_batch(batch: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Zero-pads a short final eval batch to ``batch_size`` rows (padding rows weigh 0)."""
  out = {}
  for k, v in batch.items():
    pad = batch_size - v.shape[0]
    out[k] = np.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1)) if pad > 0 else v
  return out


# Features whose last axis is a sequence axis, grouped by the length they share.
SEQUENCE_GROUPS = ("encoder_", "decoder_")
BUCKET_ROUNDING = 8  # bucket lengths are multiples of this (or the full length)


def bucket_lengths(full_length: int, num_buckets: int) -> list[int]:
  """The lengths a sequence axis of ``full_length`` may be cut to, shortest first.

  ``num_buckets`` equally spaced cuts ``ceil(L·j / n)`` for j = 1..n, each rounded up to a
  multiple of 8 and capped at L (duplicates dropped); the last is always L. n = 1: [L].
  E.g. L 512, n 4: [128, 256, 384, 512]; L 64, n 4: [16, 32, 48, 64].
  """
  if num_buckets < 1:
    raise ValueError(f"length_buckets must be >= 1, got {num_buckets}")
  out = []
  for j in range(1, num_buckets + 1):
    cut = -(-full_length * j // num_buckets)
    cut = min(full_length, -(-cut // BUCKET_ROUNDING) * BUCKET_ROUNDING)
    if cut not in out:
      out.append(cut)
  return out


def trim_padding(batch: Mapping[str, np.ndarray], num_buckets: int) -> dict[str, np.ndarray]:
  """Cuts each sequence group's trailing padding down to the smallest bucket that fits.

  The groups are the ``encoder_*`` and the ``decoder_*`` features; each group's last axis
  (length L) is its sequence axis. A group keeps ``min{b ∈ bucket_lengths(L, n) : b ≥ e}``
  positions, e = 1 + the last position where ANY of its features is nonzero in any row,
  so only all-zero (padding) positions are ever dropped. For a T5 model that is exact:
  padding keys are masked, padding targets weigh 0 and relative position biases do not
  depend on the padded length, so loss and gradients equal the full-length batch's up to
  float summation order (`tests/test_input_pipeline.py`). Other features pass unchanged.

  Fewer positions is less work (the encoder's cost grows with Li, its attention with Li²);
  each distinct shape is one more compile of the step, so ``num_buckets`` bounds them at
  ``num_buckets`` per group. T5X always pads to the full length (``num_buckets = 1``).
  """
  if num_buckets <= 1:
    return dict(batch)
  out = dict(batch)
  for prefix in SEQUENCE_GROUPS:
    names = [k for k, v in batch.items() if k.startswith(prefix) and np.ndim(v) >= 2]
    if not names:
      continue
    full = {batch[k].shape[-1] for k in names}
    if len(full) != 1:
      raise ValueError(f"features {names} disagree on their sequence length: "
                       f"{ {k: batch[k].shape for k in names} }")
    full_length = full.pop()
    used = np.zeros(full_length, bool)
    for k in names:
      v = np.asarray(batch[k])
      used |= (v != 0).reshape(-1, full_length).any(axis=0)
    extent = int(np.flatnonzero(used)[-1]) + 1 if used.any() else 1
    cut = next(b for b in bucket_lengths(full_length, num_buckets) if b >= extent)
    for k in names:
      out[k] = batch[k][..., :cut]
  return out


def shard_batch(batch: Mapping[str, np.ndarray], p: partitioning.Partitioner) -> dict[str, jax.Array]:
  """Host-local numpy batch → global jax.Arrays sharded along 'data'."""
  return {
      k: jax.make_array_from_process_local_data(p.batch_sharding(v.ndim), v)
      for k, v in batch.items()
  }


def device_iterator(
    ds: tf.data.Dataset, p: partitioning.Partitioner, *, batch_size: int, prefetch: int = 2,
    length_buckets: int = 1,
) -> Iterator[dict[str, jax.Array]]:
  """Yields sharded device batches, converting ``prefetch`` batches ahead on a thread.

  length_buckets: > 1 cuts each batch's trailing padding to a bucket (`trim_padding`);
    1 keeps the dataset's full lengths.
  """
  q: queue.Queue[Any] = queue.Queue(maxsize=max(prefetch, 1))
  done = object()

  def producer():
    try:
      for batch in ds.as_numpy_iterator():
        batch = trim_padding(pad_batch(batch, batch_size), length_buckets)
        q.put(shard_batch(batch, p))
      q.put(done)
    except BaseException as e:  # surfaced in the consumer
      q.put(e)

  threading.Thread(target=producer, daemon=True).start()
  while True:
    item = q.get()
    if item is done:
      return
    if isinstance(item, BaseException):
      raise item
    yield item
