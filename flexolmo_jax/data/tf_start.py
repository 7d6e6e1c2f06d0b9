"""TensorFlow serves only tf.data here (seqio's pipelines). Two things it does at every start
that no pipeline of ours needs, left out; each command process pays them once, and a training
command is a few seconds of start-up before its first step.

- Keras 3, which TensorFlow imports eagerly, imports scikit-learn for its optional estimator
  wrappers (0.6 s). Keras asks for it inside ``try: import sklearn except ImportError``; those
  requests are answered "not installed". Anyone else importing scikit-learn gets it.
- AutoGraph rewrites every Python function a ``Dataset.map`` traces, parsing and analysing its
  source (1.2 s of a process's first pipeline). Of seqio's functions only the packing loop in
  ``seqio.utils`` iterates over a tensor; the tokenizer, preprocessors and feature converter,
  and ours, are straight-line TensorFlow and are traced as written. A function that did need
  the rewrite would fail loudly at trace time (``OperatorNotAllowedInGraphError``), not differ.
"""
from __future__ import annotations

import importlib.abc
import sys

# Modules whose functions tf.data traces without AutoGraph.
PLAIN_MODULES = ("seqio.vocabularies", "seqio.preprocessors", "seqio.feature_converters",
                 "flexolmo_jax")
# The package of Keras whose modules ask for scikit-learn, each in a try/except ImportError.
_KERAS_WRAPPERS = "keras.src.wrappers"


class _NoSklearnForKeras(importlib.abc.MetaPathFinder):
  """Answers Keras's optional import of scikit-learn with ImportError; passes anything else on."""

  def find_spec(self, fullname, path=None, target=None):
    if fullname == "sklearn" and _initializing(_KERAS_WRAPPERS + "."):
      raise ModuleNotFoundError("scikit-learn is not loaded for Keras's wrappers in a "
                                "flexolmo process (flexolmo_jax/data/tf_start.py)", name=fullname)
    return None


def _initializing(prefix: str) -> bool:
  """Whether a module named ``prefix...`` is being imported now."""
  return any(name.startswith(prefix) and getattr(getattr(module, "__spec__", None),
                                                 "_initializing", False)
             for name, module in list(sys.modules.items()))


def keep_sklearn_out_of_keras() -> None:
  """Installs the finder (once); call before TensorFlow is imported."""
  if not any(isinstance(f, _NoSklearnForKeras) for f in sys.meta_path):
    sys.meta_path.insert(0, _NoSklearnForKeras())


def trace_plainly() -> None:
  """Adds rules (once) by which AutoGraph leaves :data:`PLAIN_MODULES` unconverted."""
  from tensorflow.python.autograph.core import config

  rules = tuple(config.DoNotConvert(m) for m in PLAIN_MODULES)
  if list(map(str, config.CONVERSION_RULES[:len(rules)])) != list(map(str, rules)):
    config.CONVERSION_RULES = rules + tuple(config.CONVERSION_RULES)
