"""What a user sees on the console.

TensorFlow, XLA, seqio and Orbax print start-up notices at every process start (the oneDNN notice,
``failed call to cuInit``, CUDA stub messages, ``All log messages before absl::InitializeLog()``,
seqio's "uncached FunctionDataset" warning, Orbax's absl warnings). None of them is something a
user of a command can act on, so by default they are silenced before those libraries initialize;
``--verbose`` (or ``FLEXOLMO_VERBOSE=1``, which the processes a command starts inherit) keeps
them. Our own progress lines, results and warnings (Python ``warnings`` and the
``flexolmo_jax`` loggers) are never silenced.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import io
import logging
import os
import re
import sys
import tempfile

VERBOSE_ENV = "FLEXOLMO_VERBOSE"
VERBOSE_FLAGS = ("--verbose",)
# Read by TensorFlow's and XLA's C++ logging (and gRPC's) when they load: errors and below off.
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "NONE", "GLOG_minloglevel": "3"}
# Python loggers besides absl's (through which seqio, Orbax and TFDS log) with start-up noise.
QUIET_LOGGERS = ("tensorflow", "jax._src.xla_bridge")


# What TensorFlow's native code prints to the process's stderr while it loads, whatever
# TF_CPP_MIN_LOG_LEVEL says (it logs before its logging is initialized).
NATIVE_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|cudart_stub\.cc|Could not find cuda drivers|"
    r"failed call to cuInit|oneDNN custom operations|cpu_feature_guard\.cc|"
    r"To enable the following instructions|Unable to register cu(DNN|FFT|BLAS) factory|"
    r"computation_placer|TF-TRT Warning")


def verbose() -> bool:
  return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def take_verbose_flag(argv: list[str]) -> list[str]:
  """``argv`` without ``--verbose``; if it was there, this process and the processes it
  starts are verbose."""
  rest = [a for a in argv if a not in VERBOSE_FLAGS]
  if len(rest) != len(argv):
    os.environ[VERBOSE_ENV] = "1"
  return rest


def configure() -> None:
  """Silences the libraries' start-up noise unless verbose. Call before TensorFlow, JAX or absl
  are imported: their C++ logging reads the environment once, when it loads."""
  if verbose():
    return
  for key, value in QUIET_ENV.items():
    os.environ.setdefault(key, value)
  from absl import logging as absl_logging   # pure Python: loads neither TensorFlow nor XLA

  absl_logging.set_verbosity(absl_logging.ERROR)
  for name in QUIET_LOGGERS:
    logging.getLogger(name).setLevel(logging.ERROR)
  if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlow)
                                                 for f in sys.meta_path):
    sys.meta_path.insert(0, _QuietTensorFlow())


@contextlib.contextmanager
def library_chatter():
  """Runs a library call whose console chatter (TFDS's banners on stdout, its progress bars) says
  nothing to a user: kept only when verbose."""
  if verbose():
    yield
    return
  import tensorflow_datasets as tfds

  tfds.disable_progress_bar()
  with contextlib.redirect_stdout(io.StringIO()):
    yield


@contextlib.contextmanager
def filtered_native_stderr(noise: re.Pattern = NATIVE_NOISE):
  """Runs the block with the process's stderr (file descriptor 2, where native code writes) sent
  to a temporary file, then writes back every line except ``noise``."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode("utf-8", "replace").splitlines(keepends=True)
      kept = "".join(line for line in lines if not noise.search(line))
      if kept:
        sys.stderr.write(kept)
        sys.stderr.flush()


class _QuietTensorFlow(importlib.abc.MetaPathFinder):
  """Loads TensorFlow, whenever something first imports it, inside
  :func:`filtered_native_stderr`; commands that never import it pay nothing."""

  def find_spec(self, name, path=None, target=None):
    if name != "tensorflow":
      return None
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
      return spec
    load = spec.loader.exec_module

    def exec_module(module):
      if self in sys.meta_path:
        sys.meta_path.remove(self)
      with filtered_native_stderr():
        load(module)

    spec.loader.exec_module = exec_module
    return spec
