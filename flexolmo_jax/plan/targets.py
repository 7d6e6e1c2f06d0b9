"""Targets of a plan: ``cpu`` (this host's devices) or a TPU topology such as ``v5p:4x4x8``,
whose devices libtpu describes on a host without a TPU (``jax.experimental.topologies``)."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Any

GIB = 1024**3
# Per chip: (HBM bytes, peak bf16 matmul FLOP/s, HBM bytes/s), from the Cloud TPU system
# architecture pages.
TPU_CHIPS = {"v4": (32 * GIB, 275e12, 1.2e12), "v5e": (16 * GIB, 197e12, 8.19e11),
             "v5p": (95 * GIB, 459e12, 2.765e12), "v6e": (32 * GIB, 918e12, 1.64e12)}
TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):([1-9]\d{0,2})x([1-9]\d{0,2})(?:x([1-9]\d{0,2}))?$")
MAX_SLICES = 64


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  devices: list[Any]
  hbm_bytes: int            # memory a device may hold (host memory per device for ``cpu``)
  peak_flops: float | None  # per device; unknown for ``cpu``
  hbm_bandwidth: float | None = None   # bytes/s per device; unknown for ``cpu``


def resolve(topology: str = "cpu", num_slices: int = 1) -> Target:
  """The devices of ``topology`` (``cpu`` or GENERATION:AxB[xC]) times ``num_slices``."""
  if not 1 <= num_slices <= MAX_SLICES:
    raise ValueError(f"--num-slices {num_slices}: choose 1 to {MAX_SLICES}.")
  if topology == "cpu":
    if num_slices != 1:
      raise ValueError("--num-slices is for TPU topologies; `cpu` is this host's devices.")
    import jax

    devices = jax.devices()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Target("cpu", devices, memory // len(devices), None)
  match = TOPOLOGY.match(topology)
  if not match:
    raise ValueError(f"--topology {topology!r}: give `cpu` or a TPU topology such as v5e:4x4, "
                     f"v5p:4x4x8 or v6e:16x16 (generations: {', '.join(TPU_CHIPS)}).")
  if importlib.util.find_spec("libtpu") is None:
    raise ValueError(f"Compiling for {topology} needs libtpu: pip install -e '.[tpu]'.")
  from jax.experimental import topologies

  # Compiling touches no chip: several processes may use libtpu at once (else the second
  # fails on libtpu's lock file).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

  hbm, peak, bandwidth = TPU_CHIPS[match.group(1)]
  desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                      num_slices=num_slices)
  name = topology if num_slices == 1 else f"{topology} x {num_slices} slices"
  return Target(name, list(desc.devices), hbm, peak, bandwidth)
