"""``flexolmo plan``: a run's real programs compiled ahead of time for a target (this host, or a
TPU pod through libtpu on any host), materializing nothing, with the compiler's memory, FLOPs,
step time and collectives (docs/scaling.md).

- ``targets``: the devices and the chip's memory and peak of a target name;
- ``programs``: a task's jitted step with its abstract, sharded arguments;
- ``report``: compiles a program and reads what the compiler says of it.
"""

# The steps ``plan`` compiles (here, so that the CLI lists them without importing the programs).
TASKS = ("pretrain", "train-dense", "train-expert", "tune-router", "eval", "prefill", "decode")
