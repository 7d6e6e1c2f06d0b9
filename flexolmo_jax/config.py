"""Model and mesh configuration: frozen dataclasses, gin-configurable, validated on construction.

Presets live in ``gin_configs/models/*.gin`` (the single source of the numbers); load one with
:func:`load_model_config`. The dataclasses read fine without gin.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Sequence

import gin

from flexolmo_jax import experts as experts_lib

DTYPES = ("float32", "bfloat16")
# What each layer saves for the backward pass (model/transformer.py maps them to JAX policies):
# everything, nothing (recompute the layer), the matmul outputs, the matmul outputs without
# batch dimensions (weights x activations, not attention), or those moved to host memory.
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "offload")
MAX_SIZE = 1 << 24         # any one size of a model config (the 7B presets' largest is 100352)
MAX_EXPERTS = 1024


@gin.configurable(module="flexolmo")
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of an OLMo-2 style decoder, dense or FlexOlmo MoE (docs/method.md §2-3).

  ``experts`` empty means the dense public model; otherwise the names of the experts, in the
  model's order (``public`` first by convention). ``top_k`` experts are active per token.
  """

  vocab_size: int = 512
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int | None = None
  head_dim: int | None = None
  d_ff: int = 128
  max_seq_len: int = 256
  rope_theta: float = 500_000.0
  norm_eps: float = 1e-6
  init_std: float = 0.02
  # Mixture of experts.
  experts: tuple[str, ...] = ()
  top_k: int = 1
  top_k_policy: str = "reject"
  negative_bias: bool = False
  router_z_loss_weight: float = 1e-3
  load_balance_loss_weight: float = 0.0
  # Rows of the stacked expert weights: 0 is one per expert. More adds zero experts that no token
  # routes to, so that an expert mesh axis divides the stack (7 experts over 8 devices); set by
  # moe.rows_for_mesh, never stored in a saved model.
  expert_rows: int = 0
  dispatch: str = "auto"         # model/dispatch.py BACKENDS, or auto: per platform
  capacity_factor: float = 1.25
  dispatch_block_size: int = 0  # 0: chosen from the shapes (dispatch.block_size_for)
  attention: str = "auto"        # model/attention.py IMPLEMENTATIONS; auto picks per platform
  # Numerics.
  dtype: str = "float32"        # activations / matmul inputs
  param_dtype: str = "float32"  # stored parameters
  scan_layers: bool = True       # one compiled layer body (False unrolls, for debugging)
  remat: str = "none"            # REMAT_POLICIES: what a layer keeps for the backward pass

  def __post_init__(self):
    if isinstance(self.remat, bool):   # the older boolean setting: True meant "full"
      object.__setattr__(self, "remat", "full" if self.remat else "none")
    # Configs arrive from gin and from other organisations' manifests: check kinds and bound
    # sizes before anything is built from them.
    for field in dataclasses.fields(self):
      value, kind = getattr(self, field.name), field.type
      if value is None and "None" in kind:
        continue
      number = isinstance(value, (int, float)) and not isinstance(value, bool)
      if kind.startswith("int") and (not number or not isinstance(value, int)
                                     or not 0 <= value <= MAX_SIZE):
        raise ValueError(f"ModelConfig: {field.name}={value!r} must be an integer from 0 to "
                         f"{MAX_SIZE}.")
      if kind == "float" and (not number or not math.isfinite(value)):
        raise ValueError(f"ModelConfig: {field.name}={value!r} must be a finite number.")
      if kind in ("str", "bool") and type(value).__name__ != kind:
        raise ValueError(f"ModelConfig: {field.name}={value!r} must be a {kind}.")
    if not isinstance(self.experts, (tuple, list)) or len(self.experts) > MAX_EXPERTS:
      raise ValueError(f"ModelConfig: experts must be a list of at most {MAX_EXPERTS} names.")
    object.__setattr__(self, "experts", tuple(self.experts))
    if self.n_kv_heads is None:
      object.__setattr__(self, "n_kv_heads", self.n_heads)
    if self.head_dim is None:
      if self.d_model % self.n_heads:
        raise ValueError(
            f"ModelConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
            "set head_dim explicitly.")
      object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
      if getattr(self, name) <= 0:
        raise ValueError(f"ModelConfig: {name}={getattr(self, name)} must be positive.")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"ModelConfig: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}.")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig: head_dim={self.head_dim} must be even for RoPE.")
    if self.dtype not in DTYPES or self.param_dtype not in DTYPES:
      raise ValueError(
          f"ModelConfig: dtype={self.dtype!r} / param_dtype={self.param_dtype!r}; "
          f"choose from {DTYPES}.")
    if self.top_k_policy not in experts_lib.TOP_K_POLICIES:
      raise ValueError(
          f"ModelConfig: top_k_policy={self.top_k_policy!r}; choose from "
          f"{experts_lib.TOP_K_POLICIES}.")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig: remat={self.remat!r}; choose from {REMAT_POLICIES}.")
    if self.capacity_factor <= 0:
      raise ValueError(f"ModelConfig: capacity_factor={self.capacity_factor} must be > 0.")
    if self.experts:
      experts_lib.validate(self.experts)
      if self.top_k < 1:
        raise ValueError(f"ModelConfig: top_k={self.top_k} must be >= 1.")
      if self.expert_rows and self.expert_rows < len(self.experts):
        raise ValueError(f"ModelConfig: expert_rows={self.expert_rows} is fewer than the "
                         f"{len(self.experts)} experts.")
      if self.top_k > len(self.experts):
        raise ValueError(
            f"ModelConfig: top_k={self.top_k} is larger than the {len(self.experts)} experts "
            f"present {list(self.experts)}.")

  @property
  def is_moe(self) -> bool:
    return bool(self.experts)

  @property
  def num_experts(self) -> int:
    return len(self.experts)

  @property
  def num_expert_rows(self) -> int:
    """Rows of the stacked expert weights: the experts and any zero experts padding them."""
    return max(self.expert_rows, self.num_experts)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def with_experts(self, names: Sequence[str]) -> "ModelConfig":
    """The config of the same model over ``names`` (top_k per ``top_k_policy`` if too large)."""
    names = tuple(names)
    return self.replace(experts=names,
                        top_k=experts_lib.active(self.top_k, self.top_k_policy, names))

  def num_params(self) -> int:
    """Number of parameters (all experts counted)."""
    d, f, h, kv, hd = self.d_model, self.d_ff, self.n_heads, self.n_kv_heads, self.head_dim
    attn = d * hd * (2 * h + 2 * kv) + hd * (h + kv)
    ffn = 3 * d * f * max(1, self.num_experts) + (self.num_experts * d if self.is_moe else 0)
    per_layer = attn + ffn + 2 * d
    return self.n_layers * per_layer + 2 * self.vocab_size * d + d

  def active_params(self) -> int:
    """Parameters touched per token (top_k experts)."""
    inactive = 3 * self.d_model * self.d_ff * (self.num_experts - self.top_k) if self.is_moe else 0
    return self.num_params() - self.n_layers * inactive


