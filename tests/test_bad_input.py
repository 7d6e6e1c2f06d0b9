"""Every command refuses bad input with exit status 2 and one line that names the flag, file or
key: never a traceback, never a silent run. Placeholders: {public}, {expert}, {merged}, {hf} (the
session's small real artifacts), {data} (an owner's JSONL), {tmp} (an empty directory),
{missing} (a path that does not exist), {out} (a fresh output)."""

import pytest

from tests.artifacts import refused

TRAIN = ["--batch-size", "2", "--seq-len", "32"]
CASES = [
    # info and data
    (["info", "--model", "nope"], "No model preset 'nope'"),
    (["data", "prepare", "--name", "x", "--path", "{missing}"], "no such file or directory"),
    (["data", "prepare", "--name", "1bad", "--path", "{data}"], "Invalid domain name '1bad'"),
    (["data", "prepare", "--name", "a" * 300, "--path", "{data}"], "Invalid domain name"),
    (["data", "prepare", "--name", "x", "--path", "{data}", "--validation-fraction", "1.5"],
     "validation_fraction=1.5"),
    (["data", "prepare", "--name", "x", "--path", "{broken}"], "broken.jsonl:2: not valid JSON"),
    (["data", "prepare", "--name", "x", "--path", "{data}", "--field", "body"],
     "no field 'body'"),
    (["data", "prepare", "--name", "x", "--path", "{tmp}"], "has no files matching"),
    (["data", "inspect", "nothere", "--data-dir", "{tmp}"], "is not a prepared dataset"),
    (["data", "flexmix-mini", "--size", "huge"], "argument --size: invalid choice"),
    # pretrain: the values of item 12 of the hostile review
    (["pretrain", "--data", "{data}", "--out", "{out}", "--lr", "-1", *TRAIN],
     "learning_rate=-1.0 must be above 0"),
    (["pretrain", "--data", "{data}", "--out", "{out}", "--lr", "nan"],
     "argument --lr: 'nan' is not a finite number"),
    (["pretrain", "--data", "{data}", "--out", "{out}", "--gin.STEPPS=5"],
     "--gin.STEPPS: no such setting in pretrain.gin"),
    (["pretrain", "--data", "{data}", "--out", "{out}", "--gin.STEPS=abc"],
     "steps='abc' must be an integer"),
    (["pretrain", "--data", "{data}", "--out", "{out}", "--seq-len", "1024"],
     "--seq-len 1024 is longer than the model's max_seq_len 256"),
    (["pretrain", "--data", "{data}", "--out", "{out}", "--steps", "0"],
     "argument --steps: 0 is below 1"),
    (["pretrain", "--data", "{data}", "--out", "{out}", "--batch-size", "two"],
     "argument --batch-size: 'two' is not an integer"),
    (["pretrain", "--model", "nope", "--data", "{data}", "--out", "{out}"],
     "No model preset 'nope'"),
    (["pretrain", "--data", "{data}", "--out", "{out}", "--gin-file", "{missing}"],
     "does not exist"),
    (["pretrain", "--out", "{out}"], "missing required setting"),
    (["pretrain", "--data", "{data}", "--out", "{out}", "--batch-size", "3", "--grad-accum", "2"],
     "batch_size=3 is not divisible by grad_accum=2"),
    # train-expert
    (["train-expert", "--public", "{missing}", "--name", "x", "--data", "{data}", "--out",
      "{out}"], "does not exist"),
    (["train-expert", "--public", "{public}", "--name", "public", "--data", "{data}", "--out",
      "{out}"], "reserved for the public model"),
    (["train-expert", "--public", "{public}", "--name", "a/b", "--data", "{data}", "--out",
      "{out}"], "Invalid expert name 'a/b'"),
    (["train-expert", "--public", "{public}", "--name", "x" * 300, "--data", "{data}", "--out",
      "{out}"], "Invalid expert name"),
    (["train-expert", "--public", "{expert}", "--name", "x", "--data", "{data}", "--out",
      "{out}"], "is a 'expert' checkpoint, not a dense public model"),
    (["train-expert", "--public", "{public}", "--name", "x", "--data", "{data}", "--out",
      "{out}", "--top-k", "3"], "top_k=3"),
    (["train-expert", "--public", "{public}", "--name", "x", "--data", "{data}", "--out",
      "{out}", "--seq-len", "1024"], "max_seq_len"),
    (["train-expert", "--public", "{public}", "--name", "x", "--data", "{data}", "--out",
      "{out}", "--dp", "--target-epsilon", "-1", *TRAIN], "epsilon"),
    (["train-expert", "--public", "{public}", "--name", "x", "--data", "{data}", "--out",
      "{out}", "--router-init", "magic"], "argument --router-init: invalid choice"),
    # merge
    (["merge", "--public", "{public}", "--expert", "{expert}", "--exclude", "public", "--out",
      "{out}"], "--exclude public: the public model is the anchor"),
    (["merge", "--public", "{public}", "--expert", "{expert}", "--exclude", "nope", "--out",
      "{out}"], "no such expert among the inputs"),
    (["merge", "--public", "{public}", "--expert", "{expert}", "--expert", "{expert}", "--out",
      "{out}"], "Two experts are named 'code'"),
    (["merge", "--public", "{expert}", "--out", "{out}"], "not a dense public model"),
    (["merge", "--public", "{public}", "--expert", "{expert}", "--out", "{tmp}"],
     "already exists"),
    (["merge", "--public", "{public}", "--expert", "{expert}", "--top-k", "0", "--out", "{out}"],
     "argument --top-k: 0 is below 1"),
    # eval, generate, extraction
    (["eval", "--model", "{merged}"], "eval needs at least one --data"),
    (["eval", "--model", "{merged}", "--data", "code={data}", "--seq-len", "0"],
     "argument --seq-len: 0 is below 1"),
    (["eval", "--model", "{merged}", "--exclude", "nope", "--data", "code={data}"],
     "Unknown expert(s) ['nope']"),
    (["eval", "--model", "{merged}", "--data", "code"], "--data code: write NAME=PATH"),
    (["eval", "--model", "{merged}", "--data", "code", "--flexmix", "{tmp}"],
     "no flexmix_mini.json there"),
    (["eval", "--model", "{merged}", "--experts", "code", "--exclude", "code"],
     "not allowed with argument"),
    (["eval", "--model", "{missing}", "--data", "code={data}"], "does not exist"),
    (["generate", "--model", "{merged}", "--prompt", "x", "--max-new-tokens", "-3"],
     "argument --max-new-tokens: -3 is below 1"),
    (["generate", "--model", "{merged}", "--prompt", ""], "empty prompt"),
    (["generate", "--model", "{merged}", "--prompt", "x", "--temperature", "inf"],
     "argument --temperature: 'inf' is not a finite number"),
    (["extraction", "--model", "{merged}", "--documents", "{data}", "--prefix", "300"],
     "--prefix 300 must be above 0 and below --total 256"),
    # conversion
    (["export-hf", "--model", "{merged}", "--out", "{out}", "--shard-size", "lots"], "lots"),
    (["export-hf", "--model", "{tmp}", "--out", "{out}"], "manifest.json is missing"),
    (["import-hf", "--hf", "{tmp}", "--out", "{out}"], "has no config.json"),
    (["import-hf", "--hf", "{hf}", "--names", "a,b,c", "--out", "{out}"], "give 1 names"),
    (["import-hf", "--hf", "{public}", "--out", "{out}"], "has no config.json"),
    # router tuning and baselines
    (["tune-router", "--merged", "{public}", "--data", "{data}", "--out", "{out}"],
     "holds a 'public' checkpoint, but a 'merged' one is needed"),
    (["train-dense", "--public", "{merged}", "--name", "x", "--data", "{data}", "--out",
      "{out}"], "not a dense public model"),
    (["soup", "--dense", "{public}", "--out", "{out}"], "dense"),
    # launch and demo
    (["launch", "slurm", "--run", "pretrain", "--time", "1:00\nrm -rf ~", "--dry-run"],
     "launch: --time"),
    (["launch", "nope", "--run", "pretrain"], "argument engine: invalid choice"),
    (["launch", "slurm", "--run", "pretrain", "--nodes", "-1", "--dry-run"],
     "argument --nodes: -1 is below 1"),
    (["demo", "--jobs", "0"], "argument --jobs: 0 is below 1"),
    (["nonsense"], "invalid choice: 'nonsense'"),
]


