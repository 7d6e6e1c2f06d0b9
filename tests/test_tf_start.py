"""What a process's TensorFlow leaves out at start (flexolmo_jax/data/tf_start.py): Keras, and
AutoGraph's rewrite of functions that need none. SentencePiece and the batches do not change."""
import itertools
import os
import subprocess
import sys
import textwrap

import numpy as np

from flexolmo_jax.data import tasks, tf_start
from tests.test_tasks import BATCH, SEQ, task_name  # noqa: F401 (a fixture)


def test_tensorflow_starts_without_keras_and_sentencepiece_still_encodes(tmp_path):
  """A command process imports seqio and TensorFlow without Keras (or scikit-learn); its first
  SentencePiece encoding in TensorFlow brings tensorflow_text, and Keras with it, in: the ids
  are the Python encoder's. ``import keras`` itself works all along."""
  import sentencepiece as spm

  text = " ".join(f"word{i % 37} and the line {i}" for i in range(400))
  spm.SentencePieceTrainer.train(sentence_iterator=iter(text.split(" line ")), vocab_size=60,
                                 model_prefix=str(tmp_path / "sp"), minloglevel=2)
  run = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
      import os, sys
      from flexolmo_jax.cli import process
      process.tune()
      import seqio, tensorflow as tf
      [getattr(m, "__file__", None) for m in list(sys.modules.values())]   # as AutoGraph scans
      print("keras" in sys.modules, "sklearn" in sys.modules)
      vocab = seqio.SentencePieceVocabulary({str(tmp_path / "sp.model")!r})
      text = "word3 and the line 12"
      print(vocab.encode_tf(tf.constant(text)).numpy().tolist() == vocab.encode(text))
      print("keras" in sys.modules, "TF_USE_LEGACY_KERAS" in os.environ)
      """)], capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.split("\n")[:3] == ["False False", "True", "True False"], run.stdout
  assert "tf_keras" not in run.stderr


def test_a_user_who_routes_keras_keeps_tensorflows_behaviour():
  """TF_USE_LEGACY_KERAS set by the user (to 0 here): Keras 3 is imported as TensorFlow does."""
  run = subprocess.run([sys.executable, "-c", textwrap.dedent("""
      import sys
      from flexolmo_jax.cli import process
      process.tune()
      import seqio
      print("keras" in sys.modules)
      """)], capture_output=True, text=True, timeout=120,
      env={**{k: v for k, v in os.environ.items() if k != tf_start.OURS_ENV},
           tf_start.LEGACY_KERAS_ENV: "0"})
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.split("\n")[0] == "True", (run.stdout, run.stderr[-2000:])


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
