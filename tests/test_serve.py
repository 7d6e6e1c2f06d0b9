"""``flexolmo serve`` (flexolmo_jax/serve): continuous batching with a mask of experts per row,
checked against ``generate`` on the model ``load_merged`` builds for each choice; the HTTP API
through the official ``openai`` client and raw requests; on the tiny random artifacts."""
import concurrent.futures
import functools
import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from flexolmo_jax.checkpoint import saved, store
from flexolmo_jax.eval import generate
from flexolmo_jax.flexolmo import merge
from flexolmo_jax.serve import api, engine, inventory, programs
from flexolmo_jax.serve.text import TextStream

# Every engine here has this many rows, so the decode step compiles once for the module.
SLOTS = 6
NAMES = ("public", "code", "legal", "math", "prose")
# (experts, exclude) as a request gives them; every one a different model after load_merged.
CHOICES = [(None, None), (["public", "code"], None), (None, ["math"]), (["public"], None),
           (None, ["public"]), (["legal", "prose"], None), ("code,math", None), (None, "legal")]


@pytest.fixture(scope="module")
def merged(tiny, tmp_path_factory):
  return merge.merge(tiny["public"], list(tiny["experts"].values()),
                     str(tmp_path_factory.mktemp("serve") / "merged"))


@pytest.fixture(scope="module")
def vocab(merged):
  return saved.vocabulary(merged)


class Background:
  """The app on uvicorn in a thread of this process, on a free loopback port:
  ``with Background(app) as url: ...``."""

  def __init__(self, app):
    import socket

    import uvicorn

    self._socket = socket.socket()
    self._socket.bind(("127.0.0.1", 0))
    self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
    self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    self._thread = threading.Thread(target=self._server.run,
                                    kwargs={"sockets": [self._socket]}, daemon=True)

  def __enter__(self) -> str:
    self._thread.start()
    while not self._server.started:
      time.sleep(0.01)
    return self.url

  def __exit__(self, *exc) -> None:
    self._server.should_exit = True
    self._thread.join()
    self._socket.close()


@pytest.fixture(scope="module")
def server(merged, vocab):
  """The tiny merged model served on a loopback port: (url, engine)."""
  cfg, params, _ = saved.open_saved(merged)
  eng = engine.Engine(cfg, params, slots=SLOTS, eos_id=vocab.eos_id).start()
  app = api.create_app(api.Server(eng, vocab, "tiny", inventory.experts(merged)))
  with Background(app) as url:
    yield url, eng
  eng.stop()


def oracle(merged, prompt, max_tokens, choice, eos_id, sampling=generate.Sampling()):
  """What ``flexolmo generate --experts/--exclude`` gives: the generated tokens, up to and
  including the end-of-text token."""
  return list(_oracle(merged, tuple(prompt), max_tokens, _hashable(choice), eos_id, sampling))


_hashable = lambda choice: tuple(tuple(c) if isinstance(c, list) else c for c in choice)


@functools.lru_cache(maxsize=None)
def _oracle(merged, prompt, max_tokens, choice, eos_id, sampling):
  cfg, params, _ = saved.open_saved(merged, *choice)
  # One cache length: the one-token step compiles once per choice, not once per request.
  row = generate.generate(cfg, params, [list(prompt)], max_tokens, sampling, eos_id=eos_id,
                          cache_len=cfg.max_seq_len)[0]
  return tuple(generate.trim(row, len(prompt), eos_id)[len(prompt):])


def requests(n, seed=0):
  """n (prompt tokens, max_tokens, choice): the two requests of a choice share a prompt length
  (one compile of ``generate`` per choice and length), the choices' lengths span 3 buckets."""
  rs = np.random.RandomState(seed)
  lengths = [5, 12, 20, 27, 33, 45, 58, 69]
  return [(rs.randint(3, 259, size=lengths[i % len(CHOICES)]).tolist(), int(rs.randint(4, 40)),
           CHOICES[i % len(CHOICES)]) for i in range(n)]


def run_all(eng, reqs, **settings):
  """Submits every request at once and steps the engine until all are done: {i: Done}."""
  done = {}
  for i, (prompt, n, choice) in enumerate(reqs):
    eng.submit(engine.Request(prompt, n, engine.keep_mask(eng.cfg, *choice),
                              emit=lambda ev, i=i: done.__setitem__(i, ev)
                              if isinstance(ev, engine.Done) else None, **settings))
  while eng.step():
    pass
  return done


