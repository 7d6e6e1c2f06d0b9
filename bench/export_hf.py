"""export-hf memory and speed against safetensors writing the same bytes from numpy, same run.

Builds a merged "small" model (public + ``--experts`` random experts, 4 experts in all by
default, as the FlexOlmo tests use), then, alternately and best of ``--reps``, in fresh child
processes:

- ``export.export_hf`` (Orbax leaves restored one at a time, streamed into the safetensors
  shards); the child reports its peak RSS, imports included;
- the reference: ``safetensors.numpy.save_file`` of exactly the exported tensors, already in
  memory as numpy arrays (only the write is timed).

Prints bytes written per second for both, their ratio, and the export's peak RSS against the
model's size (target < 1.5x).

    python bench/export_hf.py [--experts 3] [--reps 3] [--dtype fp32] [--workdir DIR]
"""
from __future__ import annotations

import os
import platform
import shutil

import benchlib
import numpy as np

from flexolmo_jax.checkpoint import store
from flexolmo_jax.config import load_model_config
from flexolmo_jax.experts import PUBLIC
from flexolmo_jax.flexolmo import merge
from flexolmo_jax.model.transformer import pure_model


def build(workdir: str, n_experts: int) -> str:
  out = os.path.join(workdir, "merged")
  if os.path.exists(os.path.join(out, store.MANIFEST)):
    return out
  names = (PUBLIC, *(f"owner{i}" for i in range(n_experts)))
  cfg = load_model_config("small").replace(experts=names, top_k=2, top_k_policy="clamp")
  rng = np.random.default_rng(0)
  params = {}
  for path, leaf in store.flatten(pure_model(cfg).abstract.to_pure_dict()).items():
    node = params
    *parents, last = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = (0.02 * rng.standard_normal(leaf.shape, np.float32)
                  if "norm" not in path else np.ones(leaf.shape, np.float32))
  merge.save_moe(out, cfg, params, vocabulary={"spec": "byte", "kind": "byte", "size": 259},
                 progress=lambda _: None)
  return out


CHILD_EXPORT = """
import json, resource, sys, time
from flexolmo_jax.convert import export
model, out, dtype = sys.argv[1:]
start = time.perf_counter()
export.export_hf(model, out, dtype=dtype, overwrite=True, progress=lambda msg: None)
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

CHILD_REFERENCE = """
import json, os, sys, time
from safetensors.numpy import load_file, save_file
from flexolmo_jax.convert.safetensors_io import TensorReader
src, out = sys.argv[1:]
reader = TensorReader(src)
tensors = {name: reader.get(name) for name in sorted(reader.names())}
os.makedirs(out, exist_ok=True)
start = time.perf_counter()
save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


CHILD_NAIVE = """
import json, os, resource, sys, time
import numpy as np
from safetensors.numpy import save_file
from flexolmo_jax.checkpoint import merged_model
from flexolmo_jax.convert import hf
from flexolmo_jax.flexolmo import merge
model, out = sys.argv[1:]
start = time.perf_counter()
cfg, params = merged_model.load_merged(model)
cfg = cfg.replace(negative_bias=False)
tensors = {}
for t in hf.tensor_map(cfg):
  node = params
  for key in t.ours:
    node = node[key]
  stacked = [node] if not t.layered else node
  if t.per_expert:
    stacked = [node[:, e] for e in range(cfg.num_experts)]
    for e, leaf in enumerate(stacked):
      for name, piece in zip(t.names(cfg, e), leaf):
        tensors[name] = np.ascontiguousarray(t.to_hf(piece))
  else:
    for name, piece in zip(t.names(cfg), stacked):
      tensors[name] = np.ascontiguousarray(t.to_hf(piece))
os.makedirs(out, exist_ok=True)
save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def weight_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
             if f.endswith(".safetensors"))


def main():
  p = benchlib.parser(__doc__, 3, "/tmp/flexolmo_export_bench")
  p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
  args = p.parse_args()
  if args.build_only:
    build(args.workdir, args.experts)
    return
  benchlib.build_in_child(__file__, args)
  model = os.path.join(args.workdir, "merged")
  hf_out, ref_out = os.path.join(args.workdir, "hf"), os.path.join(args.workdir, "reference")
  export_s, ref_s, naive_s, peaks, naive_peaks = [], [], [], [], []
  for _ in range(args.reps):
    record = benchlib.run_child(CHILD_EXPORT, model, hf_out, args.dtype)
    export_s.append(record["seconds"])
    peaks.append(record["peak_rss"])
    shutil.rmtree(ref_out, ignore_errors=True)
    ref_s.append(benchlib.run_child(CHILD_REFERENCE, hf_out, ref_out)["seconds"])
    if args.dtype == "fp32":
      shutil.rmtree(ref_out, ignore_errors=True)
      record = benchlib.run_child(CHILD_NAIVE, model, ref_out)
      naive_s.append(record["seconds"])
      naive_peaks.append(record["peak_rss"])
  cfg = store.config_from_json(store.read_manifest(model)["config"], model)
  model_bytes = 4 * cfg.num_params()     # fp32 parameters
  written, reference = weight_bytes(hf_out), weight_bytes(ref_out)
  import jax
  print(f"machine: {platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}")
  print(f"model: 'small', {cfg.num_experts} experts = {model_bytes / 1e9:.2f} GB of fp32 "
        f"parameters; exported {args.dtype}: {written / 1e9:.2f} GB of safetensors")
  eb, rb = written / min(export_s), reference / min(ref_s)
  print(f"export-hf (from the Orbax checkpoint, fresh process): best {min(export_s):.2f} s, "
        f"{eb / 1e9:.2f} GB/s")
  print(f"safetensors.numpy.save_file (tensors already in memory): best {min(ref_s):.2f} s, "
        f"{rb / 1e9:.2f} GB/s")
  print(f"export / save_file throughput: {eb / rb:.2f}x")
  if naive_s:
    print(f"whole-model converter (restore all, transpose, save_file): best {min(naive_s):.2f} s, "
          f"{written / min(naive_s) / 1e9:.2f} GB/s, peak RSS {max(naive_peaks) / 1e9:.2f} GB = "
          f"{max(naive_peaks) / model_bytes:.2f}x the model; export / it: "
          f"{min(naive_s) / min(export_s):.2f}x the speed")
  print(f"export peak RSS: {max(peaks) / 1e9:.2f} GB = {max(peaks) / model_bytes:.2f}x the model "
        "(target < 1.5)")
  shutil.rmtree(ref_out, ignore_errors=True)


if __name__ == "__main__":
  main()
