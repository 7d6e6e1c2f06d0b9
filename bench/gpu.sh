#!/usr/bin/env bash
# The GPU benchmarks in one command, for a lent H100/H200; under 8 minutes (the steps' time limits
# add up to 7 min 30 s).
#
#   bash bench/gpu.sh            (results in bench/gpu-out/, or in $OUT where that is set)
#
# It uses the machine's own python3 (jax with CUDA, flax, optax, torch, transformers). Packages
# that machine lacks (gin-config; tokamax, whose GPU grouped matmul the dispatch step times, and
# its dependencies) travel as wheels in .whl/ (carried: it is git-ignored) and go to /tmp/site:
#   pip download --no-deps --only-binary=:all: -d .whl gin-config==0.5.0 tokamax==0.0.12 \
#     qwix==0.1.8 einshape==1.0 typeguard==2.13.3 jaxtyping==0.3.11 wadler-lindig==0.1.8 \
#     tensorboardX==2.6.5 immutabledict
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/gpu-out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/machine.txt"

step() {   # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name" | tee "$out/$name.txt"
  timeout "$limit" "$@" 2>&1 | tee -a "$out/$name.txt"
}
# Attention: time and compiled temporaries of each implementation, bf16, 8 sequences.
step attention 90 python3 bench/attention.py --dtype bfloat16 --batch 8 \
  --lengths 1024,2048,4096,8192 --max-gib 60
# Training step against transformers, bf16 at 8 x 1024, dense and MoE.
step train_step 150 python3 bench/train_step.py --dtype bf16 --batch 8 --seq 1024 --skip-expert
# What must fit, and the 1B model's MFU (ours only): small at 32 x 1024, OLMo-2 1B at 8 x 4096.
step fit_small 60 python3 bench/train_step.py --dtype bf16 --batch 32 --seq 1024 --only small \
  --skip-expert --no-hf --reps 2
step fit_1b 90 python3 bench/train_step.py --dtype bf16 --batch 8 --seq 4096 --only olmo2_1b \
  --skip-expert --no-hf --reps 2
# Dropless dispatch on a 7B layer against the dense FFN of the active size; `tokamax` is the
# ragged backend through tokamax's grouped matmul (skipped when not installed).
step moe_dispatch 60 python3 bench/moe_dispatch.py --dtype bf16 --tokens 8192 --d 4096 \
  --ffn 11008 --experts 2,4,8 --top-k 1 --backends dropless,ragged,tokamax,dense
