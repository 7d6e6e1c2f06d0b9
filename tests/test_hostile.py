"""Artifacts from other organisations are hostile until checked. Each test is the attack or fault
it names: it asserts a clear error naming the file, key or flag, nothing written outside the
output, no file outside it changed, and no traceback."""
import json
import os
import shutil
import struct
import time
import tracemalloc

import jax
import numpy as np
import pytest

from flexolmo_jax.checkpoint import store
from flexolmo_jax.convert import hf, safetensors_io
from flexolmo_jax.data import sources
from tests.artifacts import flexolmo, owner_data, refused, snapshot
from tests.test_loop import make_trainer


def copy_expert(world, tmp_path, edit) -> str:
  """A copy of the owner's expert whose manifest ``edit`` changes."""
  path = str(tmp_path / "expert")
  shutil.copytree(world["expert"], path)
  manifest_path = os.path.join(path, store.MANIFEST)
  with open(manifest_path) as fh:
    manifest = json.load(fh)
  edit(manifest)
  with open(manifest_path, "w") as fh:
    json.dump(manifest, fh)
  return path


def test_a_manifest_listing_a_path_outside_is_refused(world, tmp_path, capsys):
  victim = tmp_path / "victim.txt"
  victim.write_text("precious")
  outside = tmp_path / "x"
  for rel, info in (("../../../x/payload", {"bytes": 0, "sha256": "0" * 64}),
                    (str(victim), {"bytes": 8, "sha256": "0" * 64})):
    bad = copy_expert(world, tmp_path / rel.replace("/", "_"),
                      lambda m: m["files"].update({rel: info}))
    refused(capsys, "merge", "--public", world["public"], "--expert", bad,
            "--out", tmp_path / "out", naming="not a plain relative path inside the checkpoint")
    assert not (tmp_path / "out").exists() and not outside.exists()
  assert victim.read_text() == "precious"


def test_an_edited_evaluation_file_is_evaluated_again(world, tmp_path, capsys, monkeypatch):
  """The same name, the same document count, other text: never the cached numbers."""
  monkeypatch.chdir(tmp_path)
  data = owner_data(tmp_path / "code.jsonl", seed=1)
  args = ("eval", "--model", world["public"], "--data", "code=code.jsonl", "--seq-len", "32",
          "--batch-size", "4")
  assert flexolmo(capsys, *args, "--json", "first.json")[0] == 0
  owner_data(data, seed=2)                         # edited in place: as many documents
  assert flexolmo(capsys, *args, "--json", "second.json")[0] == 0
  assert flexolmo(capsys, *args[:-4], "--seq-len", "32", "--batch-size", "4", "--data-dir",
                  "fresh", "--json", "fresh.json")[0] == 0
  first, second, fresh = (json.load(open(tmp_path / f"{n}.json")) for n in
                          ("first", "second", "fresh"))
  assert second["code"]["loss"] != first["code"]["loss"]
  assert second == fresh


def test_expert_names_that_are_paths_are_refused(world, tmp_path, capsys):
  bad = copy_expert(world, tmp_path, lambda m: m.update(name="..")
                    or m["config"].update(experts=["public", ".."]))
  refused(capsys, "merge", "--public", world["public"], "--expert", bad, "--out", tmp_path / "m",
          naming="Invalid expert name '..'")
  # A Hugging Face export whose flexolmo.json names an expert '..', imported over a directory.
  hf_dir = tmp_path / "hf"
  shutil.copytree(world["hf"], hf_dir)
  (hf_dir / hf.NAMES_FILE).write_text(json.dumps({"experts": ["public", ".."]}))
  victim = tmp_path / "victim"
  (victim / "keep").mkdir(parents=True)
  (victim / "keep" / "file").write_text("mine")
  before = snapshot(tmp_path / "victim")
  refused(capsys, "import-hf", "--hf", hf_dir, "--split", "--overwrite", "--out", victim,
          naming=f"{hf_dir / hf.NAMES_FILE}: Invalid expert name '..'")
  refused(capsys, "import-hf", "--hf", world["hf"], "--names", ".", "--split", "--out",
          tmp_path / "x", naming="Invalid expert name '.'")
  assert snapshot(tmp_path / "victim") == before and not (tmp_path / "x").exists()


