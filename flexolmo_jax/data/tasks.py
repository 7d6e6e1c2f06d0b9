"""seqio Tasks and Mixtures over prepared corpora, and the packed LM stream the trainers read.

A closed domain is registered **at run time from a path** (:func:`register_domain_task`), never
baked into code. The default vocabulary is ``seqio.ByteVocabulary`` (ids 0 pad, 1 eos, 2 unk, then
the 256 bytes; the same ids as the ByT5 tokenizer the HF export will write).

The stream (:func:`lm_batches`): tokenize, append EOS, split documents longer than the sequence
length into consecutive chunks (nothing is truncated away), pack with seqio's
``DecoderFeatureConverter`` (segment ids and positions for the model's attention mask), shard per
host with ``seqio.ShardInfo``, shuffle deterministically from a seed, batch, and resume at a step.
"""
from __future__ import annotations

import os
from typing import Iterator, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from flexolmo_jax.data import sources, tf_start, vocabularies


# TensorFlow only runs the input pipeline; it must not take accelerator memory from JAX.
try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # already initialized by the caller
  pass


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  return {"targets": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)}


@seqio.map_over_dataset
def _text_to_targets(ex):
  return {"targets": ex["text"]}


def _tokenize(dataset: tf.data.Dataset, output_features) -> tf.data.Dataset:
  """seqio's tokenize, or a vocabulary's own batched one (hf_tokenizer) where it has one."""
  vocab = output_features["targets"].vocabulary
  if hasattr(vocab, "tokenize_dataset"):
    return vocab.tokenize_dataset(dataset, "targets")
  return seqio.preprocessors.tokenize(dataset, output_features)


def split_to_length(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                    output_features=None) -> tf.data.Dataset:
  """Cuts each tokenized document into consecutive chunks of at most the target length."""
  del output_features
  length = sequence_length["targets"]

  def chunks(ex):
    tokens = ex["targets"]
    n = tf.size(tokens)
    full, rest = n // length, n % length
    lengths = tf.concat([tf.fill([full], length), tf.reshape(rest, [1])[: tf.minimum(rest, 1)]], 0)
    return tf.data.Dataset.from_tensor_slices(
        {"targets": tf.RaggedTensor.from_row_lengths(tokens, lengths)})

  return dataset.flat_map(chunks)


def _source_for(dataset_dir: str) -> seqio.DataSource:
  import tensorflow_datasets as tfds

  if not sources.is_prepared(dataset_dir):
    raise FileNotFoundError(
        f"{dataset_dir} is not a prepared dataset (no dataset_info.json / "
        f"{sources.SOURCE_RECORD}); run `flexolmo data prepare` first.")
  builder = tfds.builder_from_directory(dataset_dir)
  splits = tuple(builder.info.splits.keys())

  def dataset_fn(split, shuffle_files, seed=None):
    read_config = tfds.ReadConfig(shuffle_seed=seed)
    return builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config)

  return seqio.FunctionDataSource(
      dataset_fn, splits=splits,
      num_input_examples={s: builder.info.splits[s].num_examples for s in splits})


_TASK_DIRS: dict[str, str] = {}


def register_domain_task(name: str, dataset_dir: str,
                         vocabulary: seqio.Vocabulary | None = None) -> seqio.Task:
  """Registers (or re-registers) the Task ``name`` over a dataset prepared by sources.prepare."""
  vocabulary = vocabulary or vocabularies.load(vocabularies.BYTE)
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  _TASK_DIRS[name] = os.fspath(dataset_dir)
  return seqio.TaskRegistry.add(
      name,
      source=_source_for(os.fspath(dataset_dir)),
      preprocessors=[_text_to_targets, _tokenize, seqio.preprocessors.append_eos,
                     split_to_length],
      output_features=output_features(vocabulary),
      shuffle_buffer_size=10_000)


def train_byte_tokens(task: str) -> int:
  """Training tokens of a registered domain Task under the byte vocabulary (bytes + one EOS/doc)."""
  import json

  if task not in _TASK_DIRS:
    raise KeyError(f"Task {task!r} was not registered with register_domain_task.")
  with open(os.path.join(_TASK_DIRS[task], sources.SOURCE_RECORD)) as fh:
    stats = json.load(fh)["stats"]
  return stats["utf8_bytes"]["train"] + stats["documents"]["train"]


def register_mixture(name: str, tasks_and_rates: Sequence[tuple[str, float | str]]) -> seqio.Mixture:
  """A Mixture of registered Tasks; a rate is a number, or "tokens" (the Task's token count)."""
  rates = [(t, float(train_byte_tokens(t)) if r == "tokens" else float(r))
           for t, r in tasks_and_rates]
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, rates)


_TOKEN_FEATURES = ("decoder_input_tokens", "decoder_target_tokens")


