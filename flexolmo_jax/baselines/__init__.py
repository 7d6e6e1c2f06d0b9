"""The paper's baselines over dense models continued from the public one (docs/method.md §7):
``dense`` (the public model continued on one domain: ``flexolmo train-dense``, flexolmo/public.py),
``soup``, ``btm`` and ``btx``. Every member must be continued from the same public model (same
anchor fingerprint, config and vocabulary); a mismatch is refused naming the member
(``members``)."""