def test_a_config_asking_for_a_billion_layers_is_refused_before_anything_is_built(tmp_path,
                                                                                   capsys):
  for key, value, want in (("num_hidden_layers", 10**9, "num_hidden_layers = 1000000000"),
                           ("num_experts", 10**9, "num_experts = 1000000000"),
                           ("hidden_size", "64", "hidden_size = '64'")):
    hf_dir = tmp_path / key
    hf_dir.mkdir()
    config = {"model_type": "flex_olmo", "vocab_size": 512, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_experts": 2, "num_experts_per_tok": 1, key: value}
    (hf_dir / "config.json").write_text(json.dumps(config))
    tracemalloc.start()
    start = time.perf_counter()
    refused(capsys, "import-hf", "--hf", hf_dir, "--out", tmp_path / "out", naming=want)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - start < 5 and peak < 50 << 20, peak


def test_a_tampered_checkpoint_is_refused_by_every_command_that_loads_it(world, tmp_path,
                                                                          capsys):
  merged = tmp_path / "merged"
  shutil.copytree(world["merged"], merged)
  target = max((os.path.join(d, f) for d, _, fs in os.walk(merged / "public" / "params")
                for f in fs), key=os.path.getsize)
  with open(target, "r+b") as fh:           # one flipped byte in the public weights
    fh.seek(os.path.getsize(target) // 2)
    byte = fh.read(1)
    fh.seek(-1, 1)
    fh.write(bytes([byte[0] ^ 1]))
  rel = os.path.relpath(target, merged)
  for argv in (("eval", "--model", merged, "--data", f"code={world['data']}"),
               ("generate", "--model", merged, "--prompt", "x", "--max-new-tokens", "2"),
               ("export-hf", "--model", merged, "--out", tmp_path / "hf")):
    refused(capsys, *argv, naming=f"{rel} is corrupted or was modified")
  assert not (tmp_path / "hf").exists()
  # Trusted local use may skip the hashing (sizes are still checked).
  assert flexolmo(capsys, "generate", "--no-verify", "--model", merged, "--prompt", "x",
                  "--max-new-tokens", "2")[0] == 0


def test_a_public_model_with_changed_weights_and_rewritten_hashes_is_refused(world, tmp_path,
                                                                              capsys):
  """Hashes can be recomputed by anyone; the anchor fingerprint is recomputed from the weights."""
  params = jax.tree.map(np.array, world["params"])          # a host copy
  path = sorted(store.flatten(params))[0].split("/")
  node = params
  for key in path[:-1]:
    node = node[key]
  node[path[-1]] = node[path[-1]] + np.float32(1e-3)
  manifest = {k: v for k, v in store.read_manifest(world["public"]).items()
              if k not in (store.FILES, "format")}
  forged = store.save(str(tmp_path / "public"), params, manifest)   # every hash recomputed
  refused(capsys, "merge", "--public", forged, "--expert", world["expert"],
          "--out", tmp_path / "m", naming="do not match the fingerprint its manifest records")
  assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("flag, value", [("--time", "1:00:00\nrm -rf ~"),
                                         ("--image", "img\n  privileged: true"),
                                         ("--partition", "gpu; curl x"),
                                         ("--service-account", "sa\nhostNetwork: true")])
def test_a_newline_or_shell_in_a_launch_value_is_refused(flag, value, capsys):
  engine = "k8s" if flag in ("--image", "--service-account") else "slurm"
  line = refused(capsys, "launch", engine, "--run", "pretrain", flag, value, "--dry-run",
                 naming=f"launch: {flag}")
  assert "is not a valid value" in line and capsys.readouterr().out == ""


def test_symlinks_in_an_owners_data_are_not_followed(tmp_path, capsys):
  owner = tmp_path / "owner"
  owner.mkdir()
  (owner / "doc.txt").write_text("the only document of this owner")
  (tmp_path / "secret.txt").write_text("a file outside the owner's directory")
  os.symlink(tmp_path / "secret.txt", owner / "host.txt")
  os.symlink("..", owner / "up")
  os.symlink(".", owner / "self")
  stats = sources.scan(sources.SourceSpec(paths=(str(owner),)))
  assert sum(stats.documents.values()) == 1 and stats.links_skipped == 3
  assert [d.text for d in sources.iter_documents(sources.SourceSpec(paths=(str(owner),)))] == \
      ["the only document of this owner"]


def test_a_torn_last_metrics_line_does_not_block_resume(tmp_path):
  first = make_trainer(tmp_path, steps=2, async_checkpoints=False).train()
  assert first.step == 2
  with open(tmp_path / "metrics.jsonl", "a") as fh:
    fh.write('{"step": 3, "kind": "train", "loss": 1.')     # the disk filled up here
  resumed = make_trainer(tmp_path, steps=4, async_checkpoints=False).train()
  assert resumed.step == 4
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
  bad_line = len(records) + 1
  with open(tmp_path / "metrics.jsonl", "a") as fh:
    fh.write("not json\n{}\n")                               # damage that is not a torn write
  with pytest.raises(ValueError, match=rf"metrics.jsonl:{bad_line}: not a metrics record"):
    make_trainer(tmp_path, steps=5, async_checkpoints=False).train()


def test_a_finished_public_model_is_never_replaced_by_more_steps(tmp_path, capsys):
  data = owner_data(tmp_path / "public.jsonl")
  args = ("pretrain", "--data", data, "--out", tmp_path / "run", "--batch-size", "2",
          "--seq-len", "32", "--gin.flexolmo.pretrain.embedding_documents=4")
  assert flexolmo(capsys, *args, "--steps", "2")[0] == 0
  before = snapshot(tmp_path / "run" / "model")
  refused(capsys, *args, "--steps", "3", naming="--steps 3 would replace it")
  # The same run resumed with another model: named, not buried in the checkpointer's errors.
  refused(capsys, *args, "--steps", "2", "--gin.flexolmo.ModelConfig.d_model=32",
          naming="holds the state of another model")
  assert snapshot(tmp_path / "run" / "model") == before


def test_a_file_deleted_while_data_is_prepared_leaves_nothing(tmp_path, monkeypatch):
  owner = tmp_path / "owner"
  owner.mkdir()
  for i in range(3):
    (owner / f"doc{i}.txt").write_text(f"document number {i} " * 10)
  examples = sources._split_examples                 # pylint: disable=protected-access

  def deleting(spec, split):
    (owner / "doc2.txt").unlink(missing_ok=True)     # the owner's sync job removes a file
    yield from examples(spec, split)

  monkeypatch.setattr(sources, "_split_examples", deleting)
  spec = sources.SourceSpec(paths=(str(owner),), validation_fraction=0.0)
  with pytest.raises(sources.DataError, match="changed while 'owner' was being prepared"):
    sources.prepare("owner", spec, str(tmp_path / "tfds"))
  assert not sources.is_prepared(str(tmp_path / "tfds" / "owner" / "1.0.0"))


def _safetensors(path, entries, data: bytes):
  header = json.dumps(entries).encode()
  path.write_bytes(struct.pack("<Q", len(header)) + header + data)
  return str(path)


@pytest.mark.parametrize("entries, data, message", [
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"", "data_offsets"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12,
     "overlapping or non-contiguous"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8,
     "overlapping or non-contiguous"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8,
     "bytes no tensor accounts for"),
    ({"a": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}, b"\0" * 4, "shape"),
    ([1, 2], b"", "not a JSON object"),
])
def test_bad_safetensors_offsets_are_refused(tmp_path, entries, data, message):
  path = _safetensors(tmp_path / "model.safetensors", entries, data)
  with pytest.raises(ValueError, match=message):
    safetensors_io.SafetensorsFile(path)


def test_an_index_naming_files_outside_is_refused(tmp_path):
  _safetensors(tmp_path / "model-1.safetensors", {}, b"")
  (tmp_path / "model.safetensors.index.json").write_text(
      json.dumps({"weight_map": {"a": "../elsewhere.safetensors"}}))
  with pytest.raises(ValueError, match="plain '\\*.safetensors' names"):
    safetensors_io.TensorReader(str(tmp_path))


def test_metrics_after_a_resume_equal_an_uninterrupted_runs(tmp_path):
  """Record for record (timings aside): a resume continues the window of unlogged steps."""
  import signal

  from tests.helpers import synthetic_stream, tiny
  settings = dict(steps=8, log_every=3, checkpoint_every=4, async_checkpoints=False)
  make_trainer(tmp_path / "ref", **settings).train()

  def preempted(start):
    for i, batch in enumerate(synthetic_stream(tiny().vocab_size, 8, 32)(start)):
      if start + i == 4:        # stopped during step 5: saved at 5, between two log steps
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  assert make_trainer(tmp_path / "run", stream=preempted, **settings).train().preempted
  make_trainer(tmp_path / "run", **settings).train()
  timing = ("tokens_per_s", "mfu", "compile_s")
  read = lambda p: [{k: v for k, v in json.loads(line).items() if k not in timing}
                    for line in open(p / "metrics.jsonl")]
  assert read(tmp_path / "run") == read(tmp_path / "ref")
