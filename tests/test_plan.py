"""``flexolmo plan``'s parsing: collectives from a module's text, target names. The compiled plans
are tested in tests/e2e/test_plan.py (each compiles three programs)."""
import pytest

from flexolmo_jax.plan import report, targets


def test_collectives_are_read_from_the_module_text():
  hlo = """
  %ag = f32[8,64]{1,0} all-gather(f32[2,64]{1,0} %p), dimensions={0}
  %ar-start = (bf16[4,4]{1,0}, f32[2]{0}) all-reduce-start(%a, %b), to_apply=%add
  %ar-done = (bf16[4,4]{1,0}, f32[2]{0}) all-reduce-done(%ar-start)
  %a2a = f8e4m3fn[16]{0} all-to-all(f8e4m3fn[16]{0} %q), dimensions={0}
  %x = f32[8]{0} add(f32[8]{0} %y, f32[8]{0} %z)
  """
  assert report.collectives(hlo) == {"all-gather": {"count": 1, "bytes": 8 * 64 * 4},
                                     "all-reduce": {"count": 1, "bytes": 4 * 4 * 2 + 2 * 4},
                                     "all-to-all": {"count": 1, "bytes": 16}}


def test_gathers_of_ffn_weights_are_told_from_other_all_gathers():
  """An all-gather whose result is shaped like stacked FFN weights, [..., d_model, d_ff] or
  [..., d_ff, d_model], whole or cut as the mesh cuts those dimensions, counts; activations,
  attention weights and other collectives do not."""
  from tests.helpers import tiny

  cfg = tiny(d_model=64, d_ff=96)
  hlo = """
  %w = bf16[2,32,96]{2,1,0} all-gather(bf16[2,16,96]{2,1,0} %p), dimensions={1}
  %d-start = (f32[4,96,64]{2,1,0}, f32[64]{0}) all-gather-start(%a, %b), dimensions={0}
  %d-done = (f32[4,96,64]{2,1,0}, f32[64]{0}) all-gather-done(%d-start)
  %h = f32[64,96]{1,0} all-gather(f32[32,96]{1,0} %h0), dimensions={0}
  %o = f32[4,16,64]{2,1,0} all-gather(f32[2,16,64]{2,1,0} %o0), dimensions={0}
  %c = f32[4,12,48]{2,1,0} all-gather(f32[2,12,48]{2,1,0} %c0), dimensions={0}
  %r = f32[2,64,96]{2,1,0} all-reduce(f32[2,64,96]{2,1,0} %g), to_apply=%add
  """
  assert report.ffn_weight_gathers(hlo, cfg, embed_parts=2) == {
      "count": 2, "bytes": 2 * 32 * 96 * 2 + 4 * 96 * 64 * 4}
  # d_model cut in two is no FFN weight where the mesh does not cut it so.
  assert report.ffn_weight_gathers(hlo, cfg, embed_parts=1)["count"] == 1
  # [4, 16, 64] (attention's output weights) would be d_ff = 128 cut by 8: not where mlp is whole.
  assert report.ffn_weight_gathers(hlo, cfg.replace(d_ff=128), embed_parts=2)["count"] == 0
  assert report.ffn_weight_gathers(hlo, cfg.replace(d_ff=128), mlp_parts=8)["count"] == 1
  assert report.ffn_weight_gathers(hlo, cfg.replace(d_ff=64), 8) == {"count": 0, "bytes": 0}


def test_bad_targets_are_named():
  with pytest.raises(ValueError, match="v5e:4x4"):
    targets.resolve("v9z:2x2")
  with pytest.raises(ValueError, match="--num-slices"):
    targets.resolve("cpu", num_slices=2)


def test_a_runs_gin_files_set_what_the_plan_compiles_and_flags_win(tmp_path):
  """``plan --gin-file`` reads the run's files as its command does (model preset, the run's
  gin file, then the user's); flags given on top win; without files the plan's defaults hold,
  and the caller's gin state is left as it was."""
  import gin

  from flexolmo_jax.config import MeshConfig
  from flexolmo_jax.plan import settings

  run = tmp_path / "run.gin"
  run.write_text("BATCH_SIZE = 32\nSEQ_LEN = 64\nANCHOR_DTYPE = 'bfloat16'\nDTYPE = 'bfloat16'\n"
                 "flexolmo.TrainConfig.mesh = @flexolmo.MeshConfig()\n"
                 "flexolmo.MeshConfig.fsdp = 4\nflexolmo.MeshConfig.data = -1\n"
                 "flexolmo.ModelConfig.remat = 'full'\n")
  gin.bind_parameter("flexolmo.MeshConfig.tensor", 2)
  got = settings.resolve("train-expert", "tiny", [str(run)])
  assert (got.train.batch_size, got.train.seq_len) == (32, 64)
  assert (got.train.mesh.data, got.train.mesh.fsdp, got.train.mesh.tensor) == (-1, 4, 1)
  assert got.model.remat == "full" and got.model.dtype == "bfloat16"
  assert got.model.d_model == 64 and got.expert.anchor_dtype == "bfloat16"
  assert gin.query_parameter("flexolmo.MeshConfig.tensor") == 2
  gin.clear_config()
  flags = settings.resolve("train-expert", "tiny", [str(run)], batch_size=8, mesh={"fsdp": -1},
                           anchor_dtype="float32")
  assert (flags.train.batch_size, flags.train.seq_len) == (8, 64)
  assert flags.train.mesh == MeshConfig(fsdp=-1) and flags.expert.anchor_dtype == "float32"
  plain = settings.resolve("pretrain", "tiny")
  assert (plain.train.batch_size, plain.train.seq_len, plain.train.mesh) == (
      16, 256, MeshConfig(fsdp=-1))
  bad = tmp_path / "bad.gin"
  bad.write_text("flexolmo.TrainConfig.no_such = 1\n")
  with pytest.raises(ValueError, match=r"bad.gin.*no_such"):
    settings.resolve("pretrain", "tiny", [str(bad)])