MESH_AXES = ("data", "fsdp", "tensor", "expert")


@gin.configurable(module="flexolmo")
@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh shape over the axes (data, fsdp, tensor, expert). One axis may be -1 (the rest)."""

  data: int = 1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1

  def shape(self, num_devices: int) -> dict[str, int]:
    sizes = {a: getattr(self, a) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    bad = [f"{a}={s}" for a, s in sizes.items() if s == 0 or s < -1]
    if bad or len(free) > 1:
      raise ValueError(
          f"MeshConfig {sizes}: sizes must be positive, with at most one -1 (got {bad or free}).")
    fixed = 1
    for a, s in sizes.items():
      if s != -1:
        fixed *= s
    if free:
      if num_devices % fixed:
        raise ValueError(
            f"MeshConfig {sizes}: {num_devices} devices are not divisible by the fixed axes "
            f"(product {fixed}).")
      sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
      raise ValueError(
          f"MeshConfig {sizes}: the mesh has {fixed} devices but {num_devices} are available.")
    return sizes


GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin_configs")
if GIN_DIR not in gin.config._LOCATION_PREFIXES:  # pylint: disable=protected-access
  # Ahead of the working directory, so `include 'models/olmo2_7b.gin'` resolves at the first try
  # (gin logs an ERROR line for every prefix it misses).
  gin.config._LOCATION_PREFIXES.insert(0, GIN_DIR)  # pylint: disable=protected-access


def model_gin_path(name_or_path: str) -> str:
  """``tiny`` -> gin_configs/models/tiny.gin; a path is returned as is (must exist)."""
  if os.path.exists(name_or_path):
    return name_or_path
  path = os.path.join(GIN_DIR, "models", f"{name_or_path}.gin")
  if not os.path.exists(path):
    known = sorted(p[:-4] for p in os.listdir(os.path.join(GIN_DIR, "models")) if p.endswith(".gin"))
    raise FileNotFoundError(f"No model preset {name_or_path!r}: known presets are {known}.")
  return path


@contextlib.contextmanager
def private_gin():
  """An empty gin configuration for the block, and the caller's back afterwards, untouched."""
  with gin.unlock_config():
    saved = gin.config._CONFIG.copy()  # pylint: disable=protected-access
    try:
      gin.clear_config()
      yield
    finally:
      gin.clear_config()
      gin.config._CONFIG.update(saved)  # pylint: disable=protected-access


def load_model_config(name_or_path: str, overrides: Sequence[str] = (), **changes) -> ModelConfig:
  """Parses a model gin file (plus ``--gin.`` style bindings) into a ModelConfig, in a private
  gin configuration (the caller's global gin state is not disturbed)."""
  path = model_gin_path(name_or_path)
  with private_gin():
    gin.parse_config_files_and_bindings([path], list(overrides), skip_unknown=False)
    cfg = ModelConfig()
  return cfg.replace(**changes) if changes else cfg


def write_gin_config(output_dir: str) -> None:
  """Writes the resolved gin configuration into ``output_dir/config.gin`` (next to its results)."""
  import jax

  if jax.process_index():   # process 0 writes it
    return
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, "config.gin"), "w") as fh:
    fh.write(gin.config_str())
