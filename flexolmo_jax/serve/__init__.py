"""``flexolmo serve``: one batched server where every request chooses its experts and is told
whose experts wrote its answer (docs/usage.md, "Serving").

- ``programs``: the compiled prefill and decode steps, a row's experts as a mask on its router;
- ``engine``: the slots of the KV cache and the scheduler (continuous batching);
- ``text``: tokens to text as they come, stop strings;
- ``inventory``: ``/v1/experts``, from the model's manifests;
- ``api``: the HTTP routes (OpenAI's ``/v1/completions`` and ours).
"""
