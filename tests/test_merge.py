"""Merging experts, opting them in and out, and refusing bad inputs (docs/method.md §6), on
well-formed artifacts with random weights (tests/artifacts.py's ``tiny``)."""
import os
import shutil

import jax
import numpy as np
import pytest

from flexolmo_jax import cli
from flexolmo_jax.checkpoint import integrity, merged_model, store
from flexolmo_jax.flexolmo import expert, merge, router_init
from tests.helpers import data_file, edited_copy, lm_batch, logits_of, same_tree


@pytest.fixture(scope="module")
def merged_all(tiny, tmp_path_factory):
  out = tmp_path_factory.mktemp("merged") / "all"
  return merge.merge(tiny["public"], list(tiny["experts"].values()), str(out))


@pytest.fixture(scope="module")
def tokens():
  return lm_batch(256, batch=2, length=64)["decoder_input_tokens"]


def test_merged_pair_equals_the_two_expert_model_its_owner_trained(tiny, merged_all, tmp_path,
                                                                   tokens):
  """The model an owner's trainer runs (expert.assemble of the frozen public model, its router
  row and the trainable expert) is what the merge rebuilds, bit for bit."""
  code = tiny["experts"]["code"]
  cfg2 = store.config_from_json(store.read_manifest(code)["config"], "code")
  r_pub = router_init.public_rows("random", tiny["public"],
                                  store.read_manifest(tiny["public"])["fingerprint"],
                                  cfg2.n_layers, cfg2.d_model)
  trained = expert.assemble(tiny["params"], r_pub, store.load_params(code))
  reference = logits_of(cfg2, jax.device_get(trained), tokens)
  pair = merge.merge(tiny["public"], [code], str(tmp_path / "pair"))
  cfg, params = merged_model.load_merged(pair)
  assert cfg.experts == ("public", "code") and cfg.top_k == 2 and cfg.negative_bias
  np.testing.assert_array_equal(logits_of(cfg, params, tokens), reference)     # bitwise
  cfg, params = merged_model.load_merged(merged_all, experts="public,code")
  np.testing.assert_array_equal(logits_of(cfg, params, tokens), reference)


def test_every_owner_opted_out_leaves_the_public_model(tiny, merged_all, tokens):
  """The extraction evaluation's "expert out" side: the merged model opted in to the public
  expert alone (its router softmax over one expert is exactly 1) computes the public model."""
  cfg, params = merged_model.load_merged(merged_all, experts="public")
  assert cfg.experts == ("public",) and cfg.top_k == 1
  manifest = store.read_manifest(tiny["public"], "public")
  dense_cfg = store.config_from_json(manifest["config"], "public")
  np.testing.assert_allclose(logits_of(cfg, params, tokens),
                             logits_of(dense_cfg, store.load_params(tiny["public"]), tokens),
                             rtol=1e-5, atol=1e-5)


def test_merge_order_does_not_matter(tiny, merged_all, tmp_path, tokens):
  reverse = merge.merge(tiny["public"], list(tiny["experts"].values())[::-1], str(tmp_path / "rev"))
  assert same_tree(merged_all, reverse)          # byte-identical directories
  manifest = store.read_manifest(merged_all, "merged")
  assert manifest["experts"] == ["public", "code", "legal", "math", "prose"]
  assert set(manifest["data_cards"]) == set(manifest["experts"])
  assert manifest["data_cards"]["math"]["sources"] == ["flexmix_math/1.0.0"]


def test_process_0_of_a_multi_process_launch_merges_like_one_process(tiny, merged_all,
                                                                       tmp_path, capsys):
  """A merge in a 2-process launch: process 0 alone writes the same bytes as a plain merge."""
  out = tmp_path / "launched"
  argv = ["merge", "--public", tiny["public"], *[a for p in tiny["experts"].values() for a in ("--expert", p)],
          "--out", str(out), "--coordinator", "localhost:1", "--num-processes", "2"]
  assert cli.main([*argv, "--process-id", "1"]) == 0 and not out.exists()
  assert cli.main([*argv, "--process-id", "0"]) == 0, capsys.readouterr().err
  assert same_tree(merged_all, str(out))


def test_opt_out_is_exact(tiny, merged_all, tmp_path, tokens):
  without = merge.merge(tiny["public"], [p for n, p in tiny["experts"].items() if n != "math"],
                        str(tmp_path / "without"))
  cfg_a, params_a = merged_model.load_merged(merged_all, exclude="math")
  cfg_b, params_b = merged_model.load_merged(without)
  assert cfg_a == cfg_b
  np.testing.assert_array_equal(logits_of(cfg_a, params_a, tokens),
                                logits_of(cfg_b, params_b, tokens))
  # ... and it differs from the model with math in it.
  cfg_all, params_all = merged_model.load_merged(merged_all)
  assert np.abs(logits_of(cfg_all, params_all, tokens) - logits_of(cfg_b, params_b, tokens)).max() > 0
  # merge --exclude writes exactly that merge, from the inputs or from the merged model.
  excluded = merge.merge(tiny["public"], list(tiny["experts"].values()), str(tmp_path / "excl"),
                         exclude=["math"])
  assert same_tree(excluded, without)
  assert cli.main(["merge", "--public", merged_all, "--exclude", "math",
                   "--out", str(tmp_path / "excl2")]) == 0
  assert same_tree(str(tmp_path / "excl2"), without)


