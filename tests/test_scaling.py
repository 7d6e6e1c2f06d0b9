"""docs/scaling.md's memory arithmetic is what flexolmo_jax/memory.py computes from the presets,
and the presets' parameter counts are the published ones."""
import os
import re

from flexolmo_jax import memory
from flexolmo_jax.config import load_model_config

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                   "scaling.md")


def tables(text):
  """Every markdown table of ``| item | GB |`` rows, in order, as {item: value}."""
  out, current = [], None
  for line in text.splitlines():
    m = re.fullmatch(r"\| (.+?) \| ([0-9.]+) \|", line)
    if m:
      current = {} if current is None else current
      current[m.group(1)] = float(m.group(2))
    elif current is not None:
      out.append(current)
      current = None
  return out + ([current] if current else [])


def expected(budget):
  rows = {k: round(v / memory.GB, 2) for k, v in budget.rows.items()}
  return rows, round(budget.total / memory.GB, 2), round(budget.per_device / memory.GB, 2)


def test_the_documented_memory_arithmetic_is_computed_from_the_configs():
  text = open(DOC).read()
  olmo, flex = load_model_config("olmo2_7b"), load_model_config("flexolmo_7x7b")
  assert olmo.num_params() == 7_298_617_344 and f"{olmo.num_params():,}" in text
  assert flex.num_params() == 33_270_665_216 and f"{flex.num_params():,}" in text
  assert flex.active_params() == 24_613_621_760 and f"{flex.active_params():,}" in text
  assert f"{memory.expert_trainable_params(olmo):,} trained parameters" in text
  assert f"{memory.kv_cache_bytes_per_token(flex):,} bytes per token" in text
  training, serving = tables(text)
  for table, budget, label in ((training, memory.expert_training(olmo, fsdp=8),
                                "per device (fsdp=8)"),
                               (serving, memory.inference(flex, devices=8, cached_tokens=8 * 4096),
                                "per device (8)")):
    rows, total, per_device = expected(budget)
    for item, gb in rows.items():
      key = item if item in table else next(k for k in table if k.startswith(item))
      assert table[key] == gb, (item, table[key], gb)
    assert table["total"] == total and table[label] == per_device
  # The expert's optimizer state is a fraction of a full fine-tune's (frozen leaves get none).
  assert memory.expert_trainable_params(olmo) < 0.6 * olmo.num_params()
