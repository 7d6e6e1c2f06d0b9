"""Router initialization and expert training, measured on a demo's public model and FlexMix-mini.

For each variant (a set of gin bindings for `train-expert`), every owner of the demo trains its
expert again, alone, with the demo's own settings; the experts are merged with no router tuning
and the merged model is evaluated on every domain. Printed per variant: the merged model's loss
on each domain and on average, against the public model's and against oracle routing (each
closed domain scored by `public + its own expert`, the public domain by the public model), and
each domain's mean router probability of its own expert and the largest other one.

    python bench/router_sweep.py WORKDIR [--variant NAME=BINDING[,BINDING...]] [--steps 200]

WORKDIR is a finished `flexolmo demo --quick` (or default) work directory. With no --variant the
sweep below runs. Results go to WORKDIR/router_sweep/NAME/ and WORKDIR/router_sweep/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# name -> gin bindings of train-expert (ExpertConfig, TrainConfig).
SWEEP = {
    "paper": [],
    "router held": ["flexolmo.TrainConfig.router_lr_scale=0.0"],
    "x4, held": ["flexolmo.ExpertConfig.router_init_scale=4.0",
                 "flexolmo.TrainConfig.router_lr_scale=0.0"],
    "x4, router lr 0.1": ["flexolmo.ExpertConfig.router_init_scale=4.0",
                          "flexolmo.TrainConfig.router_lr_scale=0.1"],
    "x16, held": ["flexolmo.ExpertConfig.router_init_scale=16.0",
                  "flexolmo.TrainConfig.router_lr_scale=0.0"],
    "orthogonal x4, held": ["flexolmo.ExpertConfig.router_init_scale=4.0",
                            "flexolmo.ExpertConfig.router_init_orthogonal=True",
                            "flexolmo.TrainConfig.router_lr_scale=0.0"],
    "orthogonal x16, held": ["flexolmo.ExpertConfig.router_init_scale=16.0",
                             "flexolmo.ExpertConfig.router_init_orthogonal=True",
                             "flexolmo.TrainConfig.router_lr_scale=0.0"],
    "classifier, held": ["flexolmo.ExpertConfig.router_init='classifier'",
                         "flexolmo.TrainConfig.router_lr_scale=0.0"],
    "classifier": ["flexolmo.ExpertConfig.router_init='classifier'"],
    "classifier odds 1, held": ["flexolmo.ExpertConfig.router_init='classifier'",
                                "flexolmo.ExpertConfig.router_public_odds=1.0",
                                "flexolmo.TrainConfig.router_lr_scale=0.0"],
    "classifier odds 16, held": ["flexolmo.ExpertConfig.router_init='classifier'",
                                 "flexolmo.ExpertConfig.router_public_odds=16.0",
                                 "flexolmo.TrainConfig.router_lr_scale=0.0"],
}
CLOSED = ("code", "prose", "legal", "math")


def flexolmo(*argv: str) -> str:
  run = subprocess.run([sys.executable, "-m", "flexolmo_jax.cli", *argv], capture_output=True,
                       text=True)
  if run.returncode:
    raise SystemExit(f"flexolmo {' '.join(argv)} failed:\n{run.stderr[-3000:]}")
  return run.stdout


def demo_flags(workdir: str, domain: str) -> list[str]:
  """The demo's own train-expert command for ``domain`` (from its run's config.gin)."""
  with open(os.path.join(workdir, "experts", domain, "config.gin")) as fh:
    gin_text = fh.read()
  get = lambda macro: next(line.split("=", 1)[1].strip() for line in gin_text.splitlines()
                           if line.startswith(f"{macro} ="))
  return ["--steps", get("STEPS"), "--warmup", get("WARMUP_STEPS"), "--lr", get("LEARNING_RATE"),
          "--batch-size", get("BATCH_SIZE"), "--seq-len", get("SEQ_LEN"), "--seed", get("SEED")]


def run_variant(workdir: str, name: str, bindings: list[str], card: dict) -> dict:
  out = os.path.join(workdir, "router_sweep", name.replace(" ", "_").replace(",", ""))
  started = time.time()
  experts = []
  for domain in CLOSED:
    run = os.path.join(out, "experts", domain)
    if not os.path.exists(os.path.join(run, "expert", "manifest.json")):
      flexolmo("train-expert", "--public", os.path.join(workdir, "public"), "--name", domain,
               "--data", card["domains"][domain]["dataset_dir"], "--out", run,
               *demo_flags(workdir, domain), *[f"--gin.{b}" for b in bindings])
    experts += ["--expert", run]
  merged = os.path.join(out, "merged")
  if not os.path.exists(os.path.join(merged, "manifest.json")):
    flexolmo("merge", "--public", os.path.join(workdir, "public"), *experts, "--out", merged,
             "--top-k", str(1 + len(CLOSED)))        # every expert active, as the demo merges
  report = os.path.join(out, "eval.json")
  flexolmo("eval", "--model", merged, "--flexmix", os.path.join(workdir, "flexmix_mini"),
           *[a for d in (*CLOSED, "public") for a in ("--data", d)], "--seq-len", "128",
           "--routing", "--json", report)
  with open(report) as fh:
    result = json.load(fh)
  losses = {d: result[d]["loss"] for d in (*CLOSED, "public")}
  names = result["routing"]["experts"]
  routing = {}
  for d in CLOSED:
    probs = dict(zip(names, [sum(p) / len(p) for p in zip(*result["routing"]["domains"][d]["probs"])]))
    others = {k: v for k, v in probs.items() if k not in (d, "public")}
    routing[d] = {"own": probs[d], "public": probs["public"], "best other": max(others.values()),
                  "own leads": probs[d] > max(others.values())}
  return {"bindings": bindings, "losses": {**losses, "average": sum(losses.values()) / 5},
          "routing": routing, "seconds": round(time.time() - started, 1)}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("workdir")
  p.add_argument("--variant", action="append", help="NAME=BINDING[,BINDING...] (repeat)")
  args = p.parse_args()
  workdir = os.path.abspath(args.workdir)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from flexolmo_jax.data import flexmix_mini

  card = flexmix_mini.read_card(os.path.join(workdir, "flexmix_mini"))
  with open(os.path.join(workdir, "report.json")) as fh:
    demo = json.load(fh)["losses"]
  public = {d: demo["public"][d] for d in (*CLOSED, "public")}
  oracle = {**{d: demo[f"public + {d}"][d] for d in CLOSED}, "public": public["public"]}
  ref = {"public": {**public, "average": sum(public.values()) / 5},
         "oracle routing": {**oracle, "average": sum(oracle.values()) / 5}}
  variants = SWEEP if not args.variant else {
      v.split("=", 1)[0]: [b for b in v.split("=", 1)[1].split(",") if b] for v in args.variant}
  results = {}
  for name, bindings in variants.items():
    results[name] = run_variant(workdir, name, bindings, card)
    r = results[name]
    print(f"{name:>20}: average {r['losses']['average']:.4f} (public "
          f"{ref['public']['average']:.4f}, oracle {ref['oracle routing']['average']:.4f})  "
          + "  ".join(f"{d} {r['losses'][d]:.3f} own {r['routing'][d]['own']:.2f}/"
                      f"{r['routing'][d]['best other']:.2f}" for d in CLOSED)
          + f"  ({r['seconds']:.0f} s)", flush=True)
  path = os.path.join(workdir, "router_sweep", "results.json")
  if os.path.exists(path):                      # earlier sweeps' variants are kept
    with open(path) as fh:
      results = {**json.load(fh)["variants"], **results}
  with open(path, "w") as fh:
    json.dump({"reference": ref, "variants": results}, fh, indent=1)
  print(f"-> {path}")


if __name__ == "__main__":
  main()
