"""``flexolmo plan`` on this host's 8 fake devices: the compiled program's bytes against the
parameter arithmetic (flexolmo_jax/memory.py), its FLOPs against 6N + attention."""
import pytest

from flexolmo_jax import memory, sharding
from flexolmo_jax.config import MeshConfig
from flexolmo_jax.flexolmo import expert
from flexolmo_jax.plan import programs, report, targets
from flexolmo_jax.train.loop import TrainConfig
from tests.helpers import tiny

pytestmark = pytest.mark.slow
RULES = sharding.ShardingRules()
TRAIN = TrainConfig(batch_size=8, seq_len=32, mesh=MeshConfig(data=2, fsdp=4))
FP32 = 4
# Step counters in the optimizer state: Adam's and the schedule's (int32 each).
COUNTERS = 2 * 4


TARGET = targets.resolve("cpu")
MESH = sharding.make_mesh(TRAIN.mesh, devices=TARGET.devices)


def plan_of(task, cfg, train=TRAIN):
  mesh = sharding.make_mesh(train.mesh, devices=TARGET.devices)
  return report.plan(lambda c: programs.build(task, c, train, mesh, RULES), cfg, TARGET, mesh)


def test_pretrain_bytes_are_the_parameter_arithmetic_and_flops_are_6n():
  cfg = tiny()
  got = plan_of("pretrain", cfg)
  assert got["devices"] == 8 and got["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1}
  assert got["global_bytes"]["params"] == cfg.num_params() * FP32
  assert got["global_bytes"]["optimizer"] == 2 * cfg.num_params() * FP32 + COUNTERS
  assert got["global_bytes"]["frozen"] == 0
  assert got["global_bytes"]["batch"] == 5 * 8 * 32 * 4
  # FSDP over 4: each device holds a quarter of what the fsdp axis divides.
  assert got["per_device_bytes"]["params"] < got["global_bytes"]["params"] / 2
  assert got["per_device_bytes"]["optimizer"] < got["global_bytes"]["optimizer"] / 2
  pd = got["per_device_bytes"]
  assert pd["total"] >= pd["params"] + pd["optimizer"] + pd["batch"] and got["fits"]
  assert abs(got["flops"] / got["reference_flops"] - 1) < 0.1, got
  assert got["kernel_flops"] == 0 and got["flops"] == got["compiled_flops"]   # no Pallas on CPU
  # XLA counts a loop body once: plan extends the FLOPs of 1 and 2 unrolled layers to the
  # scanned model's depth, which must give the unrolled model's own count.
  deeper = cfg.replace(n_layers=3)
  unrolled = plan_of("pretrain", deeper.replace(scan_layers=False))
  assert plan_of("pretrain", deeper)["flops"] == pytest.approx(unrolled["flops"], rel=1e-3)


def test_expert_training_holds_the_public_model_frozen_and_trains_one_ffn():
  cfg = tiny()
  got = plan_of("train-expert", cfg)
  rows = memory.expert_training(cfg, fsdp=4).rows
  assert got["global_bytes"]["params"] == rows["expert parameters (fp32)"]
  assert got["global_bytes"]["optimizer"] == rows["AdamW moments (fp32)"] + COUNTERS
  # The frozen public model, and the public expert's router row per layer.
  assert got["global_bytes"]["frozen"] == (rows["frozen public model"]
                                           + cfg.n_layers * cfg.d_model * FP32)
  assert set(got["shardings"]["params"]) == {"w_gate", "w_up", "w_down", "router",
                                             "negative_bias"}
  # Held in bf16, the frozen public model takes half the bytes; the expert's own do not change.
  half = report.plan(lambda c: programs.build("train-expert", c, TRAIN, MESH, RULES,
                                              expert.ExpertConfig(anchor_dtype="bfloat16")),
                     cfg, TARGET, MESH)
  assert half["global_bytes"]["frozen"] == (rows["frozen public model"] // 2
                                            + cfg.n_layers * cfg.d_model * FP32)
  assert half["global_bytes"]["params"] == got["global_bytes"]["params"]
  assert got["shardings"]["params"]["w_gate"] == str(RULES.spec(("layers", "embed", "mlp")))


def test_router_tuning_trains_only_the_router_and_eval_has_no_optimizer():
  cfg = tiny(experts=("public", "a", "b", "c"), top_k=2)
  got = plan_of("tune-router", cfg)
  router = cfg.n_layers * cfg.num_experts * cfg.d_model * FP32
  assert got["global_bytes"]["params"] == router
  assert got["global_bytes"]["frozen"] == cfg.num_params() * FP32 - router
  evaluation = plan_of("eval", cfg.replace(scan_layers=False))
  assert evaluation["global_bytes"]["optimizer"] == 0
  assert evaluation["global_bytes"]["params"] == cfg.num_params() * FP32
  with pytest.raises(ValueError, match="needs a model with experts"):
    plan_of("tune-router", tiny())


def test_generation_steps_hold_the_kv_cache_and_no_optimizer():
  """prefill: the prompt into an empty cache; decode: one token at the cache's end. The cache
  is its own group: 2 (keys, values) x layers x batch x length x kv heads x head_dim x 4 bytes
  (plus its int32 index), split over the batch axes like the tokens."""
  cfg = tiny()
  cache = 2 * cfg.n_layers * 8 * 32 * cfg.n_kv_heads * cfg.head_dim * FP32 + 4
  for task, tokens in (("prefill", 8 * 32), ("decode", 8)):
    got = plan_of(task, cfg)
    assert got["global_bytes"]["cache"] == cache, task
    assert got["global_bytes"]["params"] == cfg.num_params() * FP32
    assert got["global_bytes"]["optimizer"] == 0 and got["global_bytes"]["batch"] == tokens * 4
    assert got["per_device_bytes"]["cache"] < cache / 4 and got["tokens_per_step"] == tokens
    assert got["fits"] and got["kernel_flops"] == 0


def test_expert_parallel_moves_tokens_and_no_expert_weight():
  """Router tuning of 3 experts over an expert axis of 4 (as 7 over 8): the stacks are padded to
  4; the all-to-all dispatch moves tokens with all-to-alls and gathers no FFN weight, where the
  GSPMD dropless path of the same model gathers them (so the count can see them)."""
  cfg = tiny(experts=("public", "a", "b"), top_k=2, d_ff=96)
  train = TrainConfig(batch_size=8, seq_len=32, mesh=MeshConfig(fsdp=2, expert=4))
  a2a = plan_of("tune-router", cfg.replace(dispatch="alltoall"), train)
  assert a2a["expert_rows"] == 4
  assert a2a["collectives"]["all-to-all"]["count"] >= 2 * cfg.n_layers, a2a["collectives"]
  assert a2a["ffn_weight_gathers"] == {"count": 0, "bytes": 0}, a2a["collectives"]
  gspmd = plan_of("tune-router", cfg.replace(dispatch="dropless"), train)
  assert gspmd["ffn_weight_gathers"]["count"] >= cfg.n_layers


def test_remat_recomputation_is_its_own_line():
  """remat='full' recomputes each layer's forward pass: about a third of a step's FLOPs."""
  cfg = tiny(remat="full")
  got = plan_of("pretrain", cfg)
  plain = plan_of("pretrain", cfg.replace(remat="none"))
  assert plain["remat_flops"] == 0
  assert got["remat_flops"] == pytest.approx(got["compiled_flops"] - plain["compiled_flops"])
  assert 0.2 < got["remat_flops"] / plain["compiled_flops"] < 0.45, got["remat_flops"]
