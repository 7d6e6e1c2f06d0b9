"""Any saved model as a model of lm-evaluation-harness (``lm-eval`` on PyPI), registered as
``flexolmo``: downstream benchmarks, with owners opted in or out.

``FlexOlmoLM(path, experts=..., exclude=...)`` implements the harness's three requests the way its
own Hugging Face model does, so an exported checkpoint scores the same under both:

- ``loglikelihood``: the harness encodes (context, continuation) pairs itself (``TemplateLM``);
  ``scoring.Scorer`` sums the continuation's log-probabilities, the context cut from the left to
  fit ``max_seq_len``, and says whether greedy decoding would produce it;
- ``loglikelihood_rolling``: the text's log-probability over disjoint windows of ``max_seq_len``
  (the harness's own windowing), the first token conditioned on EOS;
- ``generate_until``: greedy decoding with the KV-cache generator, up to ``max_gen_toks`` tokens
  or EOS, the text cut at the first stop string.

Model arguments as the harness passes them (``--model_args path=DIR,exclude=math+code``): expert
lists are joined with ``+``, since the harness splits its arguments on commas.
"""
from __future__ import annotations

from typing import Sequence

import lm_eval.models  # noqa: F401  (the harness's own models, registered before ours)
from lm_eval import utils as harness_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from flexolmo_jax import experts as experts_lib
from flexolmo_jax.checkpoint import saved
from flexolmo_jax.eval import generate, scoring


CACHE_BUCKET = 64   # KV-cache sizes of generate_until, so its decoding step compiles a few times


def _names(value: str | Sequence[str] | None):
  if isinstance(value, str):
    return experts_lib.parse(value.replace("+", ","))
  return value


@register_model("flexolmo")
class FlexOlmoLM(TemplateLM):
  def __init__(self, path: str, experts: str | Sequence[str] | None = None,
               exclude: str | Sequence[str] | None = None, batch_size: int | str = 16,
               dtype: str | None = None, max_gen_toks: int = 256,
               max_length: int | str | None = None):
    super().__init__()
    self.cfg, self.params, _ = saved.open_saved(path, _names(experts), _names(exclude), dtype)
    if max_length is not None:     # e.g. the length a model was trained at, below max_seq_len
      if not 0 < int(max_length) <= self.cfg.max_seq_len:
        raise ValueError(f"max_length={max_length}: between 1 and the model's max_seq_len "
                         f"{self.cfg.max_seq_len}.")
      self.cfg = self.cfg.replace(max_seq_len=int(max_length))
    self.vocabulary = saved.vocabulary(path)
    self.scorer = scoring.Scorer(self.cfg, self.params, int(batch_size))
    self.max_gen_toks = int(max_gen_toks)

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    args = harness_utils.simple_parse_args_string(arg_string)
    extra = {k: v for k, v in (additional_config or {}).items()
             if k in ("batch_size",) and v is not None}
    return cls(**{**args, **extra})

  # -- tokens -----------------------------------------------------------------------------------
  @property
  def eot_token_id(self) -> int:
    return self.vocabulary.eos_id

  @property
  def prefix_token_id(self) -> int:
    """What an empty context is conditioned on: BOS where the vocabulary has one, else EOS (the
    harness's Hugging Face model's choice)."""
    try:
      bos = self.vocabulary.bos_id
    except NotImplementedError:   # seqio's byte and SentencePiece vocabularies may not say
      bos = None
    return self.eot_token_id if bos is None else bos

  @property
  def max_length(self) -> int:
    return self.cfg.max_seq_len

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    return list(self.vocabulary.encode(string))

  def tok_decode(self, tokens: Sequence[int]) -> str:
    return self.vocabulary.decode(list(tokens))

  # -- the harness's requests -------------------------------------------------------------------
  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    return self.scorer.score([(context, continuation) for _, context, continuation in requests])

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    out = []
    for (text,) in (r.args for r in requests):
      windows = [harness_utils.make_disjoint_window(w) for w in
                 harness_utils.get_rolling_token_windows(
                     token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                     max_seq_len=self.max_length, context_len=1)]
      out.append(sum(logp for logp, _ in self.scorer.score(windows)))
    return out

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    out = []
    for context, gen_kwargs in (r.args for r in requests):
      gen_kwargs = dict(gen_kwargs)
      if gen_kwargs.pop("do_sample", False) and gen_kwargs.get("temperature", 0.0) > 0:
        raise ValueError("The flexolmo model decodes greedily; this task asks for sampling.")
      until = gen_kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
      prompt = self.tok_encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
      bucket = min(-(-(len(prompt) + max_new) // CACHE_BUCKET) * CACHE_BUCKET, self.max_length)
      row = generate.generate(self.cfg, self.params, [prompt], max_new, eos_id=self.eot_token_id,
                              cache_len=bucket)[0]
      tokens = generate.trim(row, len(prompt), self.eot_token_id)[len(prompt):]
      text = self.tok_decode(tokens)
      for stop in until:
        if stop and stop in text:
          text = text.split(stop)[0]
      out.append(text)
    return out
