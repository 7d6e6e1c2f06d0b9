"""What verifying a saved model costs when it is loaded: the SHA-256 of every file against the
load itself, in the same run.

Saves a public "small" model (~114M parameters, random weights, fp32), then times, best of
``--reps``:

- ``store.read_manifest(verify=True)`` (hash every file; what every load does by default),
- ``store.read_manifest(verify=False)`` (sizes only: ``--no-verify``),
- ``store.load_params`` (the Orbax restore a command does next),
- ``store.check_fingerprint`` (the public model's fingerprint recomputed from its parameters,
  one leaf at a time, as ``merge`` does).

Prints each time and the verification's cost relative to the load.

    python bench/load_verify.py [--model small] [--reps 3] [--workdir /tmp/flexolmo_verify_bench]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import jax

from flexolmo_jax.checkpoint import store
from flexolmo_jax.config import load_model_config
from flexolmo_jax.model.transformer import pure_model


def best(fn, reps: int) -> float:
  times = []
  for _ in range(reps):
    store._verified.clear()      # pylint: disable=protected-access  (time a first load each rep)
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="small")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--workdir", default="/tmp/flexolmo_verify_bench")
  args = p.parse_args()
  cfg = load_model_config(args.model)
  path = os.path.join(args.workdir, args.model)
  if not os.path.exists(os.path.join(path, store.MANIFEST)):
    params = jax.device_get(pure_model(cfg).init(0))
    store.save(path, params, {"kind": "public", "config": store.config_to_json(cfg),
                              "vocabulary": {"spec": "byte", "kind": "byte", "size": 259},
                              "fingerprint": store.fingerprint(params), "data_card": {}},
               overwrite=True)
  manifest = store.read_manifest(path, verify=False)
  size = sum(info["bytes"] for info in manifest[store.FILES].values())
  hashed = best(lambda: store.read_manifest(path, verify=True), args.reps)
  sizes = best(lambda: store.read_manifest(path, verify=False), args.reps)
  loaded = best(lambda: jax.block_until_ready(store.load_params(path)), args.reps)
  fingerprint = best(lambda: store.check_fingerprint(path, manifest), args.reps)
  print(f"# load verification: {args.model} ({size / 1e6:,.0f} MB in {len(manifest['files'])} "
        f"files), host={platform.machine()} cores={os.cpu_count()} jax={jax.__version__}")
  print(f"verify (sha256 of every file) {hashed:7.3f} s  {size / hashed / 1e9:5.2f} GB/s")
  print(f"sizes only (--no-verify)      {sizes:7.3f} s")
  print(f"load_params                   {loaded:7.3f} s")
  print(f"fingerprint recomputed        {fingerprint:7.3f} s")
  print(f"verified load / plain load: {(hashed + loaded) / (sizes + loaded):.2f}x "
        f"(verification adds {hashed / loaded:.2f}x the load time)")


if __name__ == "__main__":
  main()