def lm_dataset(task_or_mixture: str, *, seq_len: int, batch_size: int, split: str = "train",
               seed: int | None = 0, shuffle: bool = True, num_epochs: int | None = None,
               shard_index: int | None = None, num_shards: int | None = None,
               start_step: int = 0, drop_remainder: bool = True) -> tf.data.Dataset:
  """Packed decoder-only LM batches: decoder_{input,target}_tokens, _segment_ids, _positions,
  _loss_weights, each [batch_size, seq_len]. ``batch_size`` is this host's share.

  The shard defaults to this host: ``ShardInfo(jax.process_index(), jax.process_count())``.
  ``start_step`` skips that many batches of the same deterministic stream (exact resume).
  """
  if shard_index is None or num_shards is None:
    import jax

    shard_index, num_shards = jax.process_index(), jax.process_count()
  tf_start.trace_plainly()
  ds = seqio.get_dataset(
      task_or_mixture, task_feature_lengths={"targets": seq_len}, dataset_split=split,
      shuffle=shuffle, num_epochs=num_epochs, seed=seed, use_cached=False,
      shard_info=seqio.ShardInfo(shard_index, num_shards),
      feature_converter=seqio.DecoderFeatureConverter(pack=True))
  stand_in = getattr(seqio.get_mixture_or_task(task_or_mixture).output_features["targets"]
                     .vocabulary, "zero_stand_in", None)
  if stand_in is not None:      # a tokenizer whose id 0 is a real token (hf_tokenizer)
    ds = ds.map(lambda ex: {k: tf.where(v == stand_in, 0, v) if k in _TOKEN_FEATURES else v
                            for k, v in ex.items()})
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options).skip(start_step)


def lm_batches(task_or_mixture: str, **kwargs) -> Iterator[dict[str, np.ndarray]]:
  return lm_dataset(task_or_mixture, **kwargs).as_numpy_iterator()


def register_corpus(name: str, paths: Sequence[str], *, data_dir: str, format: str = "auto",
                    field: str = "text", vocabulary: seqio.Vocabulary | None = None,
                    require: Sequence[str] = ("train",)) -> str:
  """Registers a Task over the files at ``paths`` (prepared under ``data_dir``), or over one
  dataset directory already prepared by ``flexolmo data prepare``. Returns the Task name.

  It takes paths, not Task or Mixture names, so nothing registered by anyone else can enter the
  stream: this is how an owner's expert sees only its own data. ``require`` names the splits that
  must hold documents.
  """
  for path in paths:
    below = sources.prepared_below(os.fspath(path))
    if below is not None:
      raise sources.DataError(f"{path} holds a prepared dataset one level down; give its "
                              f"version directory: {below}")
  if len(paths) == 1 and sources.is_prepared(paths[0]):
    dataset_dir = os.fspath(paths[0])
  else:
    from flexolmo_jax import distributed

    spec = sources.SourceSpec(paths=tuple(paths), format=format, field=field)
    # Several processes share data_dir (a shared file system): process 0 builds, the others
    # then find it complete and reuse it.
    if distributed.is_leader():
      dataset_dir = sources.prepare(name, spec, data_dir, changed="rebuild")[0].data_dir
    distributed.sync(f"prepare {name} in {data_dir}")
    if not distributed.is_leader():
      dataset_dir = sources.prepare(name, spec, data_dir, changed="rebuild")[0].data_dir
  task = f"corpus_{sources.dataset_name(name)}"
  register_domain_task(task, dataset_dir, vocabulary)
  have = seqio.get_mixture_or_task(task).source.splits
  missing = [s for s in require if s not in have]
  if missing:
    raise ValueError(f"Corpus {name!r} ({', '.join(map(str, paths))}) has no {missing[0]} "
                     f"documents (splits: {list(have)}); give it more documents or a larger "
                     "validation fraction (`flexolmo data prepare --validation-fraction`).")
  return task


def has_split(task: str, split: str) -> bool:
  return split in seqio.get_mixture_or_task(task).source.splits


def owner_batches(name: str, paths: Sequence[str], *, data_dir: str, seq_len: int,
                  batch_size: int, format: str = "auto", field: str = "text", seed: int = 0,
                  shard_index: int | None = None, num_shards: int | None = None,
                  start_step: int = 0,
                  split: str = "train", num_epochs: int | None = None,
                  vocabulary: seqio.Vocabulary | None = None) -> Iterator[dict[str, np.ndarray]]:
  """The input stream of one data owner's expert, built from **only** that owner's paths."""
  task = register_corpus(name, paths, data_dir=data_dir, format=format, field=field,
                         vocabulary=vocabulary)
  return lm_batches(task, seq_len=seq_len, batch_size=batch_size, split=split, seed=seed,
                    shard_index=shard_index, num_shards=num_shards, start_step=start_step,
                    num_epochs=num_epochs)


def eval_batches(data: Mapping[str, Sequence[str]], vocabulary, data_dir: str, seq_len: int,
                 batch_size: int) -> dict:
  """{domain: validation batches} of ``{name: paths}`` data (raw paths or prepared datasets)."""
  out = {}
  for name, paths in data.items():
    task = register_corpus(name, paths, data_dir=data_dir, vocabulary=vocabulary,
                           require=("validation",))
    out[name] = lm_batches(task, seq_len=seq_len, batch_size=batch_size, split="validation",
                           shuffle=False, num_epochs=1, drop_remainder=False)
  return out
