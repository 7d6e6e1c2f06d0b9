"""TensorFlow serves only tf.data here (seqio's pipelines). Two things it does at every start
that no pipeline of ours needs, left out; each command process pays them once, and a training
command is a few seconds of start-up before its first step.

- Keras 3, which TensorFlow imports eagerly, with scikit-learn for its estimator wrappers: an
  expert-training command's imports took 5.1 s with them, 4.0 s without. Before TensorFlow is
  imported, a process of ours routes ``tf.keras`` to the legacy package
  (``TF_USE_LEGACY_KERAS``), which is not installed: TensorFlow then skips the eager import.
  The one module seqio imports that asks for ``tf.keras`` at import, tensorflow_text (for its
  optional Keras layers), is deferred: seqio uses it only for SentencePiece, and on that first
  use the variable is removed and tensorflow_text imports Keras 3 as usual. A user who set the
  variable or installed ``tf_keras`` keeps TensorFlow's own behaviour; child processes inherit
  the choice with a marker variable.
- AutoGraph rewrites every Python function a ``Dataset.map`` traces, parsing and analysing its
  source (1.2 s of a process's first pipeline). Of seqio's functions only the packing loop in
  ``seqio.utils`` iterates over a tensor; the tokenizer, preprocessors and feature converter,
  and ours, are straight-line TensorFlow and are traced as written. A function that did need
  the rewrite would fail loudly at trace time (``OperatorNotAllowedInGraphError``), not differ.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

# Modules whose functions tf.data traces without AutoGraph.
PLAIN_MODULES = ("seqio.vocabularies", "seqio.preprocessors", "seqio.feature_converters",
                 "flexolmo_jax")
LEGACY_KERAS_ENV = "TF_USE_LEGACY_KERAS"
OURS_ENV = "FLEXOLMO_KERAS_DEFERRED"      # set beside it: the variable is ours, not the user's


class _DeferredModule(types.ModuleType):
  """Stands in for ``tensorflow_text`` until an attribute is asked for: then Keras is let back
  in and the real module is imported in its place."""

  def __getattr__(self, name):
    if os.environ.get(OURS_ENV):
      os.environ.pop(LEGACY_KERAS_ENV, None)
      os.environ.pop(OURS_ENV, None)
    if sys.modules.get(self.__name__) is self:
      del sys.modules[self.__name__]
    return getattr(importlib.import_module(self.__name__), name)


def leave_keras_out() -> None:
  """Call before TensorFlow is imported: it will start without Keras (module docstring)."""
  if "tensorflow" in sys.modules or importlib.util.find_spec("tf_keras") is not None:
    return
  if LEGACY_KERAS_ENV in os.environ and not os.environ.get(OURS_ENV):
    return
  spec = importlib.util.find_spec("tensorflow_text")
  if spec is None or "tensorflow_text" in sys.modules:
    return
  os.environ[LEGACY_KERAS_ENV] = os.environ[OURS_ENV] = "1"
  stand_in = _DeferredModule(spec.name)
  stand_in.__file__ = spec.origin      # what scans of sys.modules ask for (AutoGraph's do)
  sys.modules[spec.name] = stand_in


def trace_plainly() -> None:
  """Adds rules (once) by which AutoGraph leaves :data:`PLAIN_MODULES` unconverted."""
  from tensorflow.python.autograph.core import config

  rules = tuple(config.DoNotConvert(m) for m in PLAIN_MODULES)
  if list(map(str, config.CONVERSION_RULES[:len(rules)])) != list(map(str, rules)):
    config.CONVERSION_RULES = rules + tuple(config.CONVERSION_RULES)
