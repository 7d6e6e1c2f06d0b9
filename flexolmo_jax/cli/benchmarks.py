"""``lm-eval``: downstream benchmarks of any saved model through lm-evaluation-harness."""
from __future__ import annotations

import json
import os

from flexolmo_jax.cli.args import add_selection_flags, count, natural


def _lm_eval(args) -> int:
  from lm_eval import evaluator
  from lm_eval import utils as harness_utils
  from lm_eval.tasks import TaskManager

  from flexolmo_jax.eval.harness import FlexOlmoLM

  model = FlexOlmoLM(args.model, experts=args.experts, exclude=args.exclude,
                     batch_size=args.batch_size)
  results = evaluator.simple_evaluate(
      model=model, tasks=[t for t in args.tasks.split(",") if t], num_fewshot=args.num_fewshot,
      limit=args.limit, log_samples=args.log_samples,
      task_manager=TaskManager(include_path=args.include_path))
  print(harness_utils.make_table(results))
  if args.json:
    with open(args.json + ".tmp", "w") as fh:
      json.dump(results, fh, indent=2, default=harness_utils.handle_non_serializable)
    os.replace(args.json + ".tmp", args.json)
  return 0


def add(sub) -> None:
  p = sub.add_parser("lm-eval", help="downstream benchmarks of any saved model with "
                     "lm-evaluation-harness (tasks by name, or your own task YAMLs)")
  p.add_argument("--model", required=True, help="public, dense or merged model directory")
  add_selection_flags(p)
  p.add_argument("--tasks", required=True, help="harness task names: a,b")
  p.add_argument("--include-path", help="a directory of your own task YAMLs (local data)")
  p.add_argument("--num-fewshot", type=natural)
  p.add_argument("--limit", type=count, help="at most this many examples per task")
  p.add_argument("--batch-size", type=count, default=16)
  p.add_argument("--log-samples", action="store_true", help="keep every request and answer")
  p.add_argument("--json", help="write the harness's results here")
  p.set_defaults(fn=_lm_eval)
