"""``flexolmo export-hf``: a saved model as a Hugging Face checkpoint (docs/method.md §10).

A merged model becomes ``FlexOlmoForCausalLM`` over the selected experts (expert 0 is ``public``,
the rest in the model's order); a ``public`` or ``dense`` model becomes ``Olmo2ForCausalLM``. The
directory holds ``config.json``, ``generation_config.json``, the safetensors weights (sharded with
an index above ``shard_size``), the tokenizer (a ByT5-compatible one for the byte vocabulary, the
SentencePiece model otherwise) and ``flexolmo.json`` (the expert names and where they came from).

The export streams: one of our stacked leaves is restored at a time (one expert's, for expert
weights), cut into its per-layer Hugging Face tensors and written straight into the shard, whose
header was written first. It is written under ``<out>.partial-<pid>`` and renamed when complete.

The Hugging Face FlexOlmo router has no bias, so a model whose experts carry a non-zero negative
bias is refused unless ``drop_negative_bias`` is given (the reference release does the same drop;
the exported logits then differ from the model's here).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Callable, Iterator

import numpy as np

from flexolmo_jax.checkpoint import merged_model, store
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.convert import hf
from flexolmo_jax.convert.safetensors_io import ShardedWriter, parse_size
from flexolmo_jax.data import vocabularies
from flexolmo_jax.experts import PUBLIC

DTYPES = {"fp32": "F32", "bf16": "BF16"}


class Source:
  """Our leaves, one at a time, of a dense or merged model directory."""

  def __init__(self, path: str, experts=None, exclude=None, drop_negative_bias: bool = False):
    path = store.saved_dir(path)
    manifest = store.read_manifest(path)
    kind = manifest.get("kind")
    if kind == merged_model.KIND:
      self.path, self.manifest, self.cfg = merged_model.open_merged(path, experts, exclude)
      self.trunk = os.path.join(self.path, merged_model.PUBLIC_DIR)
      self.rows = merged_model.read_router(self.path)
      self._check_bias(drop_negative_bias)
      self.cfg = self.cfg.replace(negative_bias=False)
    elif kind in ("public", "dense"):
      if experts or exclude:
        raise ValueError(f"{path} is a dense model: it has no experts to select.")
      store.recorded_files(path, manifest)
      self.path = self.trunk = path
      self.manifest = manifest
      self.cfg = store.config_from_json(manifest["config"], os.path.join(path, store.MANIFEST))
    else:
      raise ValueError(f"{path} holds a {kind!r} checkpoint; export-hf takes a merged, public or "
                       "dense model.")
    self.vocabulary_dir = self.trunk

  def _check_bias(self, drop: bool) -> None:
    if not self.cfg.negative_bias or drop:
      return
    biased = [n for n in self.cfg.experts
              if np.any(self.rows.get(f"{n}/negative_bias", np.zeros(1)) != 0)]
    if biased:
      raise ValueError(
          f"Experts {biased} of {self.path} carry a negative router bias, which the Hugging Face "
          "FlexOlmo model cannot represent. Export with --drop-negative-bias (as the reference "
          "release does; routing then differs from this model's), or merge with "
          "--drop-negative-bias first.")

  def leaf(self, t: hf.Tensor, expert: int | None = None) -> np.ndarray:
    """Stacked ``[L, ...]`` (per-expert leaves: that expert's), or the unstacked global leaf."""
    shape = lambda: ((self.cfg.n_layers,) if t.layered else ()) + t.slice_shape
    if t.ours == ("blocks", "ffn", "router_embedding"):
      return np.stack([self.rows[f"{n}/router"] for n in self.cfg.experts], axis=1)
    if t.per_expert:
      name = self.cfg.experts[expert]
      if name == PUBLIC:
        path, leaf = self.trunk, ("blocks", "ffn", merged_model.DENSE_FFN[t.ours[-1]])
      else:
        path, leaf = os.path.join(self.path, merged_model.EXPERTS_DIR, name), (t.ours[-1],)
      return store.restore_leaves(path, {leaf: shape()})[leaf]
    return store.restore_leaves(self.trunk, {t.ours: shape()})[t.ours]


def vocabulary_files(source: Source, out_dir: str) -> tuple[int, int, int | None]:
  """Writes the tokenizer files; returns (pad, eos, bos) ids. Refuses a vocabulary the model's
  embedding cannot represent."""
  spec = source.manifest["vocabulary"]["spec"]
  cfg = source.cfg
  if spec == "byte":
    size = hf.BYTE_OFFSET + 256
    files, ids = hf.byte_tokenizer_files(cfg.max_seq_len), (0, 1, None)
  elif vocabularies.kind(spec) == "tokenizer":
    # A Hugging Face tokenizer goes back as it came: its files, unchanged.
    vocab = vocabularies.load(os.path.join(source.vocabulary_dir, spec))
    size, files = vocab.vocab_size, {}
    for name, path in vocabularies.saved_files(vocab.path)[1].items():
      shutil.copyfile(path, os.path.join(out_dir, name))
    pad = vocab.tokenizer_pad_id
    ids = (vocab.eos_id if pad is None else pad, vocab.eos_id, vocab.bos_id)
  else:
    import sentencepiece as spm

    model_file = os.path.join(source.vocabulary_dir, spec)
    sp = spm.SentencePieceProcessor(model_file=model_file)
    size = sp.get_piece_size()
    shutil.copyfile(model_file, os.path.join(out_dir, "tokenizer.model"))
    pad = sp.pad_id() if sp.pad_id() >= 0 else 0
    files = {"tokenizer_config.json": {"tokenizer_class": "T5Tokenizer", "extra_ids": 0,
                                       "model_max_length": cfg.max_seq_len,
                                       "legacy": False}}
    ids = (pad, sp.eos_id(), sp.bos_id() if sp.bos_id() >= 0 else None)
  if size > cfg.vocab_size:
    raise ValueError(f"The vocabulary ({spec}) has {size} ids but the model's embedding has "
                     f"{cfg.vocab_size} rows: the model cannot represent it.")
  for name, content in files.items():
    with open(os.path.join(out_dir, name), "w") as fh:
      json.dump(content, fh, indent=2)
  return ids


def hf_tensors(source: Source, tmap, dtype) -> Iterator[tuple[str, np.ndarray]]:
  """(name, contiguous tensor in ``dtype``) in plan order, one of our leaves restored at a time."""
  cfg = source.cfg
  for t in tmap:
    for e in (range(cfg.num_experts) if t.per_expert else [None]):
      leaf = source.leaf(t, e)
      for name, piece in zip(t.names(cfg, e), leaf if t.layered else [leaf]):
        yield name, np.ascontiguousarray(t.to_hf(piece), dtype=dtype)
      del leaf


def export_hf(model: str, out: str, *, experts=None, exclude=None, dtype: str = "fp32",
              shard_size: str | int = "5GB", drop_negative_bias: bool = False,
              overwrite: bool = False, progress: Callable[[str], None] = print) -> str:
  """Writes the Hugging Face checkpoint of ``model``; returns its directory."""
  if dtype not in DTYPES:
    raise ValueError(f"export dtype {dtype!r}: choose one of {sorted(DTYPES)}.")
  shard_bytes = parse_size(shard_size)
  source = Source(model, experts, exclude, drop_negative_bias)
  cfg: ModelConfig = source.cfg
  tmap = hf.tensor_map(cfg)
  plan = [(name, t.hf_shape) for t in tmap for name in t.names(cfg)]
  out, partial = store.begin(out, overwrite)
  try:
    pad, eos, bos = vocabulary_files(source, partial)
    config = hf.config_to_hf(cfg, pad_id=pad, eos_id=eos, bos_id=bos, dtype=dtype)
    writer = ShardedWriter(partial, plan, DTYPES[dtype], shard_bytes)
    progress(f"export-hf: {config['architectures'][0]} ({', '.join(cfg.experts) or 'dense'}), "
             f"{len(plan)} tensors, {writer.total_bytes / 1e6:,.1f} MB in "
             f"{len(writer.files)} file(s)")
    start, shown = time.perf_counter(), time.perf_counter()
    for name, tensor in hf_tensors(source, tmap, writer.dtype):
      writer.add(name, tensor)
      if time.perf_counter() - shown > 10:
        shown = time.perf_counter()
        progress(f"  {writer.written / 1e6:,.0f} / {writer.total_bytes / 1e6:,.0f} MB")
    writer.close()
    generation = {"pad_token_id": pad, "eos_token_id": eos, "bos_token_id": bos,
                  "do_sample": False}
    record = {"experts": list(cfg.experts), "source": os.path.abspath(source.path),
              "kind": source.manifest["kind"], "vocabulary": source.manifest["vocabulary"],
              "anchor_fingerprint": source.manifest.get("anchor_fingerprint",
                                                        source.manifest.get("fingerprint")),
              "negative_bias_dropped": bool(drop_negative_bias)}
    for name, content in ((hf.CONFIG, config), ("generation_config.json", generation),
                          (hf.NAMES_FILE, record)):
      with open(os.path.join(partial, name), "w") as fh:
        json.dump(content, fh, indent=2)
    store.publish(partial, out)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  seconds = time.perf_counter() - start
  progress(f"Hugging Face checkpoint -> {out} ({writer.written / 1e6:,.1f} MB in {seconds:.1f} s)")
  return out
