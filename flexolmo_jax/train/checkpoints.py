"""Training checkpoints: Orbax ``CheckpointManager`` under ``<workdir>/checkpoints``.

A checkpoint holds the step, the trainable parameters and the optimizer state, plus a JSON item
(``meta``) with the data-stream position, the RNG, the run's stream-defining settings, a digest of
the state's structure and the metrics of the steps not logged yet. A save is finalized by an
atomic rename, so a save killed half-way leaves a temporary directory that is never restored
from. A resume is refused, naming the checkpoint, when the stream settings or the state's
structure differ from the run's (another model, batch or seed).
"""
from __future__ import annotations

import hashlib
import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def manager(workdir: str, keep: int, asynchronous: bool) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=asynchronous))


def save(mgr: ocp.CheckpointManager, state, meta: dict, force: bool = False) -> None:
  mgr.save(int(meta["step"]), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=force)


def state_structure(state) -> str:
  """A digest of the training state's leaves (paths, shapes, dtypes): what a checkpoint must
  match to be resumed by a trainer."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  text = "\n".join(f"{jax.tree_util.keystr(path)}|{leaf.shape}|{leaf.dtype}"
                   for path, leaf in leaves)
  return hashlib.sha256(text.encode()).hexdigest()


def restore(mgr: ocp.CheckpointManager, state, shardings, settings: dict):
  """(state, meta) of the newest complete checkpoint, or None; ``state`` and ``shardings`` give
  the structure and placement, ``settings`` the stream settings it must have been saved with."""
  steps = [s for s in mgr.all_steps() if is_complete(mgr.directory / str(s))]
  if not steps:
    return None
  step = max(steps)
  where = mgr.directory / str(step)
  meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  saved = {"data_shards": 1, **meta["train_config"]}
  changed = {k: (saved.get(k), settings[k]) for k in settings if saved.get(k) != settings[k]}
  if changed:
    raise ValueError(
        f"Cannot resume from {where}: {changed} (saved, now) define the data stream; use the "
        "saved values or a new output directory.")
  structure = state_structure(state)
  if meta.get("state_structure", structure) != structure:
    raise ValueError(
        f"Cannot resume from {where}: it holds the state of another model (another --model, "
        "config or experts than this command's); use the run's own settings or a new output "
        "directory (--out).")
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, shardings)
  restored = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  return restored["state"], meta


def host_window(window) -> list[dict]:
  """The metrics of the steps not logged yet, as JSON for a checkpoint: [value, dtype] each."""
  return [{k: [np.asarray(v).tolist(), np.asarray(v).dtype.str] for k, v in m.items()}
          for m in jax.device_get(window)]


def restore_window(saved) -> list[dict]:
  """:func:`host_window` read back, values in their dtypes (so means round as before); their
  token counts are zeroed, as their time was spent before the restart (tokens/s counts only
  this process's steps)."""
  return [{k: np.zeros((), dtype) if k == "tokens" else np.asarray(v, dtype)
           for k, (v, dtype) in m.items()} for m in saved]


def is_complete(step_dir) -> bool:
  """A finalized Orbax step directory (temporary directories of unfinished saves have other
  names)."""
  step_dir = os.fspath(step_dir)
  return (os.path.basename(step_dir).isdigit()
          and os.path.exists(os.path.join(step_dir, "_CHECKPOINT_METADATA"))
          and os.path.exists(os.path.join(step_dir, "meta", "metadata")))
