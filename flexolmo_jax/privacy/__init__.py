"""Differential privacy for expert training (docs/method.md §5 and §9).

FlexOlmo leaves DP to each data owner; here it is one flag of ``train-expert``:

- ``accounting``: the settings (:class:`DPConfig`), the run's ``dp_accounting`` event, its
  epsilon and the calibration of the noise to a target epsilon.
- ``documents``: the document as the privacy unit: one example per document (no packing) and
  the batch sampling the accountant assumes (Poisson, or fixed-size batches).
- ``dpsgd``: per-example clipping (``jax_privacy.clipped_grad``) plus Gaussian noise: the
  ``Gradient`` the training step takes.
- ``router``: the router row's domain embedding under DP: a clipped, noised mean (Gaussian
  mechanism, counted in the epsilon) or public proxy text (costs nothing).
"""
