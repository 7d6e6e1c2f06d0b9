"""Compiles a program for a target and reads what the compiler says of it: bytes per device,
FLOPs, the estimated step time and the collectives. The JSON keys are stable (scripts read them)."""
from __future__ import annotations

import collections
import math
import re
from typing import Callable

import jax
import numpy as np

from flexolmo_jax import sharding
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.model import attention, dispatch
from flexolmo_jax.plan.programs import Program
from flexolmo_jax.plan.targets import GIB, Target
from flexolmo_jax.train import metrics

COLLECTIVES = ("all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all", "all-reduce",
               "collective-permute")
# An HLO instruction producing a collective: "%x = f32[8,64]{1,0} all-gather(...)", also the
# asynchronous "-start" form and tuple results "(f32[..], bf16[..])".
_INSTRUCTION = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8e\w+)\[([\d,]*)\]")
_ELEMENT_BITS = {"pred": 8, "bf16": 16}
GROUPS = ("params", "optimizer", "frozen", "batch", "cache")
TO_FIT = ("To fit: shard over more devices (--mesh fsdp=-1, or a larger topology), recompute "
          "each layer in the backward pass (--gin \"flexolmo.ModelConfig.remat='full'\"), "
          "compute in bf16 (--bf16), hold the frozen public model in bf16 when training an "
          "expert (--anchor-dtype bfloat16), hold the parameters in bf16 "
          "(--gin flexolmo.ModelConfig.param_dtype=\"'bfloat16'\"), or a smaller --batch-size.")


