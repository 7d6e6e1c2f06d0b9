"""Logical-axis sharding: a rules table maps logical names onto the mesh (data, fsdp, tensor, expert).

Parameters carry their logical axes as ``nnx.Param(..., axes=(...))`` metadata; activations are
constrained with :func:`constrain`, which is a no-op unless a mesh is active (see
:func:`jit_sharded`). The same code runs on 1 CPU, a fake 8-device CPU mesh, a GPU or a TPU slice.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flexolmo_jax.config import MESH_AXES, MeshConfig

LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv", "mlp", "vocab", "expert", "layers")

MeshAxes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Which mesh axes each logical axis is split over (None: replicated)."""

  batch: MeshAxes = ("data", "fsdp", "expert")
  length: MeshAxes = None
  embed: MeshAxes = "fsdp"
  heads: MeshAxes = "tensor"
  kv: MeshAxes = None
  mlp: MeshAxes = "tensor"
  vocab: MeshAxes = "tensor"
  expert: MeshAxes = "expert"
  layers: MeshAxes = None

  def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
    if logical is None:
      return ()
    if logical not in LOGICAL_AXES:
      raise ValueError(f"Unknown logical axis {logical!r}; known: {LOGICAL_AXES}.")
    value = getattr(self, logical)
    if value is None:
      return ()
    return (value,) if isinstance(value, str) else tuple(value)

  def spec(self, axes: Sequence[str | None]) -> PartitionSpec:
    """PartitionSpec for logical ``axes``; a mesh axis is used at most once (first use wins)."""
    used: set[str] = set()
    out = []
    for logical in axes:
      names = tuple(a for a in self.mesh_axes(logical) if a not in used)
      used.update(names)
      out.append(None if not names else names[0] if len(names) == 1 else names)
    return PartitionSpec(*out)


def make_mesh(mesh_cfg: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  sizes = (mesh_cfg or MeshConfig()).shape(len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def check_divisible(name: str, shape, spec: PartitionSpec, mesh: Mesh) -> None:
  for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else axes
    parts = math.prod(mesh.shape[a] for a in axes)
    if size % parts:
      raise ValueError(
          f"Cannot shard {name} of shape {tuple(shape)}: dimension {dim} (size {size}) is not "
          f"divisible by mesh axes {axes} of total size {parts} (mesh {dict(mesh.shape)}). "
          "Change the mesh shape or the sharding rules.")


def _map_state(fn, state):
  flat = nnx.to_flat_state(state)
  return nnx.from_flat_state([(path, fn(path, var)) for path, var in flat])


def param_shardings(state: nnx.State, mesh: Mesh, rules: ShardingRules) -> nnx.State:
  """NamedShardings for every parameter; raises a clear error when the mesh does not divide one."""
  def sharding_of(path, var):
    name = ".".join(map(str, path))
    axes = var.get_metadata().get("axes")
    shape = var.get_value().shape   # an array or a ShapeDtypeStruct (abstract state)
    if axes is None or len(axes) != len(shape):
      raise ValueError(f"Parameter {name} of shape {shape} has logical axes {axes}; "
                       "every parameter needs one logical axis name per dimension.")
    spec = rules.spec(axes)
    check_divisible(f"parameter {name}", shape, spec, mesh)
    return var.replace(NamedSharding(mesh, spec))
  return _map_state(sharding_of, state)


def batch_sharding(mesh: Mesh, rules: ShardingRules, shape, axes=("batch", "length"),
                   name: str = "batch") -> NamedSharding:
  spec = rules.spec(axes)
  check_divisible(name, shape, spec, mesh)
  return NamedSharding(mesh, spec)


# ----------------------------------------------------------------------------- activations

_ACTIVE = threading.local()


@contextlib.contextmanager
def activate(mesh: Mesh, rules: ShardingRules):
  """Makes :func:`constrain` effective while tracing inside this context."""
  prev = getattr(_ACTIVE, "value", None)
  _ACTIVE.value = (mesh, rules)
  try:
    yield
  finally:
    _ACTIVE.value = prev


def active():
  """The (mesh, rules) being traced under :func:`activate`, or None."""
  return getattr(_ACTIVE, "value", None)


def platform() -> str:
  """The platform of the program being traced: the active mesh's devices, else the default."""
  current = active()
  return current[0].devices.flat[0].platform if current is not None else jax.default_backend()


def constrain(x, axes: Sequence[str | None]):
  """Sharding constraint on an activation by logical axes (no-op without an active mesh)."""
  active = getattr(_ACTIVE, "value", None)
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, rules.spec(axes)))


def jit_sharded(fn: Callable, mesh: Mesh, rules: ShardingRules, *, in_shardings, out_shardings,
                **jit_kwargs) -> Callable:
  """``jax.jit`` with NamedSharding in/out shardings whose trace sees the mesh and rules."""
  def traced(*args, **kwargs):
    with activate(mesh, rules):
      return fn(*args, **kwargs)
  return jax.jit(traced, in_shardings=in_shardings, out_shardings=out_shardings, **jit_kwargs)


def shard_model(model: nnx.Module, mesh: Mesh, rules: ShardingRules):
  """Splits a model into (graphdef, parameter state laid out on the mesh, its shardings)."""
  graphdef, state = nnx.split(model, nnx.Param)
  shardings = param_shardings(state, mesh, rules)
  return graphdef, jax.device_put(state, shardings), shardings
