"""What a plan compiles for: the model, batch, length, mesh and expert settings of a run, read
from the same gin files the run's command reads (the model preset, ``gin_configs/runs/<run>.gin``,
its ``--gin-file`` files and bindings), with ``plan``'s own flags on top."""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

import gin

from flexolmo_jax.config import GIN_DIR, MeshConfig, ModelConfig, model_gin_path, private_gin
from flexolmo_jax.flexolmo import public, router_tune  # noqa: F401 (their gin configurables)
from flexolmo_jax.flexolmo.expert import ExpertConfig
from flexolmo_jax.train.loop import TrainConfig

# The plan's task -> the run gin file of the command that runs it.
RUN_FILES = {"pretrain": "pretrain", "train-dense": "train_dense", "train-expert": "train_expert",
             "tune-router": "tune_router"}


@dataclasses.dataclass(frozen=True)
class Settings:
  model: ModelConfig
  train: TrainConfig
  expert: ExpertConfig


def resolve(task: str, model: str, gin_files: Sequence[str] = (), bindings: Sequence[str] = (),
            *, batch_size: int | None = None, seq_len: int | None = None,
            mesh: dict | None = None, bf16: bool = False,
            anchor_dtype: str | None = None) -> Settings:
  """The settings of ``task``'s run: the gin files parsed as its command parses them (later
  wins), then the flags that were given. Without run files: batch 16, length 256, fsdp over
  every device, as before any run is written."""
  files, unused = [model_gin_path(model)], []
  if gin_files and task in RUN_FILES:
    files.append(os.path.join(GIN_DIR, "runs", f"{RUN_FILES[task]}.gin"))
    # The run's paths and names (its public model, data, output) are not the plan's business.
    with open(files[-1]) as fh:
      unused = [f"{name} = None" for name in
                re.findall(r"^([A-Z][A-Z0-9_]*)\s*=\s*%gin\.REQUIRED", fh.read(), re.M)]
  for path in gin_files:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"gin file {path} does not exist.")
    files.append(path)
  with private_gin():
    try:
      gin.parse_config_files_and_bindings(files, unused + list(bindings), skip_unknown=False)
    except Exception as e:  # gin raises several kinds: name the files in one line
      raise ValueError(f"gin configuration ({', '.join(files)}): {type(e).__name__}: "
                       f"{e}") from None
    cfg, train, ecfg = ModelConfig(), TrainConfig(), ExpertConfig()
    dtype = _macro("DTYPE") if task == "train-expert" else None
  if not gin_files:
    train = TrainConfig(batch_size=16, seq_len=256, mesh=MeshConfig(fsdp=-1))
  changes = {k: v for k, v in (("batch_size", batch_size), ("seq_len", seq_len)) if v}
  if mesh is not None:
    changes["mesh"] = MeshConfig(**mesh)
  if bf16 or dtype == "bfloat16":
    cfg = cfg.replace(dtype="bfloat16")
  if anchor_dtype:
    ecfg = dataclasses.replace(ecfg, anchor_dtype=anchor_dtype)
  return Settings(cfg, dataclasses.replace(train, **changes), ecfg)


def _macro(name: str):
  try:
    return gin.query_parameter(f"%{name}")
  except ValueError:
    return None
