"""A demo output is reused only while the inputs it was built from are the same: a model
trained or tuned again makes every output built from it stale (demo/provenance.py)."""
import json
import os

import pytest

from flexolmo_jax.demo import Demo, provenance, training


def write_model(path, tag):
  """A saved model as far as provenance sees one: its manifest."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "manifest.json"), "w") as fh:
    json.dump({"kind": "test", "tag": tag}, fh)


@pytest.fixture
def demo(tmp_path, monkeypatch):
  """A demo over a work directory holding a public model and a FlexMix-mini card, whose
  training processes are replaced by one that saves a model tagged with its build number."""
  workdir = tmp_path / "workdir"
  write_model(workdir / "public" / "model", "public 1")
  (workdir / "flexmix_mini").mkdir()
  (workdir / "flexmix_mini" / "flexmix_mini.json").write_text("{}")
  builds = []

  def fake_run_stages(stages, jobs, env):
    for label, argv in stages:
      builds.append(label)
      out = argv[argv.index("--out") + 1]
      write_model(os.path.join(out, "expert"), f"{label} build {len(builds)}")
      with open(os.path.join(out, "checkpoint"), "w") as fh:
        fh.write("a run's resumable state")

  monkeypatch.setattr(training, "run_stages", fake_run_stages)
  d = Demo(str(workdir), "quick")
  d.builds = builds
  return d


def expert_run(d):
  out = d.path("experts", "code", "expert")
  return (out, ["train-expert", "--out", d.path("experts", "code")], "expert code",
          [d.path("public"), d.card_file()])


def test_an_output_is_built_again_when_an_input_changes_and_only_then(demo, capsys):
  demo.train_all([expert_run(demo)])
  assert demo.builds == ["expert code"]
  record = json.loads(open(demo.path(provenance.RECORD)).read())
  assert record == {"experts/code/expert": {
      "flexmix_mini/flexmix_mini.json": provenance.digest(demo.card_file()),
      "public": provenance.digest(demo.path("public", "model", "manifest.json"))}}
  demo.train_all([expert_run(demo)])                       # the same inputs: reused
  assert demo.builds == ["expert code"]
  assert "expert code: reusing" in capsys.readouterr().out
  write_model(demo.path("public", "model"), "public 2")   # the public model trained again
  stale_checkpoint = demo.path("experts", "code", "checkpoint")
  os.remove(stale_checkpoint)
  open(demo.path("experts", "code", "old_step"), "w").close()
  demo.train_all([expert_run(demo)])
  assert demo.builds == ["expert code", "expert code"]
  assert "experts/code/expert was built from another public: building it again" in \
      capsys.readouterr().out
  # The run directory went with it: the rerun did not resume from the old run's state.
  assert not os.path.exists(demo.path("experts", "code", "old_step"))
  assert json.load(open(demo.path("experts", "code", "expert", "manifest.json")))["tag"] == \
      "expert code build 2"
  demo.train_all([expert_run(demo)])
  assert demo.builds == ["expert code", "expert code"]


def test_the_runs_that_finished_are_recorded_when_another_one_failed(demo, monkeypatch):
  def one_fails(stages, jobs, env):
    write_model(demo.path("experts", "code", "expert"), "built")
    raise ValueError("demo stage failed: expert prose")

  monkeypatch.setattr(training, "run_stages", one_fails)
  prose = (demo.path("experts", "prose", "expert"), [], "expert prose", [demo.path("public")])
  with pytest.raises(ValueError, match="expert prose"):
    demo.train_all([expert_run(demo), prose])
  assert list(json.load(open(demo.path(provenance.RECORD)))) == ["experts/code/expert"]
  # The user trains the public model again before rerunning: the finished expert is stale.
  write_model(demo.path("public", "model"), "public 2")
  assert not demo.reusable(demo.path("experts", "code", "expert"),
                           demo.provenance.inputs(demo.path("public"), demo.card_file()))


def test_an_output_without_a_record_is_taken_as_it_is_and_recorded(demo):
  write_model(demo.path("experts", "code", "expert"), "built by an earlier version")
  demo.train_all([expert_run(demo)])
  assert demo.builds == []
  assert "experts/code/expert" in json.load(open(demo.path(provenance.RECORD)))
  write_model(demo.path("public", "model"), "public 2")
  demo.train_all([expert_run(demo)])
  assert demo.builds == ["expert code"]


def test_a_cached_evaluation_follows_its_model_and_the_experts_it_selects(demo, monkeypatch):
  calls = []

  def fake_stats(path, data, vocab=None, **select):
    calls.append((os.path.basename(path), select))
    return {"code": {"loss": float(len(calls))}}

  monkeypatch.setattr("flexolmo_jax.eval.perplexity.evaluate_stats", fake_stats)
  demo.eval_data, demo.vocab = {}, None
  tuned = demo.path("tuned", "merged")
  write_model(tuned, "tuned 1")
  assert demo.loss_of("flexolmo", tuned) == {"code": 1.0}
  assert demo.loss_of("flexolmo", tuned) == {"code": 1.0}           # cached
  assert demo.loss_of("public + code", tuned, experts="public,code") == {"code": 2.0}
  write_model(tuned, "tuned 2")                                      # the router tuned again
  assert demo.loss_of("flexolmo", tuned) == {"code": 3.0}
  assert demo.loss_of("flexolmo", tuned) == {"code": 3.0}
  # The same cache name asked for another selection of experts is stale too.
  assert demo.loss_of("public + code", tuned, experts="public,math") == {"code": 4.0}
  assert calls == [("merged", {}), ("merged", {"experts": "public,code"}), ("merged", {}),
                   ("merged", {"experts": "public,math"})]
  assert json.load(open(demo.path("eval", "flexolmo.json"))) == {"code": 3.0}


def test_the_record_stays_inside_the_work_directory_and_names_a_bad_file(tmp_path):
  record = provenance.Provenance(str(tmp_path))
  with pytest.raises(ValueError, match="is outside the work directory"):
    record.key(str(tmp_path.parent / "elsewhere"))
  with pytest.raises(ValueError, match="outside the work directory"):
    record.remove_stale(str(tmp_path / "out"), str(tmp_path / ".." / "victim"), ["x"])
  (tmp_path / provenance.RECORD).write_text('{"merged": ')
  with pytest.raises(ValueError, match=rf"{provenance.RECORD}: not valid JSON .*line 1"):
    provenance.Provenance(str(tmp_path))
  (tmp_path / provenance.RECORD).write_text("[]")
  with pytest.raises(ValueError, match="not a JSON object"):
    provenance.Provenance(str(tmp_path))
