"""Log-likelihood scoring of continuations and multiple-choice accuracy.

``Scorer.score(requests)`` takes ``(context_ids, continuation_ids)`` pairs and returns, for each,
the summed log-probability of the continuation given the context and whether greedy decoding
would have produced it (every continuation token is the arg-max). Requests are batched: each row
is ``context + continuation`` (the context cut from the left to fit ``max_seq_len``), padded on
the right to a bucketed length, so a handful of shapes is compiled. Causal attention makes the
padding invisible to the scored positions.

Multiple-choice tasks are local JSONL files, one question a line::

    {"context": "The capital of France is", "choices": [" Paris", " Rome"], "answer": 0}

Accuracy picks the choice with the highest log-probability (``acc``) and with the highest
log-probability per byte of the choice (``acc_norm``, as OLMES reports it).
"""
from __future__ import annotations

import functools
import json
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexolmo_jax.config import ModelConfig
from flexolmo_jax.model.logprobs import program_config
from flexolmo_jax.model.transformer import pure_model

BUCKET = 64


@functools.partial(jax.jit, static_argnames=("cfg",))
def _score_rows(params, tokens, targets, mask, *, cfg: ModelConfig):
  """Per row: the summed log-probability of the masked targets, and whether each is the
  arg-max. Compiled once per model shape and batch shape, for every Scorer of that shape."""
  logits, _ = pure_model(cfg)(params, tokens)
  logz = jax.nn.logsumexp(logits, axis=-1)
  logp = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0] - logz
  greedy = jnp.argmax(logits, axis=-1) == targets
  return jnp.sum(jnp.where(mask, logp, 0.0), axis=-1), jnp.all(greedy | ~mask, axis=-1)


class Scorer:
  def __init__(self, cfg: ModelConfig, params, batch_size: int = 16):
    self.cfg, self.params, self.batch_size = cfg, params, batch_size
    self._run = functools.partial(_score_rows, cfg=program_config(cfg))

  def _row(self, context: Sequence[int], continuation: Sequence[int]):
    if not continuation:
      raise ValueError("A continuation must have at least one token.")
    if not context:
      raise ValueError("A context must have at least one token (e.g. the EOS id).")
    tokens = (list(context) + list(continuation))[-(self.cfg.max_seq_len + 1):]
    return tokens[:-1], tokens[1:], len(continuation)

  def score(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
            ) -> list[tuple[float, bool]]:
    rows = [self._row(c, x) for c, x in requests]
    out: list[tuple[float, bool]] = []
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start:start + self.batch_size]
      length = max(len(r[0]) for r in chunk)
      length = min(-(-length // BUCKET) * BUCKET, self.cfg.max_seq_len)
      n = self.batch_size
      tokens, targets = np.zeros((n, length), np.int32), np.zeros((n, length), np.int32)
      mask = np.zeros((n, length), bool)
      for i, (inp, tgt, k) in enumerate(chunk):
        tokens[i, :len(inp)], targets[i, :len(tgt)] = inp, tgt
        mask[i, len(tgt) - k:len(tgt)] = True
      logp, greedy = jax.device_get(self._run(self.params, tokens, targets, mask))
      out.extend((float(logp[i]), bool(greedy[i])) for i in range(len(chunk)))
    return out


def read_multiple_choice(path: str) -> list[dict]:
  """The questions of a JSONL task; a bad line is an error naming the file and line."""
  questions = []
  with open(path, encoding="utf-8") as fh:
    for line_no, line in enumerate(fh, 1):
      if not line.strip():
        continue
      where = f"{path}, line {line_no}"
      try:
        q = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg}).") from None
      if not isinstance(q, dict) or not isinstance(q.get("context"), str):
        raise ValueError(f"{where}: needs a string 'context'.")
      choices = q.get("choices")
      if (not isinstance(choices, list) or len(choices) < 2
          or not all(isinstance(c, str) and c for c in choices)):
        raise ValueError(f"{where}: 'choices' must be a list of at least 2 non-empty strings.")
      answer = q.get("answer")
      if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f"{where}: 'answer' must be an index into the {len(choices)} choices.")
      questions.append(q)
  if not questions:
    raise ValueError(f"{path}: no questions.")
  return questions


def multiple_choice(scorer: Scorer, vocab, questions: Sequence[dict]) -> dict[str, float]:
  """{"acc", "acc_norm", "questions"} over the questions."""
  requests, owners = [], []
  for qi, q in enumerate(questions):
    context = list(vocab.encode(q["context"])) or [vocab.eos_id]
    for choice in q["choices"]:
      requests.append((context, list(vocab.encode(choice))))
      owners.append(qi)
  scores = scorer.score(requests)
  per_q: dict[int, list[tuple[float, float]]] = {}
  for (logp, _), qi, (_, cont) in zip(scores, owners, requests):
    nbytes = len(vocab.decode(cont).encode("utf-8")) or 1
    per_q.setdefault(qi, []).append((logp, logp / nbytes))
  acc = np.mean([int(np.argmax([s for s, _ in per_q[i]])) == q["answer"]
                 for i, q in enumerate(questions)])
  acc_norm = np.mean([int(np.argmax([s for _, s in per_q[i]])) == q["answer"]
                      for i, q in enumerate(questions)])
  return {"acc": float(acc), "acc_norm": float(acc_norm), "questions": len(questions)}
