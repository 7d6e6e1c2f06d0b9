"""What a user sees on the console.

TensorFlow, XLA, seqio and Orbax print notices at every process start (the oneDNN notice,
``failed call to cuInit``, CUDA stub messages, ``All log messages before absl::InitializeLog()``,
seqio's "uncached FunctionDataset" warning, Orbax's absl warnings). None of them is something a
user of a command can act on, so by default they are silenced (set before those libraries
initialize, and a filter on the native stderr for what they print regardless);
``--verbose`` (or ``FLEXOLMO_VERBOSE=1``, which the processes a command starts inherit) keeps
them. Our own progress lines, results and warnings (Python ``warnings`` and the
``flexolmo_jax`` loggers) are never silenced.
"""
from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import re
import subprocess
import sys

VERBOSE_ENV = "FLEXOLMO_VERBOSE"
NO_VERIFY_ENV = "FLEXOLMO_NO_VERIFY"     # read by checkpoint/store.py
# Flags every command takes, anywhere on its command line: each sets its variable for this
# process and the processes it starts.
SWITCHES = {"--verbose": VERBOSE_ENV, "--no-verify": NO_VERIFY_ENV}
# Read when the libraries load: TensorFlow's and XLA's C++ logging, gRPC's, and the Hugging Face
# progress bars and advice (transformers' "Loading weights" bar).
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "NONE", "GLOG_minloglevel": "3",
             "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
# Python loggers besides absl's (through which seqio, Orbax and TFDS log) with start-up noise.
QUIET_LOGGERS = ("tensorflow", "jax._src.xla_bridge")


# What native code (TensorFlow, XLA) writes to the process's stderr, whatever
# TF_CPP_MIN_LOG_LEVEL says: its info and warning lines (absl's "I0000 00:00:00.000 123 file.cc:1]"
# form), and the errors that only say no GPU is there.
NATIVE_NOISE = re.compile(
    r"^[IW]\d{4} \d\d:\d\d:[\d.]+ +\d+ [\w.-]+:\d+\]|"
    r"All log messages before absl::InitializeLog|cudart_stub\.cc|Could not find cuda drivers|"
    r"failed call to cuInit|oneDNN custom operations|cpu_feature_guard\.cc|"
    r"To enable the following instructions|Unable to register cu(DNN|FFT|BLAS) factory|"
    r"computation_placer|TF-TRT Warning|"
    # libtpu on a host without a TPU (plan compiles for TPU topologies there)
    r"TPU_ACCELERATOR_TYPE|TPU_WORKER_HOSTNAMES|Logging before InitGoogle|"
    r"=== Source Location Trace: ===|libtpu_init_utils\.cc|"
    r"Failed to find host bounds for accelerator type")


def verbose() -> bool:
  return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def take_switches(argv: list[str]) -> list[str]:
  """``argv`` without the :data:`SWITCHES`, whose variables are set to 1 for those present."""
  for flag in set(argv) & set(SWITCHES):
    os.environ[SWITCHES[flag]] = "1"
  return [a for a in argv if a not in SWITCHES]


def configure(native: bool = False) -> None:
  """Silences the libraries' start-up noise unless verbose. Call before TensorFlow, JAX or absl
  are imported: their C++ logging reads the environment once, when it loads. ``native``: also
  filter what native code writes to stderr (:func:`filter_native_stderr`; for a process that
  owns its stderr, the command line, not a library caller or a test)."""
  if verbose():
    return
  for key, value in QUIET_ENV.items():
    os.environ.setdefault(key, value)
  from absl import logging as absl_logging   # pure Python: loads neither TensorFlow nor XLA

  absl_logging.set_verbosity(absl_logging.ERROR)
  for name in QUIET_LOGGERS:
    logging.getLogger(name).setLevel(logging.ERROR)
  if native:
    filter_native_stderr()


# The filter process: copies its input to its output, leaving out whole lines that match the
# pattern (argv[1]) and the fragment libtpu writes with no newline after it (the rest of its
# sentence goes to standard output); a partial line is passed on at once unless it may be the
# start of a native log line (so progress bars drawn with '\r' still draw).
_FILTER_PROGRAM = r"""
import os, re, sys
noise = re.compile(sys.argv[1].encode())
fragment = re.compile(rb"Failed to find host bounds for accelerator type: ")
start = re.compile(rb"[IWEF]\d{4} |WARNING: |Failed to find")
def write(data):
    while data:
        data = data[os.write(1, data):]
pending = b""
while True:
    chunk = os.read(0, 1 << 16)
    if not chunk:
        break
    lines = fragment.sub(b"", pending + chunk).split(b"\n")
    pending = lines.pop()
    out = b"".join(line + b"\n" for line in lines if not noise.search(line))
    if pending and not start.match(pending):
        out, pending = out + pending, b""
    write(out)
if pending and not noise.search(pending):
    write(pending)
"""
_filter: subprocess.Popen | None = None
_original_stderr: int | None = None


@contextlib.contextmanager
def native_stdout_silenced():
  """Sends what native code writes to standard output inside the block to /dev/null: libtpu
  writes its start-up complaints about a host without a TPU there, without a newline, so they
  would run into the next line of output."""
  sys.stdout.flush()
  saved = os.dup(1)
  null = os.open(os.devnull, os.O_WRONLY)
  os.dup2(null, 1)
  os.close(null)
  try:
    yield
  finally:
    sys.stdout.flush()
    os.dup2(saved, 1)
    os.close(saved)


def filter_native_stderr() -> None:
  """Sends this process's stderr (file descriptor 2, where TensorFlow's and XLA's native code
  log, whatever TF_CPP_MIN_LOG_LEVEL says) through a small filter process that drops
  :data:`NATIVE_NOISE` lines and passes everything else on, for the rest of the process. At exit
  the filter is drained before the process ends, so no line is lost or comes late."""
  global _filter, _original_stderr
  if _filter is not None:
    return
  sys.stderr.flush()
  _original_stderr = os.dup(2)
  read, write = os.pipe()
  _filter = subprocess.Popen([sys.executable, "-S", "-E", "-c", _FILTER_PROGRAM,
                              NATIVE_NOISE.pattern], stdin=read, stdout=_original_stderr,
                             stderr=subprocess.DEVNULL, close_fds=True)
  os.close(read)
  os.dup2(write, 2)
  os.close(write)
  atexit.register(_drain_filter)


def _drain_filter() -> None:
  sys.stderr.flush()
  os.dup2(_original_stderr, 2)       # the pipe's last writer here goes: the filter sees its end
  try:
    _filter.wait(timeout=5)          # (unless a child process still holds it)
  except subprocess.TimeoutExpired:
    pass


def stderr_is_tty() -> bool:
  """Whether the user sees stderr on a terminal (behind the filter, if there is one)."""
  return os.isatty(_original_stderr if _original_stderr is not None else 2)


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
