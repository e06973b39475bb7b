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


def shard_batch(batch: Mapping[str, np.ndarray], p: partitioning.Partitioner) -> dict[str, jax.Array]:
  """Host-local numpy batch → global jax.Arrays sharded along 'data'."""
  return {
      k: jax.make_array_from_process_local_data(p.batch_sharding(v.ndim), v)
      for k, v in batch.items()
  }


def device_iterator(
    ds: tf.data.Dataset, p: partitioning.Partitioner, *, batch_size: int, prefetch: int = 2
) -> Iterator[dict[str, jax.Array]]:
  """Yields sharded device batches, converting ``prefetch`` batches ahead on a thread."""
  q: queue.Queue[Any] = queue.Queue(maxsize=max(prefetch, 1))
  done = object()

  def producer():
    try:
      for batch in ds.as_numpy_iterator():
        q.put(shard_batch(pad_batch(batch, batch_size), p))
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
