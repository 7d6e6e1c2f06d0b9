"""Tiny well-formed artifacts made once per test session (random weights, written through
``store`` as the commands write them), and the in-process CLI helpers of the hostile-input
tests."""
import functools
import json
import os
from unittest import mock

import jax
import numpy as np

from flexolmo_jax import cli, sharding
from tests.helpers import save_random_public

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
ONE_DEVICE = functools.partial(sharding.make_mesh, devices=jax.devices()[:1])


def flexolmo(capsys, *argv) -> tuple[int, str]:
  """``flexolmo ARGV`` in this process: (exit status, its stderr); one device. The environment
  is restored afterwards (``--verbose`` and ``--no-verify`` set variables for the process)."""
  with mock.patch.dict(os.environ), mock.patch.object(sharding, "make_mesh", ONE_DEVICE):
    code = cli.main([str(a) for a in argv])
  err = capsys.readouterr().err
  assert "Traceback" not in err, err
  return code, err


def refused(capsys, *argv, naming: str) -> str:
  """Runs a command that must be refused: exit 2, one line, naming ``naming``."""
  code, err = flexolmo(capsys, *argv)
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == 2 and len(lines) == 1 and naming in lines[0], err
  return lines[0]


def owner_data(path, seed=0, documents=60):
  rs = np.random.RandomState(seed)
  path.write_text("".join(json.dumps({"text": " ".join(rs.choice(WORDS, rs.randint(20, 60)))})
                          + "\n" for _ in range(documents)))
  return path


def snapshot(root) -> dict:
  """{path: bytes} of every file under ``root``."""
  out = {}
  for directory, _, files in os.walk(root):
    for name in files:
      with open(os.path.join(directory, name), "rb") as fh:
        out[os.path.join(directory, name)] = fh.read()
  return out


def make_world(root) -> dict:
  """A public model, one owner's expert against it (random weights), their merge and its HF
  export, each written by the code a user's command runs (the ``world`` fixture)."""
  public, _, params = save_random_public(root / "public")
  data = owner_data(root / "code.jsonl")
  expert = save_random_expert(root / "code" / "expert", public, "code")
  assert cli.main(["merge", "--public", public, "--expert", str(root / "code"),
                   "--out", str(root / "merged")]) == 0
  assert cli.main(["export-hf", "--model", str(root / "merged"), "--out", str(root / "hf"),
                   "--drop-negative-bias"]) == 0
  return {"root": root, "public": public, "params": params, "data": data, "expert": expert,
          "merged": str(root / "merged"), "hf": str(root / "hf")}


CLOSED = ("code", "legal", "math", "prose")


def save_random_expert(path, public: str, name: str, seed: int = 0) -> str:
  """An expert artifact as ``train-expert --router-init random`` writes one, with random weights:
  well-formed for merging (anchor, config, vocabulary, public router row), no training."""
  from flexolmo_jax.checkpoint import store
  from flexolmo_jax.flexolmo import merge, router_init

  manifest = store.read_manifest(public, "public")
  cfg = store.config_from_json(manifest["config"], public)
  L, d, f = cfg.n_layers, cfg.d_model, cfg.d_ff
  rs = np.random.RandomState(seed)
  normal = lambda *shape, std=0.02: (std * rs.standard_normal(shape)).astype(np.float32)
  params = {"w_gate": normal(L, d, f), "w_up": normal(L, d, f), "w_down": normal(L, f, d),
            "router": normal(L, d, std=0.5), "negative_bias": normal(L, std=0.1)}
  r_pub = router_init.public_rows("random", public, manifest["fingerprint"], L, d)
  return store.save(str(path), params, {
      "kind": "expert", "name": name, "anchor_fingerprint": manifest["fingerprint"],
      "config": store.config_to_json(cfg.replace(experts=("public", name), top_k=2,
                                                 negative_bias=True)),
      "vocabulary": manifest["vocabulary"],
      "public_router_fingerprint": merge.router_fingerprint(r_pub),
      "data_card": {"sources": [f"flexmix_{name}/1.0.0"],
                    "expert_config": {"router_init": "random"}}})


def make_tiny(root) -> dict:
  """{"public": a random public model, "experts": {name: a random expert artifact}} for each
  closed domain: the shapes of real artifacts, written through ``store`` in about a second (the
  ``tiny`` fixture)."""
  public, _, params = save_random_public(root / "public")
  experts = {name: save_random_expert(root / "experts" / name, public, name, seed)
             for seed, name in enumerate(CLOSED, start=1)}
  return {"public": public, "params": params, "experts": experts}



def genome_reads(path, documents=400, seed=0):
  """A domain FlexMix-mini has nothing like: SYNTHETIC DNA reads in FASTA form, each a header
  and 300-600 bases from one seeded order-2 Markov chain (so there is structure to learn),
  written as JSONL."""
  rs = np.random.RandomState(seed)
  bases = "ACGT"
  table = rs.dirichlet(np.full(4, 0.3), size=(4, 4))      # P(next | two previous bases)
  with open(path, "w", encoding="utf-8") as fh:
    for d in range(documents):
      seq = list(rs.choice(4, 2))
      for _ in range(rs.randint(300, 600)):
        seq.append(rs.choice(4, p=table[seq[-2], seq[-1]]))
      text = "".join(bases[b] for b in seq)
      lines = [text[i:i + 60] for i in range(0, len(text), 60)]
      fh.write(json.dumps({"text": f">read_{d:04d} synthetic\n" + "\n".join(lines)}) + "\n")
  return path
