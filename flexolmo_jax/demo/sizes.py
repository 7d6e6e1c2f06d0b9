"""The demo's sizes: ``default`` (``make demo``) and ``quick`` (the tests)."""
from __future__ import annotations

import dataclasses
import json
import os

from flexolmo_jax.demo.processes import write_json


@dataclasses.dataclass(frozen=True)
class Size:
  pretrain_steps: int
  expert_steps: int
  tune_steps: int
  batch: int
  seq: int
  # Router tuning's peak learning rate, measured on each size's merged model (average validation
  # loss after tuning; oracle routing 1.482 at quick size): default size (merged at expert bias
  # -2) 1.618 at 1e-2, 1.626 at 1e-3, 1.632 at 3e-4; quick size 1.507 at 1e-2, 1.503 at 1e-3,
  # 1.500 at 3e-4. At 3e-4 the router barely moves from the merge's, and opting math out then
  # left math 0.054 above the public model (0.035 at 1e-2): the expert dropout below needs the
  # larger steps.
  tune_lr: float = 1e-2
  # Expert dropout in router tuning (router_tune.py; not in the paper). Measured at quick size:
  # opting math out gave math 1.816 (public 1.361) after 60 steps without it, 1.476 after 200
  # steps with 0.5; the full model's average went 2.136 -> 2.121.
  tune_dropout: float = 0.5
  # The share of the way from the merge's router rows to the tuned ones kept (router_tune.py; not
  # in the paper). Measured at quick size on one demo's rows (average of the 5 validation sets;
  # oracle routing 1.482): 0 (untuned) 1.488, opting math out +0.070 over the public model;
  # 0.5 1.496, every opt-out within 0.048; 0.75 1.502; 1 1.508. The "no negative bias"
  # ablation tuned the same way: 1.487 / 1.501 / 1.520 at 0.5 / 0.75 / 1, so below about 0.8
  # the ablation beats the full method, and from about 0.75 the full method is 0.02 over oracle
  # routing: no share meets both at quick size (docs/results.md). 1 is the paper's tuning.
  # The quick figures in these comments were measured on a quick corpus whose validation splits
  # held 2-4 documents (flexmix_mini.MIN_VALIDATION_DOCUMENTS) and a 72 KB public set; with
  # the 306 KB one (flexmix_mini's public_extra_bytes) the tuned model beats oracle routing at
  # A = 1 (1.573 against 1.576; untuned 1.584) with every opt-out within 0.02.
  tune_interpolation: float = 1.0
  # The canary owner's expert once more with DP-SGD (flexolmo_jax/privacy): this epsilon at
  # delta 1e-5, documents cut to this many rows of ``seq`` tokens.
  dp_epsilon: float = 8.0
  dp_chunks: int = 2
  # Noise dominates its gradients, so a smaller step: at quick size the DP expert's legal loss
  # was 0.247 over the non-DP expert's at lr 3e-3 and 0.063 at 5e-4 (the public model: 0.051).
  dp_lr: float = 5e-4
  # Its steps (0: expert_steps). Each DP step clips every document's gradient on its own, so at
  # quick size a step costs about 5x an expert's; the guarantee is calibrated to the steps run.
  dp_steps: int = 0
  # The expert bias of the merge (``merge --expert-bias``, docs/method.md §6), chosen per size on
  # the untuned merge (average validation loss, own expert leading among the owners' on every
  # closed domain in each): quick size, bench/router_sweep.py (below); default size, the same
  # experts merged at 0 / -0.5 / -1 / -2: 1.626 / 1.620 / 1.618 / 1.635.
  expert_bias: float = -2.0


# How the owners train (docs/method.md §5), chosen by bench/router_sweep.py at quick size
# (average validation loss of the untuned merged model, all 5 experts active; public model 1.582):
# the paper's init 1.672; each owner's row and bias from its classifier against the public data
# ("classifier"), trained 1.679, held 1.631; merged with an expert bias of -2 the paper's init
# gives 1.523 and the held classifier 1.511, the only one of the four whose own expert leads on
# code, prose and math (bench/RESULTS.md).
EXPERT_FLAGS = ("--router-init", "classifier", "--router-lr-scale", "0")

# Quick router tuning runs 400 steps: opting math out overshot the public model by 0.201 and 0.211
# after 200 steps, 0.159 and 0.169 after 400 (seeds 1 and 2), and the full model's math loss fell
# by 0.03-0.05 (default size tunes on 3x the tokens of 200 quick steps already).
# Quick pre-training runs 1000 steps: an expert trained against a 300-step public model (public
# validation loss 1.32) memorized the canaries only to 0.85 nats per token and reached no sampled
# extraction (0/4); against 450 steps (0.87) 0.48 and 0/4; against 600 (0.69) 0.40 and 4/4 in one
# run, but 2/4, 1/4 and (CI) 0/4 in others: sampling seeds 0-3 on that last one's expert gave
# 0, 0, 0, 1 of 4. Against 1000 steps, on the same data: 4, 4, 4, 3 of 4. The FFN expert cannot
# move the frozen lm-head and norms, so a weak public model caps the probability it can give a
# memorized token (0.92 at most after 300 steps, while top-p 0.95 needs above 0.95).
SIZES = {"default": Size(500, 150, 150, 16, 256, expert_bias=-1.0),
         "quick": Size(1000, 200, 400, 8, 128, dp_steps=100)}


SETTINGS_FILE = "demo_settings.json"


def claim_workdir(workdir: str, size_name: str, seed: int) -> dict:
  """Records the size and seed a work directory's stages are built with; refuses a run that
  asks for others (stages are reused by their output's existence alone, so a quick run in a
  default-size directory would otherwise report the default models as quick ones). A directory
  without the record (a new one, or one an earlier version built) takes this run's."""
  settings = {"size": size_name, "seed": seed, "config": dataclasses.asdict(SIZES[size_name])}
  path = os.path.join(workdir, SETTINGS_FILE)
  if os.path.exists(path):
    with open(path) as f:
      built = json.load(f)
    if built != settings:
      was, now = _flat(built), _flat(settings)
      differ = [k for k in {**now, **was} if was.get(k) != now.get(k)]
      raise ValueError(
          f"{path}: the work directory holds a {built.get('size')}-size demo with seed "
          f"{built.get('seed')}; this run asks for {size_name} size with seed {seed} (differing: "
          f"{', '.join(differ)}). Rebuild it with --fresh, or use another --workdir.")
    return settings
  os.makedirs(workdir, exist_ok=True)
  write_json(path, settings, indent=1)
  return settings


def _flat(settings: dict) -> dict:
  """{"size", "seed", "config.<field>", ...} of a settings record."""
  config = settings.get("config")
  return {**{k: v for k, v in settings.items() if k != "config"},
          **{f"config.{k}": v for k, v in (config if isinstance(config, dict) else {}).items()}}