def shard_bytes(tree) -> int:
  """Bytes one device holds of an abstract tree (each leaf cut by its sharding)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def global_bytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _collective_results(hlo: str):
  """(kind, [(shape, bytes) of each result array]) of each collective in a compiled module's text."""
  for line in hlo.splitlines():
    match = _INSTRUCTION.search(line)
    if not match or "-done(" in line:
      continue
    arrays = []
    for dtype, dims in _ARRAY.findall(match.group(1)):
      shape = tuple(int(d) for d in dims.split(",") if d)
      bits = _ELEMENT_BITS.get(dtype) or int(re.match(r"\D*(\d+)", dtype).group(1))
      arrays.append((shape, math.prod(shape) * bits // 8))
    yield match.group(2), arrays


def collectives(hlo: str) -> dict[str, dict[str, int]]:
  """{kind: {"count", "bytes"}} of the collectives in a compiled module's text (bytes of their
  results, per device)."""
  out = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
  for kind, arrays in _collective_results(hlo):
    out[kind]["count"] += 1
    out[kind]["bytes"] += sum(n for _, n in arrays)
  return dict(out)


def ffn_weight_gathers(hlo: str, cfg: ModelConfig, embed_parts: int = 1,
                       mlp_parts: int = 1) -> dict[str, int]:
  """{"count", "bytes"} of the all-gathers whose result is shaped like stacked FFN (expert)
  weights: rank 3 or more, ending in (d_model, d_ff) or (d_ff, d_model), whole or still cut as
  the mesh cuts them (``d_model`` by a divisor of ``embed_parts``, ``d_ff`` of ``mlp_parts``).
  Zero when every expert's weights are used where they are stored (the all-to-all dispatch)."""
  out = {"count": 0, "bytes": 0}
  d, f = cfg.d_model, cfg.d_ff
  if d == f:        # FFN weights cannot be told from attention's by shape
    return out
  for kind, arrays in _collective_results(hlo):
    found = [n for shape, n in arrays if kind == "all-gather" and len(shape) >= 3
             and (_cut(shape[-2:], (d, f), (embed_parts, mlp_parts))
                  or _cut(shape[-2:], (f, d), (mlp_parts, embed_parts)))]
    if found:
      out["count"] += 1
      out["bytes"] += sum(found)
  return out


def _cut(dims, whole, parts) -> bool:
  """``dims`` are ``whole``, each dimension divided by a divisor of its ``parts``."""
  return all(a and w % a == 0 and p % (w // a) == 0 for a, w, p in zip(dims, whole, parts))


def specs(tree) -> dict[str, str]:
  """{"path/to/leaf": "P(...)"}: how each leaf is laid out on the mesh."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path):
          str(leaf.sharding.spec) for path, leaf in flat}


def costs(program: Program, devices: int) -> dict:
  """Global FLOPs, the compiler's optimal step seconds and the collectives of one compile."""
  compiled = program.fn.lower(*program.args).compile()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, list) else cost) or {}
  seconds = cost.get("optimal_seconds")
  hlo = compiled.as_text()
  return {"flops": float(cost.get("flops", 0.0)) * devices,
          "bytes": float(cost.get("bytes accessed", 0.0)),
          "seconds": float(seconds) if seconds is not None and seconds > 0 else None,
          "collectives": collectives(hlo),
          "ffn_weight_gathers": ffn_weight_gathers(hlo, program.model, *_ffn_parts(program))}


def _ffn_parts(program: Program) -> tuple[int, int]:
  """How many parts the mesh cuts an FFN weight's (embed, mlp) dimensions into."""
  mesh = jax.tree.leaves(program.args)[0].sharding.mesh
  rules = sharding.ShardingRules()
  return tuple(math.prod(mesh.shape[a] for a in rules.mesh_axes(axis))
               for axis in ("embed", "mlp"))


def per_layer(one: dict, two: dict, layers: int) -> dict:
  """Costs of ``layers`` identical layers from those of 1 and 2: c(L) = c1 + (L - 1)(c2 - c1)."""
  line = lambda a, b: a + (layers - 1) * (b - a)
  kinds = set(one["collectives"]) | set(two["collectives"])
  zero = {"count": 0, "bytes": 0}
  return {"flops": line(one["flops"], two["flops"]), "bytes": line(one["bytes"], two["bytes"]),
          "seconds": (line(one["seconds"], two["seconds"])
                      if one["seconds"] and two["seconds"] else None),
          "collectives": {k: {f: int(line(one["collectives"].get(k, zero)[f],
                                          two["collectives"].get(k, zero)[f]))
                              for f in ("count", "bytes")} for k in sorted(kinds)},
          "ffn_weight_gathers": {f: int(line(one["ffn_weight_gathers"][f],
                                             two["ffn_weight_gathers"][f]))
                                 for f in ("count", "bytes")}}


def model_costs(build, cfg: ModelConfig, program: Program | None, devices: int) -> dict:
  """The costs of the whole model: of ``program`` itself when its layers are not a loop, else
  from 1 and 2 unrolled layers (XLA counts a loop body once)."""
  if cfg.scan_layers and cfg.n_layers > 1:
    unrolled = [costs(build(cfg.replace(n_layers=n, scan_layers=False)), devices) for n in (1, 2)]
    return per_layer(*unrolled, cfg.n_layers)
  return costs(program or build(cfg), devices)


def kernel_flops(program: Program, target: Target) -> float:
  """FLOPs of the Pallas kernels, which the compiler's cost analysis does not see, by the
  6N + attention convention: the attention term where the step runs splash attention on
  ``target``, the routed experts' 6 x active FFN parameters where it runs megablox."""
  cfg, where = program.model, target.devices[0].platform
  seq_len = jax.tree.leaves(program.groups["batch"])[0].shape[1]
  per_token = 0.0
  if attention.resolve(cfg.attention, seq_len, seq_len, False, where) == "splash":
    per_token += metrics.attention_flops_per_token(cfg, seq_len)
  if cfg.is_moe and dispatch.resolve(cfg.dispatch, cfg.d_model, cfg.d_ff, where) == "megablox":
    per_token += 6.0 * 3 * cfg.d_model * cfg.d_ff * cfg.top_k * cfg.n_layers
  passes = 1 / 3 if program.task in ("eval", "prefill", "decode") else 1.0
  return per_token * program.tokens * passes


def step_seconds(cost: dict, target: Target, devices: int) -> tuple[float | None, str | None]:
  """The compiler's estimate of a step; where it gives none (a negative value, seen for some
  programs) a roofline of its counts: the slower of its FLOPs at the chip's peak and its bytes
  accessed at the chip's HBM bandwidth (collectives not included)."""
  if cost["seconds"]:
    return cost["seconds"], "compiler"
  if target.peak_flops and target.hbm_bandwidth:
    return max(cost["flops"] / devices / target.peak_flops,
               cost["bytes"] / target.hbm_bandwidth), "roofline"
  return None, None


def plan(build: Callable[[ModelConfig], Program], cfg: ModelConfig, target: Target,
         mesh) -> dict:
  """Compiles ``build(cfg)`` (for ``mesh`` over ``target``'s devices) and reports on it.

  Memory comes from that program. XLA's cost analysis counts a loop body once, whatever its trip
  count, so with scanned layers the FLOPs, step time and collectives come from the same program
  compiled with 1 and 2 unrolled layers, extended to ``n_layers`` (the layers are identical)."""
  program = build(cfg)
  try:
    compiled = program.fn.lower(*program.args).compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise ValueError(f"{program.task} of this model does not fit {target.name} "
                     f"({str(e).splitlines()[0]}). {TO_FIT}") from None
  memory = compiled.memory_analysis()
  devices = mesh.devices.size
  cost = model_costs(build, cfg, program, devices)
  remat = 0.0
  if cfg.remat != "none" and program.task not in ("eval", "prefill", "decode"):
    plain = model_costs(build, cfg.replace(remat="none"), None, devices)["flops"]
    remat = max(0.0, cost["flops"] - plain)
  per_device = {g: shard_bytes(program.groups[g]) for g in GROUPS}
  per_device["temporaries"] = int(memory.temp_size_in_bytes)
  per_device["total"] = int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                            - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  kernel = kernel_flops(program, target)
  seconds, source = step_seconds(cost, target, devices)
  if seconds and kernel and target.peak_flops:
    seconds += kernel / devices / target.peak_flops
  flops = cost["flops"] + kernel
  mfu = flops / (seconds * target.peak_flops * devices) if seconds and target.peak_flops else None
  return {
      "task": program.task, "topology": target.name, "devices": devices,
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "tokens_per_step": program.tokens,
      "global_bytes": {g: global_bytes(program.groups[g]) for g in GROUPS},
      "per_device_bytes": per_device, "hbm_bytes": int(target.hbm_bytes),
      "fits": per_device["total"] <= target.hbm_bytes,
      "flops": flops, "compiled_flops": cost["flops"], "kernel_flops": kernel,
      "remat_flops": remat,
      "reference_flops": program.reference_flops,
      "estimated_step_seconds": seconds, "step_seconds_from": source, "estimated_mfu": mfu,
      "collectives": cost["collectives"], "ffn_weight_gathers": cost["ffn_weight_gathers"],
      "experts": program.model.num_experts, "expert_rows": program.model.num_expert_rows,
      "shardings": {g: specs(program.groups[g]) for g in ("params", "frozen")},
  }


def size(n: float) -> str:
  for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
    if n >= scale:
      return f"{n / scale:,.2f} {unit}"
  return f"{int(n)} B"


def render(report: dict) -> str:
  gib = size
  pd = report["per_device_bytes"]
  lines = [f"{report['task']} on {report['topology']}: {report['devices']} devices, mesh "
           + " x ".join(f"{k}={v}" for k, v in report["mesh"].items() if v > 1 or k == "data"),
           *([f"{report['experts']} experts padded to {report['expert_rows']} with zero experts "
              "no token routes to, so that the mesh's expert axis divides them"]
             if report["expert_rows"] > report["experts"] else []),
           "per device: " + ", ".join(f"{k} {gib(pd[k])}" for k in (*GROUPS, "temporaries")),
           f"total {gib(pd['total'])} of {gib(report['hbm_bytes'])}: "
           + ("fits" if report["fits"] else "DOES NOT FIT"),
           f"FLOPs per step: {report['compiled_flops']:.4g} compiled"
           + (f" + {report['kernel_flops']:.4g} in Pallas kernels (not counted by the "
              "compiler)" if report["kernel_flops"] else "")
           + f", {report['reference_flops']:.4g} from 6N + attention"]
  if report["remat_flops"]:
    lines.append(f"  of the compiled FLOPs, {report['remat_flops']:.4g} recompute what remat did "
                 "not keep")
  if report["estimated_step_seconds"]:
    lines.append(f"estimated step: {report['estimated_step_seconds'] * 1e3:.1f} ms (from the "
                 f"{report['step_seconds_from']}), MFU {report['estimated_mfu']:.1%}")
  for kind, c in sorted(report["collectives"].items()):
    lines.append(f"  {kind}: {c['count']} ops, {gib(c['bytes'])} per device")
  gathers = report["ffn_weight_gathers"]
  lines.append(f"  of the all-gathers, {gathers['count']} gather FFN weights "
               f"({gib(gathers['bytes'])} per device)")
  if not report["fits"]:
    lines.append(TO_FIT)
  return "\n".join(lines)