def test_sixteen_requests_sharing_batches_give_generates_tokens_for_each_choice(merged, vocab):
  """16 greedy requests over 8 expert choices, 6 rows: rows join and leave between steps, and
  each request gets exactly the tokens ``generate`` gives for its choice alone. Nothing is
  recompiled per request: one decode program per burst length, one prefill per prompt-length
  bucket."""
  cfg, params, _ = saved.open_saved(merged)
  eng = engine.Engine(cfg, params, slots=SLOTS, eos_id=vocab.eos_id)
  reqs = requests(16)
  before = programs.decode._cache_size()
  done = run_all(eng, reqs)
  for i, (prompt, n, choice) in enumerate(reqs):
    assert list(done[i].tokens) == oracle(merged, prompt, n, choice, vocab.eos_id), (i, choice)
  total = sum(len(d.tokens) for d in done.values())
  assert eng.steps < total / 3          # rows shared the decode steps
  assert programs.decode._cache_size() - before <= engine.MAX_BURST.bit_length()
  assert programs.prefill._cache_size() <= len(eng.buckets)


def test_sampling_is_reproducible_per_request_whatever_shares_its_batch(merged, vocab):
  """A seeded sampled request gives the same tokens alone and among others, and the tokens
  ``generate`` samples with that seed."""
  cfg, params, _ = saved.open_saved(merged)
  eng = engine.Engine(cfg, params, slots=SLOTS, eos_id=vocab.eos_id)
  prompt, n, choice = [72, 101, 108, 108, 111], 24, (None, ["legal"])
  sampling = generate.Sampling(temperature=0.9, top_p=0.8, seed=1234)
  alone = run_all(eng, [(prompt, n, choice)], sampling=sampling)[0].tokens
  crowd = run_all(eng, requests(5, seed=3) + [(prompt, n, choice)], sampling=sampling)[5].tokens
  assert alone == crowd
  assert list(alone) == oracle(merged, prompt, n, choice, vocab.eos_id, sampling)
  reseeded = generate.Sampling(temperature=0.9, top_p=0.8, seed=1235)
  other = run_all(eng, [(prompt, n, choice)], sampling=reseeded)[0].tokens
  assert other != alone


def test_attribution_sums_to_one_and_gives_nothing_to_excluded_experts(merged, vocab):
  cfg, params, _ = saved.open_saved(merged)
  eng = engine.Engine(cfg, params, slots=SLOTS, eos_id=None)
  reqs = requests(8, seed=5)
  done = run_all(eng, reqs)
  for i, (_, _, choice) in enumerate(reqs):
    share = done[i].attribution
    kept = {n for n, k in zip(NAMES, engine.keep_mask(cfg, *choice)) if k}
    assert list(share) == list(NAMES) and abs(sum(share.values()) - 1) < 1e-6
    assert all(share[n] == 0 for n in NAMES if n not in kept), (choice, share)
    assert all(share[n] > 0 for n in kept), (choice, share)
  assert done[3].attribution["public"] == 1.0     # public alone


def test_keep_mask_refuses_as_load_merged_does(merged):
  cfg, _, _ = saved.open_saved(merged)
  with pytest.raises(engine.RequestError, match="nope"):
    engine.keep_mask(cfg, ["public", "nope"])
  with pytest.raises(engine.RequestError, match="No expert is left"):
    engine.keep_mask(cfg, None, list(NAMES))
  strict = cfg.replace(top_k_policy="reject")
  with pytest.raises(engine.RequestError, match="clamp"):
    engine.keep_mask(strict, ["public"])
  assert engine.keep_mask(cfg, "code,math").tolist() == [False, True, False, True, False]


def test_a_full_queue_refuses_for_now_and_a_good_request_never_waits_on_a_bad_one(merged):
  cfg, params, _ = saved.open_saved(merged)
  eng = engine.Engine(cfg, params, slots=SLOTS, max_pending=1)
  keep = engine.keep_mask(cfg)
  with pytest.raises(ValueError, match="top_p"):                # refused before the queue
    eng.submit(engine.Request([5, 6], 4, keep, generate.Sampling(top_p=0.0)))
  with pytest.raises(engine.RequestError, match="seed"):
    eng.submit(engine.Request([5, 6], 4, keep, generate.Sampling(seed=2 ** 32)))
  eng.submit(engine.Request([5, 6], 4, keep))
  with pytest.raises(engine.Busy, match="1 waiting requests"):
    eng.submit(engine.Request([5, 6], 4, keep))


