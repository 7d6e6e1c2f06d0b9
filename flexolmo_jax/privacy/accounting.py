"""DP settings of an expert run, its ``dp_accounting`` event, epsilon and noise calibration.

The privacy unit is one document of the owner's training split; the dataset's document count N is
public (as in DP-SGD practice). A run releases, per step, the sum of per-document gradients each
clipped to L2 norm ``clip`` plus N(0, (noise_multiplier * clip)^2) noise, over a batch drawn by

- ``poisson``: each document independently with probability q = batch_size / N (add-or-remove
  adjacency): event ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``;
- ``fixed``: a uniformly random subset of exactly batch_size documents (replace-one adjacency):
  replacing a document moves the clipped sum by up to 2 * clip, so the event is the Poisson one
  with half the noise multiplier (the reduction jax-privacy's DP-SGD accountant uses).

The router's domain embedding, when computed from the owner's data, is one more Gaussian
mechanism composed with the training (privacy/router.py). Epsilon comes from ``dp_accounting``'s
RDP or PLD accountant; nothing here computes a privacy loss itself.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import TYPE_CHECKING, Sequence

import gin

if TYPE_CHECKING:   # imported where used: it takes 1.4 s, and only DP runs need it
  import dp_accounting

SAMPLINGS = ("poisson", "fixed")
ACCOUNTANTS = ("rdp", "pld")
ROUTER_MODES = ("noised_mean", "proxy")


@gin.configurable(module="flexolmo")
@dataclasses.dataclass(frozen=True)
class DPConfig:
  """DP-SGD for ``train-expert`` (off unless ``enabled``).

  Give ``target_epsilon`` (the noise multiplier is calibrated to reach it over the planned steps)
  or ``noise_multiplier`` (epsilon is then reported), not both."""

  enabled: bool = False
  target_epsilon: float | None = None
  delta: float = 1e-5
  clip: float = 1.0                      # per-document L2 clipping norm C
  noise_multiplier: float | None = None  # sigma: noise std = sigma * C on the clipped sum
  sampling: str = "poisson"              # poisson | fixed
  accountant: str = "rdp"                # rdp | pld
  microbatch_size: int = 8               # documents whose per-example gradients exist at once
  chunks_per_document: int = 1           # a document's first chunks * seq_len tokens are used
  router_init: str = "noised_mean"       # noised_mean (costs epsilon) | proxy (public text)
  router_noise_multiplier: float = 10.0  # sigma of the noised mean (its sensitivity is its unit)
  router_proxy: Sequence[str] = ()       # public text like the owner's, for router_init="proxy"

  def __post_init__(self):
    if not self.enabled:
      return
    where = "DPConfig"
    if (self.target_epsilon is None) == (self.noise_multiplier is None):
      raise ValueError(f"{where}: give exactly one of target_epsilon (--target-epsilon) and "
                       "noise_multiplier (--noise-multiplier).")
    if self.target_epsilon is not None and not self.target_epsilon > 0:
      raise ValueError(f"{where}: target_epsilon={self.target_epsilon} must be > 0.")
    if self.noise_multiplier is not None and not self.noise_multiplier > 0:
      raise ValueError(f"{where}: noise_multiplier={self.noise_multiplier} must be > 0 (0 adds "
                       "no noise and gives no privacy).")
    if not 0 < self.delta < 1:
      raise ValueError(f"{where}: delta={self.delta} must be in (0, 1); choose it well below "
                       "1 / (number of documents).")
    if not self.clip > 0:
      raise ValueError(f"{where}: clip={self.clip} must be > 0 (the per-document gradient norm "
                       "bound).")
    if self.sampling not in SAMPLINGS:
      raise ValueError(f"{where}: sampling={self.sampling!r} has no accountant here; choose one "
                       f"of {SAMPLINGS} (shuffled epochs are not a sampling the DP-SGD "
                       "accountants analyse).")
    if self.accountant not in ACCOUNTANTS:
      raise ValueError(f"{where}: accountant={self.accountant!r}; choose one of {ACCOUNTANTS}.")
    if self.microbatch_size < 1 or self.chunks_per_document < 1:
      raise ValueError(f"{where}: microbatch_size={self.microbatch_size} and "
                       f"chunks_per_document={self.chunks_per_document} must be >= 1.")
    if self.router_init not in ROUTER_MODES:
      raise ValueError(f"{where}: router_init={self.router_init!r}; choose one of "
                       f"{ROUTER_MODES}.")
    if self.router_init == "noised_mean" and not self.router_noise_multiplier > 0:
      raise ValueError(f"{where}: router_noise_multiplier={self.router_noise_multiplier} must "
                       "be > 0.")
    if self.router_init == "proxy" and not self.router_proxy:
      raise ValueError(f"{where}: router_init='proxy' needs router_proxy, paths of public text "
                       "that resembles the owner's data (--dp-router-proxy).")


def sampling_rate(cfg: DPConfig, batch_size: int, documents: int) -> float:
  """q = batch_size / N, checked against what the accountant assumes."""
  if documents < 1:
    raise ValueError("DP training needs at least one training document.")
  if batch_size >= documents:
    raise ValueError(f"DP {cfg.sampling} sampling: batch_size={batch_size} is not below the "
                     f"{documents} training documents; subsampling (the privacy amplification "
                     "the accountant counts on) needs a batch smaller than the dataset.")
  return batch_size / documents


def _effective(cfg: DPConfig, sigma: float) -> float:
  """The accountant's noise multiplier for noise std ``sigma`` times the add-or-remove sensitivity:
  halved for fixed batches, whose replace-one adjacency doubles the sensitivity."""
  return sigma / (2.0 if cfg.sampling == "fixed" else 1.0)


def training_event(cfg: DPConfig, q: float, sigma: float, steps: int) -> dp_accounting.DpEvent:
  import dp_accounting

  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(_effective(cfg, sigma))),
      steps)


def router_event(cfg: DPConfig) -> dp_accounting.DpEvent:
  import dp_accounting

  if cfg.router_init != "noised_mean":
    return dp_accounting.NoOpDpEvent()
  return dp_accounting.GaussianDpEvent(_effective(cfg, cfg.router_noise_multiplier))


def run_event(cfg: DPConfig, q: float, sigma: float, steps: int) -> dp_accounting.DpEvent:
  """Everything the run releases about the owner's documents: the router embedding and the steps."""
  import dp_accounting

  return dp_accounting.ComposedDpEvent([router_event(cfg), training_event(cfg, q, sigma, steps)])


