"""XLA:CPU's collective patience flags, read by a process of 8 fake devices whose all-reduce
arrives late on all but one (a process per case: not a unit test)."""
import pytest


# Device i of 8 works i * units matrix products before an all-reduce: device 0 waits seconds.
_LATE_ARRIVAL = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from flexolmo_jax.distributed import patient_cpu_collectives
patient_cpu_collectives()
mesh = Mesh(np.array(jax.devices()), ("d",))
def late(x):
  n = 1 + jax.lax.axis_index("d") * {units}
  y = jax.lax.fori_loop(0, n, lambda _, y: jnp.tanh(y @ y.T), x[0])
  return jax.lax.psum(y, "d")[None]
out = jax.jit(jax.shard_map(late, mesh=mesh, in_specs=P("d"), out_specs=P("d")))(
    jnp.full((8, 256, 256), 0.01))
print("all-reduce done", float(out.sum()) > 0)
"""
_WARN_1S = "--xla_cpu_collective_call_warn_stuck_timeout_seconds=1"


# 3000 units: device 7 then works about 8 s on 2 cores. With 1000 (about 2.7 s in all) the late
# devices' threads could all run before device 0 reached the all-reduce, and nothing waited 1 s.
@pytest.mark.parametrize("user_flags, units, survives", [
    (_WARN_1S, 3000, True),
    (f"{_WARN_1S} --xla_cpu_collective_call_terminate_timeout_seconds=1", 3000, False),
])
def test_xla_reads_the_patience_flags(user_flags, units, survives):
  """The flag names are live in this jaxlib and a user's values are kept: with a 1 s warning the
  late all-reduce warns and finishes; with a 1 s termination as well, XLA aborts the process (as
  it did to a CI run whose host stalled, before ``patient_cpu_collectives`` existed)."""
  import os
  import subprocess
  import sys

  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {user_flags}"}
  done = subprocess.run([sys.executable, "-c", _LATE_ARRIVAL.format(units=units)], env=env,
                        capture_output=True, text=True, timeout=600)
  if survives:
    assert done.returncode == 0, done.stderr[-3000:]
    assert "all-reduce done True" in done.stdout
    assert "may be stuck" in done.stderr     # the 1 s warning: device 0 did wait
  else:
    assert done.returncode != 0
    assert "Termination timeout" in done.stderr
