"""The HTTP API of ``flexolmo serve``: OpenAI's ``/v1/completions`` (streamed as server-sent
events or not) with two fields of ours, ``experts`` / ``exclude`` in the request and
``attribution`` in the response; ``/v1/experts``; ``/v1/models``; ``/health``.

FastAPI on uvicorn: maintained, asyncio-native (thousands of open streams on one thread while
the engine's thread computes), request bodies checked by pydantic. A bad request gets a 400 in
OpenAI's error shape naming the field; it never reaches the engine, so it disturbs no one.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

import fastapi
import pydantic
from fastapi import responses

from flexolmo_jax.eval.generate import Sampling
from flexolmo_jax.serve import engine as engine_lib
from flexolmo_jax.serve.text import TextStream


class CompletionRequest(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="allow")

  model: str | None = None
  prompt: str | list[str] | list[int]
  max_tokens: int = pydantic.Field(16, ge=1)
  temperature: float = pydantic.Field(1.0, ge=0.0)
  top_p: float = pydantic.Field(1.0, gt=0.0, le=1.0)
  stop: str | list[str] | None = None
  seed: int | None = pydantic.Field(None, ge=0, lt=2 ** 32)
  stream: bool = False
  n: int = pydantic.Field(1, ge=1, le=1)
  experts: str | list[str] | None = None
  exclude: str | list[str] | None = None
  ignore_eos: bool = False      # as vLLM's: generate max_tokens whatever comes (benchmarks)


def error(status: int, message: str, param: str | None = None) -> responses.JSONResponse:
  return responses.JSONResponse(
      {"error": {"message": message, "type": "invalid_request_error", "param": param,
                 "code": None}}, status_code=status)


class Server:
  """What the routes share: the engine, the vocabulary, the model's name and inventory."""

  def __init__(self, engine: engine_lib.Engine, vocab, model_name: str, inventory: list[dict]):
    self.engine, self.vocab, self.model_name, self.inventory = engine, vocab, model_name, inventory
    self.loop: asyncio.AbstractEventLoop | None = None

  def listen(self, loop: asyncio.AbstractEventLoop) -> None:
    """Each engine step's events go to ``loop`` in one call (one wake-up per step)."""
    self.loop = loop
    self.engine.deliver = lambda batch: loop.call_soon_threadsafe(engine_lib.emit_each, batch)

  def prompt_tokens(self, prompt) -> list[int]:
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
      return list(prompt)
    if isinstance(prompt, list):
      if len(prompt) != 1:
        raise engine_lib.RequestError(f"prompt: one prompt per request (got {len(prompt)}).")
      prompt = prompt[0]
    return list(self.vocab.encode(prompt))

  def request(self, body: CompletionRequest, prompt: list[int],
              events: asyncio.Queue) -> engine_lib.Request:
    if self.loop is not asyncio.get_running_loop():
      self.listen(asyncio.get_running_loop())
    keep = engine_lib.keep_mask(self.engine.cfg, body.experts, body.exclude)
    seed = secrets.randbelow(2 ** 31) if body.seed is None else body.seed
    try:
      sampling = Sampling(temperature=body.temperature, top_p=body.top_p, seed=seed)
    except ValueError as e:
      raise engine_lib.RequestError(str(e)) from None
    return engine_lib.Request(prompt, body.max_tokens, keep, sampling, emit=events.put_nowait,
                              each_token=body.stream or bool(body.stop),
                              ignore_eos=body.ignore_eos)

  def chunk(self, cid: str, text: str, reason: str | None, **extra) -> dict[str, Any]:
    return {"id": cid, "object": "text_completion", "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}],
            **extra}

  def usage(self, prompt: int, done: engine_lib.Done) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": len(done.tokens),
            "total_tokens": prompt + len(done.tokens)}


async def completion_events(server: Server, body: CompletionRequest, prompt: list[int]):
  """Submits the request; yields (text, None) pieces, then (text, Done)."""
  events = asyncio.Queue()
  req = server.request(body, prompt, events)
  stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
  stream = TextStream(server.vocab.decode, stops, server.engine.eos_id)
  server.engine.submit(req)
  finished = False
  try:
    while True:
      event = await events.get()
      if isinstance(event, engine_lib.Token):
        piece = stream.push(event.token)
        if stream.stopped:
          req.cancel("stop")
        if piece:
          yield piece, None
        continue
      finished = True
      if event.reason == "error":
        raise RuntimeError(event.error)
      if not req.each_token:
        stream.extend(event.tokens)
      yield stream.finish(), event
      return
  finally:
    if not finished:          # the client went away: free the row at the next step
      req.cancel()


def create_app(server: Server) -> fastapi.FastAPI:
  app = fastapi.FastAPI(title="flexolmo serve")

  @app.exception_handler(fastapi.exceptions.RequestValidationError)
  async def invalid(request, exc):
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    if first.get("type") == "json_invalid":
      return error(400, f"the request body is not valid JSON: {first.get('msg', '')}")
    return error(400, f"{where or 'body'}: {first.get('msg', 'invalid')}", where or None)

  @app.get("/health")
  async def health():
    eng = server.engine
    return {"status": "ok", "slots": eng.slots, "busy": sum(r is not None for r in eng.rows),
            "waiting": eng.pending.qsize(), "decode_steps": eng.steps,
            "decode_ms_per_step": 1e3 * eng.decode_seconds / max(eng.steps, 1)}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": server.model_name, "object": "model",
                                        "created": 0, "owned_by": "flexolmo"}]}

  @app.get("/v1/experts")
  async def experts():
    return {"object": "list", "model": server.model_name, "data": server.inventory}

  @app.post("/v1/completions")
  async def completions(body: CompletionRequest):
    try:
      prompt = server.prompt_tokens(body.prompt)
      events = completion_events(server, body, prompt)
      first = await anext(events)          # refusals surface here, before any byte is sent
    except engine_lib.RequestError as e:
      return error(503 if isinstance(e, engine_lib.Busy) else 400, str(e))
    except RuntimeError as e:             # the engine's step failed (logged by the engine)
      return responses.JSONResponse({"error": {"message": f"generation failed: {e}",
                                               "type": "server_error", "param": None,
                                               "code": None}}, status_code=500)
    cid, prompt_len = f"cmpl-{secrets.token_hex(12)}", len(prompt)
    if body.stream:
      return responses.StreamingResponse(_sse(server, cid, prompt_len, first, events),
                                         media_type="text/event-stream")
    text, done = first
    async for piece, done in events:
      text += piece
    return server.chunk(cid, text, _finish_reason(done), usage=server.usage(prompt_len, done),
                        attribution=done.attribution)

  return app


def _finish_reason(done: engine_lib.Done) -> str:
  return "length" if done.reason == "length" else "stop"


async def _sse(server: Server, cid: str, prompt_len: int, first, events):
  piece, done = first
  try:
    while True:
      if done is None:
        if piece:
          yield f"data: {json.dumps(server.chunk(cid, piece, None))}\n\n"
        piece, done = await anext(events)
        continue
      last = server.chunk(cid, piece, _finish_reason(done), attribution=done.attribution,
                          usage=server.usage(prompt_len, done))
      yield f"data: {json.dumps(last)}\n\n"
      yield "data: [DONE]\n\n"
      return
  finally:
    await events.aclose()