def make_accountant(cfg: DPConfig) -> dp_accounting.PrivacyAccountant:
  import dp_accounting

  if cfg.accountant == "pld":
    return dp_accounting.pld.PLDAccountant()
  return dp_accounting.rdp.RdpAccountant()


def epsilon(cfg: DPConfig, event: dp_accounting.DpEvent) -> float:
  accountant = make_accountant(cfg)
  accountant.compose(event)
  return float(accountant.get_epsilon(cfg.delta))


# The calibration searches noise multipliers from here up. Smaller ones protect little (epsilon
# in the hundreds for typical runs) and make the PLD accountant's grids explode in memory.
MIN_NOISE_MULTIPLIER = 0.3


def calibrate(cfg: DPConfig, q: float, steps: int) -> float:
  """The smallest noise multiplier (>= MIN_NOISE_MULTIPLIER) whose run spends at most
  ``cfg.target_epsilon``."""
  import dp_accounting

  floor = epsilon(cfg, router_event(cfg))
  if floor >= cfg.target_epsilon:
    raise ValueError(f"DP: the router's noised mean alone spends epsilon {floor:.3f} >= "
                     f"target_epsilon={cfg.target_epsilon}; raise router_noise_multiplier "
                     f"({cfg.router_noise_multiplier}) or use router_init='proxy'.")
  with _quiet_accountant():
    if epsilon(cfg, run_event(cfg, q, MIN_NOISE_MULTIPLIER, steps)) <= cfg.target_epsilon:
      return MIN_NOISE_MULTIPLIER
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(cfg), lambda sigma: run_event(cfg, q, sigma, steps),
        cfg.target_epsilon, cfg.delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(MIN_NOISE_MULTIPLIER, 1.0),
        tol=1e-5))


@contextlib.contextmanager
def _quiet_accountant():
  """The RDP accountant logs a warning for every fractional order it drops while the search
  tries small noise multipliers; the result is still a valid upper bound."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


@dataclasses.dataclass(frozen=True)
class Guarantee:
  """What the manifest records about a DP run."""

  epsilon: float
  delta: float
  noise_multiplier: float
  clip: float
  sampling: str
  sampling_rate: float
  batch_size: int
  documents: int
  steps: int
  accountant: str
  adjacency: str
  router_init: str
  router_noise_multiplier: float | None
  epsilon_training_only: float

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def plan(cfg: DPConfig, batch_size: int, documents: int, steps: int) -> Guarantee:
  """The noise multiplier (given or calibrated) and the epsilon of a run of ``steps`` steps."""
  q = sampling_rate(cfg, batch_size, documents)
  sigma = cfg.noise_multiplier if cfg.noise_multiplier is not None else calibrate(cfg, q, steps)
  with _quiet_accountant():
    total = epsilon(cfg, run_event(cfg, q, sigma, steps))
    training = epsilon(cfg, training_event(cfg, q, sigma, steps))
  return Guarantee(
      epsilon=total, delta=cfg.delta,
      noise_multiplier=sigma, clip=cfg.clip, sampling=cfg.sampling, sampling_rate=q,
      batch_size=batch_size, documents=documents, steps=steps, accountant=cfg.accountant,
      adjacency="add_or_remove_one" if cfg.sampling == "poisson" else "replace_one",
      router_init=cfg.router_init,
      router_noise_multiplier=(cfg.router_noise_multiplier if cfg.router_init == "noised_mean"
                               else None),
      epsilon_training_only=training)


def describe(name: str, card: dict) -> str:
  """One line per expert for ``merge`` and ``eval``: its DP guarantee, or that it has none."""
  dp = (card or {}).get("dp")
  if not dp:
    return f"{name}: no differential privacy"
  return (f"{name}: DP epsilon {dp['epsilon']:.3g} at delta {dp['delta']:.3g} "
          f"(noise multiplier {dp['noise_multiplier']:.3g}, clip {dp['clip']:g}, "
          f"{dp['sampling']} sampling q={dp['sampling_rate']:.3g}, {dp['steps']} steps, "
          f"{dp['accountant']} accountant, router {dp['router_init']})")