@pytest.fixture
def places(world, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)      # default outputs (eval's data/eval) land here, not in the repo
  broken = tmp_path / "broken.jsonl"
  broken.write_text('{"text": "fine"}\n{"text": \n')
  (tmp_path / "empty").mkdir()
  return {"public": world["public"], "expert": world["expert"], "merged": world["merged"],
          "hf": world["hf"], "data": str(world["data"]), "tmp": str(tmp_path / "empty"),
          "missing": str(tmp_path / "missing"), "out": str(tmp_path / "out"),
          "broken": str(broken)}


def test_the_matrix_covers_every_command_with_forty_cases():
  commands = {argv[0] for argv, _ in CASES}
  assert len(CASES) >= 40
  assert {"info", "data", "pretrain", "train-expert", "merge", "eval", "generate", "extraction",
          "export-hf", "import-hf", "tune-router", "train-dense", "soup", "launch",
          "demo"} <= commands


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_is_refused_in_one_line(argv, message, places, capsys):
  refused(capsys, *(a.format(**places) for a in argv), naming=message)


def test_a_refused_run_leaves_no_gin_bindings_behind(places, capsys):
  """After a refused `train-expert --top-k 3` in this process, the next ExpertConfig built here
  has the default top-k again (the bindings end with the command)."""
  from flexolmo_jax.flexolmo import expert

  refused(capsys, "train-expert", "--public", places["public"], "--name", "x", "--data",
          places["data"], "--out", places["out"], "--top-k", "3", naming="top_k=3")
  assert expert.ExpertConfig().top_k == 2