def test_text_stream_sends_whole_characters_and_cuts_at_stop_strings():
  decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")
  s = TextStream(decode, stop=["END"], eos_id=None)
  # é is two bytes (nothing until both came), and "E", "EN" may start "END": held back.
  assert [s.push(b) for b in "é E".encode()] == ["", "", "", "é"]
  assert "".join(s.push(b) for b in b"ND more") == " " and s.stopped
  assert s.finish() == "" and decode(s.tokens).startswith("é END")
  t = TextStream(decode, stop=["\n\n"], eos_id=0)
  assert "".join(t.push(b) for b in b"ab\n") + t.finish() == "ab\n"
  u = TextStream(decode, eos_id=0)
  assert u.push(ord("x")) + u.push(0) + u.finish() == "x"


def post(url, body):
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  req = urllib.request.Request(url + "/v1/completions", data=data,
                               headers={"content-type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=60) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def test_concurrent_http_requests_give_generates_text(server, merged, vocab):
  """16 clients at once, each its own choice, over HTTP: each text is ``generate``'s."""
  url, _ = server
  reqs = requests(16)

  def one(item):
    prompt, n, (experts, exclude) = item
    return post(url, {"prompt": prompt, "max_tokens": n, "temperature": 0,
                      "experts": experts, "exclude": exclude})

  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    answers = list(pool.map(one, reqs))
  for (prompt, n, choice), (status, body) in zip(reqs, answers):
    want = oracle(merged, prompt, n, choice, vocab.eos_id)
    assert status == 200, body
    assert body["choices"][0]["text"] == vocab.decode([t for t in want if t != vocab.eos_id])
    assert body["usage"]["completion_tokens"] == len(want)
    assert abs(sum(body["attribution"].values()) - 1) < 1e-6


@pytest.mark.parametrize("body, status, naming", [
    ({"prompt": "x", "experts": ["public", "nope"]}, 400, "nope"),
    ({"prompt": "x", "exclude": list(NAMES)}, 400, "No expert is left"),
    ({"prompt": "x" * 300, "max_tokens": 4}, 400, "context of 256"),
    ({"prompt": "x", "max_tokens": 256}, 400, "context of 256"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": ["a", "b"]}, 400, "one prompt"),
    ({"prompt": ""}, 400, "empty"),
    ({"max_tokens": 3}, 400, "prompt"),
    (b"{not json", 400, "not valid JSON"),
])
def test_bad_requests_get_a_400_naming_the_problem(server, body, status, naming):
  code, answer = post(server[0], body)
  assert code == status and naming in answer["error"]["message"], answer


def test_bad_requests_do_not_disturb_a_request_in_flight(server, merged, vocab):
  """A long greedy request runs while bad requests arrive; its answer is still generate's."""
  url, _ = server
  prompt, n, choice = [40, 41, 42, 43, 44], 200, CHOICES[0]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    long = pool.submit(post, url, {"prompt": prompt, "max_tokens": n, "temperature": 0})
    for _ in range(5):
      assert post(url, b"{bad")[0] == 400 and post(url, {"prompt": "x", "top_p": 2})[0] == 400
  status, body = long.result()
  want = oracle(merged, prompt, n, choice, vocab.eos_id)
  assert status == 200 and body["usage"]["completion_tokens"] == len(want)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
  url, eng = server
  done = []
  req = urllib.request.Request(url + "/v1/completions", headers={"content-type": "application/json"},
                               data=json.dumps({"prompt": "abc", "max_tokens": 250 - 3,
                                                "temperature": 0, "stream": True}).encode())
  with urllib.request.urlopen(req, timeout=60) as r:
    assert r.readline().startswith(b"data: ")      # the first token came
    busy = [x for x in eng.rows if x is not None]
    assert busy
    done.extend(busy)
  deadline = time.time() + 30
  while any(x is not None for x in eng.rows) and time.time() < deadline:
    time.sleep(0.01)
  assert all(x is None for x in eng.rows)
  assert done[0].stop_reason == "cancelled" and len(done[0].tokens) < 247


def test_the_openai_client_streams_and_not(server, merged, vocab):
  import openai     # the test extra installs it: a missing client is a failure, not a skip
  url, _ = server
  client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
  prompt = "def main("
  want = oracle(merged, vocab.encode(prompt), 30, (["public", "math"], None), vocab.eos_id)
  text = vocab.decode([t for t in want if t != vocab.eos_id])
  plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0,
                                    extra_body={"experts": ["public", "math"]})
  assert plain.choices[0].text == text
  share = plain.model_extra["attribution"]
  assert share["code"] == share["legal"] == share["prose"] == 0
  chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=30,
                                          temperature=0, stream=True,
                                          extra_body={"experts": ["public", "math"]}))
  assert "".join(c.choices[0].text for c in chunks) == text
  assert chunks[-1].choices[0].finish_reason in ("stop", "length")
  assert chunks[-1].model_extra["attribution"] == share
  with pytest.raises(openai.BadRequestError, match="nope"):
    client.completions.create(model="tiny", prompt="x", extra_body={"exclude": ["nope"]})


