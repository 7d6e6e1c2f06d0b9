"""Merge throughput and memory against a plain file copy of the same bytes, in the same run.

Builds a public "small" model (~110M parameters, random weights) and N expert artifacts
(random FFNs, router rows and biases, manifests as train-expert writes them), then times

- ``merge.merge`` in a fresh child process (interpreter start-up and imports not timed; the
  child reports its own peak RSS, imports included), and
- ``shutil.copytree`` of exactly the input directories (the reference),

alternately, best of ``--reps``. Prints bytes written per second for both, their ratio (target
>= 0.5), and the merge's peak RSS against the merged model's size (target < 2x).

    python bench/merge.py [--experts 8] [--reps 3] [--workdir /tmp/flexolmo_merge_bench]
"""
from __future__ import annotations

import os
import platform
import shutil
import time

import benchlib
import jax
import numpy as np

from flexolmo_jax.checkpoint import store
from flexolmo_jax.config import load_model_config
from flexolmo_jax.experts import PUBLIC
from flexolmo_jax.flexolmo import merge, router_init
from flexolmo_jax.model.transformer import pure_model


def build_inputs(workdir: str, n_experts: int) -> tuple[str, list[str]]:
  cfg = load_model_config("small")
  public = os.path.join(workdir, "public")
  rng = np.random.default_rng(0)
  if not os.path.exists(os.path.join(public, store.MANIFEST)):
    os.makedirs(workdir, exist_ok=True)
    params = jax.device_get(pure_model(cfg).init(0))
    manifest = {"kind": "public", "config": store.config_to_json(cfg),
                "vocabulary": {"spec": "byte", "kind": "byte", "size": 259},
                "fingerprint": store.fingerprint(params), "data_card": {"domain": "public"}}
    embedding = os.path.join(workdir, router_init.EMBEDDING_FILE)
    np.savez(embedding, shared=0.02 * rng.standard_normal(cfg.d_model, np.float32))
    store.save(public, params, manifest, extra_files={router_init.EMBEDDING_FILE: embedding})
  manifest = store.read_manifest(public)
  r_pub = router_init.public_rows("shared", public, manifest["fingerprint"], cfg.n_layers,
                                  cfg.d_model)
  paths = []
  for i in range(n_experts):
    name = f"owner{i}"
    path = os.path.join(workdir, "experts", name)
    paths.append(path)
    if os.path.exists(os.path.join(path, store.MANIFEST)):
      continue
    L, d, f = cfg.n_layers, cfg.d_model, cfg.d_ff
    normal = lambda *shape: (0.02 * rng.standard_normal(shape, np.float32))
    params = {"w_gate": normal(L, d, f), "w_up": normal(L, d, f), "w_down": normal(L, f, d),
              "router": normal(L, d), "negative_bias": np.zeros((L,), np.float32)}
    ecfg = cfg.replace(experts=(PUBLIC, name), top_k=2, negative_bias=True)
    store.save(path, params, {
        "kind": "expert", "name": name, "anchor_fingerprint": manifest["fingerprint"],
        "config": store.config_to_json(ecfg), "vocabulary": manifest["vocabulary"],
        "public_router_fingerprint": merge.router_fingerprint(r_pub),
        "data_card": {"domain": name, "expert_config": {"router_init": "shared"}}})
  return public, paths


def dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


CHILD = """
import json, resource, sys, time
from flexolmo_jax.flexolmo import merge
public, out, *experts = sys.argv[1:]
start = time.perf_counter()
merge.merge(public, experts, out, progress=lambda msg: None)
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def timed_merge(public: str, experts: list[str], out: str) -> tuple[float, int]:
  """(seconds of merge.merge, the child's peak RSS in bytes) in a fresh process."""
  shutil.rmtree(out, ignore_errors=True)
  record = benchlib.run_child(CHILD, public, out, *experts)
  return record["seconds"], record["peak_rss"]


def timed_copy(sources: list[str], out: str) -> float:
  shutil.rmtree(out, ignore_errors=True)
  os.sync()
  start = time.perf_counter()
  for i, src in enumerate(sources):
    shutil.copytree(src, os.path.join(out, str(i)))
  return time.perf_counter() - start


def main():
  args = benchlib.parser(__doc__, 8, "/tmp/flexolmo_merge_bench").parse_args()
  if args.build_only:
    build_inputs(args.workdir, args.experts)
    return
  benchlib.build_in_child(__file__, args)
  public = os.path.join(args.workdir, "public")
  experts = [os.path.join(args.workdir, "experts", f"owner{i}") for i in range(args.experts)]
  out, copy_out = os.path.join(args.workdir, "merged"), os.path.join(args.workdir, "copy")
  merge_s, copy_s, peaks = [], [], []
  for _ in range(args.reps):
    copy_s.append(timed_copy([public, *experts], copy_out))
    seconds, peak = timed_merge(public, experts, out)
    merge_s.append(seconds)
    peaks.append(peak)
  written, copied = dir_bytes(out), dir_bytes(copy_out)
  cfg = store.config_from_json(store.read_manifest(out)["config"], out)
  merged_params = 4 * cfg.num_params()   # fp32
  print(f"machine: {platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}")
  print(f"merged model: public 'small' + {args.experts} experts = {merged_params / 1e9:.2f} GB "
        f"of parameters, {written / 1e9:.2f} GB on disk")
  mb, cb = written / min(merge_s), copied / min(copy_s)
  print(f"merge (merge.merge in a fresh process): best {min(merge_s):.2f} s, {mb / 1e9:.2f} GB/s")
  print(f"plain copy (shutil.copytree):          best {min(copy_s):.2f} s, {cb / 1e9:.2f} GB/s")
  print(f"merge / copy throughput: {mb / cb:.2f}x (target >= 0.5)")
  print(f"merge peak RSS: {max(peaks) / 1e9:.2f} GB = {max(peaks) / merged_params:.2f}x the merged "
        "model (target < 2)")
  shutil.rmtree(copy_out, ignore_errors=True)


if __name__ == "__main__":
  main()
