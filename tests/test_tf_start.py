"""What a process's TensorFlow leaves out at start (flexolmo_jax/data/tf_start.py): Keras's
scikit-learn wrappers, and AutoGraph's rewrite of functions that need none. The batches do not
change."""
import itertools
import subprocess
import sys
import textwrap

import numpy as np

from flexolmo_jax.data import tasks, tf_start
from tests.test_tasks import BATCH, SEQ, task_name  # noqa: F401 (a fixture)


def test_keras_starts_without_scikit_learn_which_anyone_else_still_imports():
  run = subprocess.run([sys.executable, "-c", textwrap.dedent("""
      import sys
      from flexolmo_jax.cli import process
      process.tune()
      import seqio
      from keras.src.wrappers import fixes
      print("keras" in sys.modules, "sklearn" in sys.modules, fixes.sklearn is None)
      import sklearn.base
      print(sklearn.base.BaseEstimator.__name__)
      """)], capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.split("\n")[:2] == ["True False True", "BaseEstimator"]


def test_plain_tracing_gives_the_batches_autograph_gives(task_name, monkeypatch):  # noqa: F811
  """The same stream built with AutoGraph rewriting every function and with the plain rules."""
  from tensorflow.python.autograph.core import config
  from tensorflow.python.autograph.impl import conversion
  import seqio

  def first(n=4):
    return list(itertools.islice(tasks.lm_batches(task_name, seq_len=SEQ, batch_size=BATCH,
                                                  seed=5), n))

  tf_start.trace_plainly()
  assert conversion.is_allowlisted(seqio.preprocessors.tokenize)
  assert not conversion.is_allowlisted(seqio.utils.trim_and_pack_dataset)
  plain = first()
  monkeypatch.setattr(config, "CONVERSION_RULES",
                      config.CONVERSION_RULES[len(tf_start.PLAIN_MODULES):])
  monkeypatch.setattr(tf_start, "trace_plainly", lambda: None)
  assert not conversion.is_allowlisted(seqio.preprocessors.tokenize)
  rewritten = first()
  assert len(plain) == len(rewritten) == 4
  for a, b in zip(plain, rewritten):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