def test_experts_inventory_names_sources_never_paths(server, merged, tiny):
  url, _ = server
  with urllib.request.urlopen(url + "/v1/experts") as r:
    listing = json.loads(r.read())["data"]
  assert [e["name"] for e in listing] == list(NAMES)
  public = store.read_manifest(tiny["public"])["fingerprint"]
  assert listing[0]["fingerprint"] == public
  for e in listing[1:]:
    assert e["anchor_fingerprint"] == public and len(e["fingerprint"]) == 64
    assert e["dp"] is None and e["privacy"].endswith("no differential privacy")
    assert all("/" not in s or not s.startswith("/") for s in e["data_card"]["sources"])
  assert inventory.source_name("/home/owner/secret/legal.jsonl") == "legal.jsonl"
  assert inventory.source_name("flexmix_code/1.0.0") == "flexmix_code/1.0.0"
  assert inventory.source_name("../../etc/passwd") == "passwd"


def sse_text(url, body):
  """The text of a streamed completion and its last chunk, read as server-sent events."""
  req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                               headers={"content-type": "application/json"})
  chunks = []
  with urllib.request.urlopen(req, timeout=60) as r:
    for line in r:
      line = line.decode().strip()
      if line.startswith("data: ") and line != "data: [DONE]":
        chunks.append(json.loads(line[6:]))
  return "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]


def test_a_stop_string_ends_the_completion_before_it(server, merged, vocab):
  url, _ = server
  prompt = [72, 101, 108, 108, 111]
  want = oracle(merged, prompt, 60, CHOICES[0], vocab.eos_id)
  text = vocab.decode([t for t in want if t != vocab.eos_id])
  # Random weights write few whole characters: the stop is one of them, after the first.
  stop = next(c for c in text[1:] if c != "\ufffd")
  body = {"prompt": prompt, "max_tokens": 60, "temperature": 0, "stop": [stop, "never-seen"]}
  status, answer = post(url, body)
  assert status == 200 and answer["choices"][0]["text"] == text[:text.index(stop)]
  assert answer["choices"][0]["finish_reason"] == "stop"
  streamed, last = sse_text(url, {**body, "stream": True})
  assert streamed == text[:text.index(stop)] and last["choices"][0]["finish_reason"] == "stop"


def test_a_failed_step_ends_its_requests_with_the_error_and_the_engine_goes_on(merged,
                                                                               monkeypatch):
  cfg, params, _ = saved.open_saved(merged)
  eng = engine.Engine(cfg, params, slots=SLOTS).start()
  try:
    done = threading.Event()
    events = []
    emit = lambda ev: (events.append(ev), isinstance(ev, engine.Done) and done.set())
    real = programs.decode
    with monkeypatch.context() as m:
      m.setattr(programs, "decode", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
      eng.submit(engine.Request([5, 6, 7], 8, engine.keep_mask(cfg), emit=emit))
      assert done.wait(60)
    assert events[-1].reason == "error" and "boom" in events[-1].error
    assert programs.decode is real and all(r is None for r in eng.rows)
    done.clear()
    eng.submit(engine.Request([5, 6, 7], 8, engine.keep_mask(cfg), emit=emit))
    assert done.wait(60) and events[-1].reason == "length" and len(events[-1].tokens) == 8
  finally:
    eng.stop()


def test_a_dense_model_is_served_too_without_experts(tiny, vocab):
  cfg, params, _ = saved.open_saved(tiny["public"])
  eng = engine.Engine(cfg, params, slots=SLOTS, eos_id=vocab.eos_id)
  reqs = [(p, n, (None, None)) for p, n, _ in requests(4, seed=2)]
  done = run_all(eng, reqs)
  for i, (prompt, n, _) in enumerate(reqs):
    row = generate.generate(cfg, params, [prompt], n, eos_id=vocab.eos_id,
                            cache_len=cfg.max_seq_len)[0]
    assert list(done[i].tokens) == generate.trim(row, len(prompt), vocab.eos_id)[len(prompt):]
    assert done[i].attribution == {}
  with pytest.raises(engine.RequestError, match="dense"):
    engine.keep_mask(cfg, None, ["code"])
  assert inventory.experts(tiny["public"]) == []


def test_serve_refuses_what_it_cannot_serve_in_one_line(capsys, tiny, tmp_path):
  from tests.artifacts import refused

  refused(capsys, "serve", "--model", tiny["experts"]["code"], naming="merge it")
  refused(capsys, "serve", "--model", tmp_path / "nothing", naming="nothing")
