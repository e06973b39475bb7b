"""SeqIO datasets → sharded global jax.Arrays for the trainer.

`DatasetConfig` mirrors `t5x.utils.DatasetConfig` field for field, so the same gin
bindings (``train/utils.DatasetConfig.mixture_or_task_name = %MIXTURE_OR_TASK_NAME``)
describe the data for both trainers.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
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


def sequence_extents(batch: Mapping[str, np.ndarray]) -> dict[str, tuple[int, int]]:
  """``{group: (L, e)}`` for each sequence group present in ``batch``.

  The groups are the ``encoder_*`` and the ``decoder_*`` features; each group's last axis
  (length L) is its sequence axis, and e = 1 + the last position where ANY of its
  features is nonzero in any row (1 if all are zero).
  """
  out = {}
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
    out[prefix] = (full_length, int(np.flatnonzero(used)[-1]) + 1 if used.any() else 1)
  return out


def trim_padding(
    batch: Mapping[str, np.ndarray], num_buckets: int, needed: Mapping[str, int] | None = None,
    *, extents: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, np.ndarray]:
  """Cuts each sequence group's trailing padding down to the smallest bucket that fits.

  A group of length L (`sequence_extents`) keeps
  ``min{b ∈ bucket_lengths(L, n) : b ≥ e}`` positions, so only all-zero (padding)
  positions are ever dropped. For a T5 model that is exact: padding keys are masked,
  padding targets weigh 0 and relative position biases do not depend on the padded
  length, so loss and gradients equal the full-length batch's up to float summation
  order (`tests/test_input_pipeline.py`). Other features pass unchanged.

  needed: ``{group: e}`` to cut for instead of this batch's own extents (several
    processes: the max over their slices, `HostBatchAgreement`); each must be at least
    the batch's own.
  extents: this batch's `sequence_extents`, where the caller has them already.

  Fewer positions is less work (the encoder's cost grows with Li, its attention with Li²);
  each distinct shape is one more compile of the step, so ``num_buckets`` bounds them at
  ``num_buckets`` per group. T5X always pads to the full length (``num_buckets = 1``).
  """
  if num_buckets <= 1:
    return dict(batch)
  if extents is None:
    extents = sequence_extents(batch)
  out = dict(batch)
  for prefix, (full_length, own) in extents.items():
    extent = own if needed is None else needed[prefix]
    if extent < own:
      raise ValueError(f"cannot cut the {prefix}* features to {extent} positions: this batch "
                       f"has tokens up to position {own}")
    cut = next(b for b in bucket_lengths(full_length, num_buckets) if b >= extent)
    for k in batch:
      if k.startswith(prefix) and np.ndim(batch[k]) >= 2:
        out[k] = batch[k][..., :cut]
  return out


def can_agree_across_hosts() -> bool:
  """Whether this run has the distributed runtime `HostBatchAgreement` talks through."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client is not None


class HostBatchAgreement:
  """Agrees across processes on each global batch: whether there is one, and its lengths.

  Multi-host runs give every process its own slice of the global batch
  (``jax.make_array_from_process_local_data``), so all processes must feed the same
  number of batches, each cut to the same lengths. A call per batch publishes this
  process's sequence extents (`sequence_extents`; None once its data has ended) in the
  key-value store of jax's distributed runtime (``jax.distributed.initialize``; host to
  host, no device computation, so it may run on the input thread while steps run) and
  reads every other process's. It returns the max extents over the processes that still
  have data; those whose data has ended feed all-padding slices (weight 0: T5X's eval
  sharding leaves hosts with different numbers of examples) until every process's has;
  then it returns None, and each process removes its last key once every process has
  read it (a barrier), so that nothing of the agreement stays in the store. Calls are
  numbered: every process must make them in the same order (one per batch of the same
  iterator), which the trainer's identical loop on each host guarantees.

  name: unique per iterator among those alive in the run (e.g. 'train', 'eval/1000').
  timeout_s: how long to wait for a slower process before failing with an error that
    names it.
  """

  def __init__(self, name: str, *, timeout_s: float = 600.0):
    if not can_agree_across_hosts():
      raise RuntimeError("HostBatchAgreement needs jax.distributed.initialize() "
                         "(several processes without a distributed runtime)")
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    self._client = distributed.global_state.client  # as orbax's and jax's multi-host code
    self._name = name
    self._timeout_ms = int(timeout_s * 1000)
    self._index = jax.process_index()
    self._count = jax.process_count()
    self._calls = 0

  def _key(self, call: int, process: int | str) -> str:
    return f"slic_jax/batch_agreement/{self._name}/{call}/{process}"

  def __call__(self, extents: Mapping[str, int] | None) -> dict[str, int] | None:
    call = self._calls
    self._calls += 1
    mine = None if extents is None else dict(extents)
    self._client.key_value_set(self._key(call, self._index), json.dumps(mine, sort_keys=True))
    agreed = mine
    for other in range(self._count):
      if other == self._index:
        continue
      try:
        theirs = json.loads(self._client.blocking_key_value_get(
            self._key(call, other), self._timeout_ms))
      except Exception as e:  # the runtime raises its own status errors
        raise RuntimeError(
            f"batch agreement '{self._name}', batch {call}: process {other} did not publish "
            f"its batch within {self._timeout_ms / 1000:.0f} s ({e}); every process must run "
            "the same input pipeline") from e
      if theirs is None:
        continue
      if agreed is not None and set(theirs) != set(agreed):
        raise ValueError(f"batch agreement '{self._name}', batch {call}: process {other} has "
                         f"sequence groups {sorted(theirs)}, another {sorted(agreed)}")
      agreed = theirs if agreed is None else {k: max(v, theirs[k]) for k, v in agreed.items()}
    if call > 0:
      # Every process has published batch `call`, so all have read batch `call - 1`.
      self._client.key_value_delete(self._key(call - 1, self._index))
    if agreed is None:
      # The last call: no later one tells that the others have read this one, so wait for
      # them here (every process makes this call and reaches this line), then leave the
      # store as it was before the first call.
      self._client.wait_at_barrier(self._key(call, 'end'), self._timeout_ms)
      self._client.key_value_delete(self._key(call, self._index))
    return agreed


def empty_batch(element_spec: Mapping[str, tf.TensorSpec], batch_size: int) -> dict[str, np.ndarray]:
  """An all-padding batch (every weight 0) shaped as the dataset's batches."""
  out = {}
  for k, spec in element_spec.items():
    shape = (batch_size,) + tuple(spec.shape[1:])
    if any(d is None for d in shape):
      raise ValueError(f"feature {k!r} has no fixed shape ({spec.shape}) to pad a batch to")
    out[k] = np.zeros(shape, spec.dtype.as_numpy_dtype)
  return out


def shard_batch(batch: Mapping[str, np.ndarray], p: partitioning.Partitioner) -> dict[str, jax.Array]:
  """Host-local numpy batch → global jax.Arrays sharded along 'data'."""
  return {
      k: jax.make_array_from_process_local_data(p.batch_sharding(v.ndim), v)
      for k, v in batch.items()
  }


def device_iterator(
    ds: tf.data.Dataset, p: partitioning.Partitioner, *, batch_size: int, prefetch: int = 2,
    length_buckets: int = 1, agreement: HostBatchAgreement | None = None,
) -> Iterator[dict[str, jax.Array]]:
  """Yields sharded device batches, converting ``prefetch`` batches ahead on a thread.

  length_buckets: > 1 cuts each batch's trailing padding to a bucket (`trim_padding`);
    1 keeps the dataset's full lengths.
  agreement: with several processes, a `HostBatchAgreement`: all processes yield the
    same number of batches, each cut to the same lengths.
  """
  q: queue.Queue[Any] = queue.Queue(maxsize=max(prefetch, 1))
  done = object()

  def producer():
    try:
      local = ds.as_numpy_iterator()
      while True:
        batch = next(local, None)
        if batch is not None:
          batch = pad_batch(batch, batch_size)
        if agreement is None:
          if batch is None:
            break
          batch = trim_padding(batch, length_buckets)
        else:
          extents = None if batch is None else sequence_extents(batch)
          needed = agreement(None if extents is None else {
              prefix: e for prefix, (_, e) in extents.items()})
          if needed is None:  # every process's data has ended
            break
          if batch is None:  # this one's has: all padding, weight 0
            batch = empty_batch(ds.element_spec, batch_size)
          batch = trim_padding(batch, length_buckets, needed, extents=extents)
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