def test_top_k_is_clamped_or_rejected(tiny, tmp_path):
  paths = list(tiny["experts"].values())
  clamp = merge.merge(tiny["public"], paths, str(tmp_path / "clamp"))
  cfg, _ = merged_model.load_merged(clamp, experts=["public", "code"])
  assert cfg.top_k == 2 and merged_model.load_merged(clamp)[0].top_k == 4
  strict = merge.merge(tiny["public"], paths, str(tmp_path / "strict"), top_k_policy="reject")
  with pytest.raises(ValueError, match="top_k=4 is larger than the 2 experts"):
    merged_model.load_merged(strict, experts=["public", "code"])
  with pytest.raises(ValueError, match=r"Unknown expert\(s\) \['news'\]"):
    merged_model.load_merged(strict, exclude=["news"])


def test_refusals_name_the_expert(tiny, tmp_path):
  code = tiny["experts"]["code"]

  def refuse(paths, match, **kw):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
      merge.merge(tiny["public"], paths, str(tmp_path / "out"), **kw)
    assert not os.path.exists(tmp_path / "out")

  other = edited_copy(code, tmp_path / "other", lambda m: m.update(anchor_fingerprint="ab" * 32))
  refuse([other], r"expert 'code' .* trained against public model abababab")
  refuse([code, edited_copy(code, tmp_path / "dup", lambda m: None)], "Two experts are named 'code'")
  refuse([edited_copy(code, tmp_path / "cfg", lambda m: m["config"].update(d_ff=256))],
         r"expert 'code' .* different config .* d_ff=256 \(public 128\)")
  refuse([edited_copy(code, tmp_path / "rows", lambda m: m["config"].update(expert_rows=9))],
         r"rows/manifest.json: expert_rows=9; a saved model holds its own experts only")
  refuse([edited_copy(code, tmp_path / "voc", lambda m: m["vocabulary"].update(size=300))],
         r"expert 'code' .* was trained with the vocabulary byte \(300 ids\), the public model .* "
         r"has byte \(259 ids\)")
  truncated = edited_copy(code, tmp_path / "trunc", lambda m: None)
  victim = data_file(truncated)
  with open(victim, "r+b") as fh:
    fh.truncate(os.path.getsize(victim) // 2)
  refuse([truncated], f"{victim} has .* bytes.*truncated")
  corrupt = edited_copy(code, tmp_path / "corrupt", lambda m: None)
  victim = data_file(corrupt)
  with open(victim, "r+b") as fh:
    fh.seek(100)
    byte = fh.read(1)
    fh.seek(100)
    fh.write(bytes([byte[0] ^ 0xFF]))
  refuse([corrupt], f"{victim} is corrupted")
  refuse([code], r"--exclude \['news'\]: no such expert among the inputs \['code'\]",
         exclude=["news"])
  partial = tmp_path / "half"
  shutil.copytree(code, partial)
  os.remove(partial / store.MANIFEST)
  refuse([str(partial)], "manifest.json is missing")


def test_an_interrupted_merge_leaves_nothing_that_looks_complete(tiny, tmp_path,
                                                                 monkeypatch):
  def interrupted(jobs, workers=0):
    raise KeyboardInterrupt

  monkeypatch.setattr(integrity, "copy_checked", interrupted)
  with pytest.raises(KeyboardInterrupt):
    merge.merge(tiny["public"], list(tiny["experts"].values()), str(tmp_path / "m"))
  assert os.listdir(tmp_path) == []



def test_expert_bias_lowers_every_non_public_experts_bias_by_the_same_amount(tiny, merged_all,
                                                                            tmp_path):
  biased = merge.merge(tiny["public"], list(tiny["experts"].values()), str(tmp_path / "b"),
                       expert_bias=-2.0, progress=lambda _: None)
  plain_rows, rows = merged_model.read_router(merged_all), merged_model.read_router(biased)
  assert set(rows) == set(plain_rows)
  for key, value in plain_rows.items():
    want = value - np.float32(2.0) if key.endswith("/negative_bias") else value
    np.testing.assert_array_equal(rows[key], want, err_msg=key)
  assert "public/negative_bias" not in rows
  assert store.read_manifest(biased)["router"]["expert_bias"] == -2.0
  _, plain = merged_model.load_merged(merged_all)
  _, params = merged_model.load_merged(biased)
  np.testing.assert_array_equal(params["blocks"]["ffn"].pop("negative_bias"),
                                plain["blocks"]["ffn"].pop("negative_bias")
                                - np.float32(2.0) * np.asarray([0, 1, 1, 1, 1], np.float32))
  jax.tree.map(np.testing.assert_array_equal, params, plain)
  # The experts of a merged input already carry their bias: only entering experts get one.
  again = merged_model.read_router(merge.merge(biased, [], str(tmp_path / "again"),
                                               expert_bias=-1.0, progress=lambda _: None))
  for key, value in rows.items():
    np.testing.assert_array_equal(again[key], value, err_msg=key)
  for bad, flags in ((0.5, {}), (-1.0, {"negative_bias": False})):
    with pytest.raises(ValueError, match="expert-bias"):
      merge.merge(tiny["public"], list(tiny["experts"].values()), str(tmp_path / "x"),
                  expert_bias=bad, progress=lambda _: None, **flags)
