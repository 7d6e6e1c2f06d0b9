"""``flexolmo serve``: an OpenAI-compatible completions server over any saved model, every request
choosing its experts (flexolmo_jax/serve)."""
from __future__ import annotations

import os

from flexolmo_jax.cli.args import count


def _serve(args) -> int:
  try:
    import uvicorn

    from flexolmo_jax.serve import api
  except ImportError as e:
    raise ValueError(f"`flexolmo serve` needs FastAPI and uvicorn ({e.name} is missing): "
                     "pip install -e '.[serve]'.") from None
  from flexolmo_jax.checkpoint import saved
  from flexolmo_jax.serve import engine, inventory

  cfg, params, _ = saved.open_saved(args.model, dtype=args.dtype)
  vocab = saved.vocabulary(args.model)
  eng = engine.Engine(cfg, params, slots=args.slots, context=args.context, eos_id=vocab.eos_id)
  print(f"serve: {args.model}: {len(cfg.experts) or 'no'} experts {list(cfg.experts)}, "
        f"{args.slots} slots of {eng.context} tokens", flush=True)
  eng.warm_up(progress=lambda line: print(f"  {line}", flush=True))
  name = args.name or os.path.basename(os.path.normpath(args.model))
  app = api.create_app(api.Server(eng.start(), vocab, name, inventory.experts(args.model)))
  print(f"serving {name!r} at http://{args.host}:{args.port}/v1 (Ctrl-C stops)", flush=True)
  try:
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
  finally:
    eng.stop()
  return 0


def add(sub) -> None:
  p = sub.add_parser("serve", help="serve any saved model over HTTP (OpenAI /v1/completions), "
                     "each request opting experts in or out")
  p.add_argument("--model", required=True, help="public, dense or merged model directory")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--slots", type=count, default=32,
                 help="requests decoded together in one batch (continuous batching)")
  p.add_argument("--context", type=count,
                 help="tokens per request, prompt and completion (default: the model's)")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype")
  p.add_argument("--name", help="the model name clients see (default: the directory's name)")
  p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                 help="uvicorn's access and error log")
  p.set_defaults(fn=_serve)
