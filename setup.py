"""Package definition for flexolmo_jax (see README.md)."""
from setuptools import find_packages, setup

setup(
    name="flexolmo_jax",
    version="0.1.0",
    description="FlexOlmo in JAX/Flax: train language models without pooling data.",
    python_requires=">=3.11",
    packages=find_packages(include=["flexolmo_jax", "flexolmo_jax.*"]),
    include_package_data=True,
    install_requires=[
        # Ranges admit what pip resolves on Python 3.11 (jax 0.10.x) and on 3.12 (jax 0.12.x).
        "jax>=0.10.2,<0.13",
        "jaxlib>=0.10.2,<0.13",
        "flax>=0.12.8,<0.14",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.14",
        "gin-config>=0.5",
        "numpy>=1.26",
        # Data pipeline (seqio Tasks over TFDS datasets prepared on the owner's disk).
        "seqio>=0.0.20",
        "tensorflow-datasets>=4.9.10",
        "tensorflow>=2.21,<2.23",
        "tensorboard>=2.20",  # tf.summary event files of the training loop
        "importlib_resources",  # needed by tensorflow-datasets' builders, not declared by it
        "sentencepiece>=0.2",
        "ml_dtypes>=0.4",  # bf16 safetensors (export-hf / import-hf); also a jax dependency
        "matplotlib>=3.8",  # the demo's report.png
        # DP-SGD for experts: per-example clipping and batch sampling (jax-privacy), the
        # privacy accountants (dp-accounting; it pins attrs<24).
        "jax-privacy>=2.0,<3",
        "dp-accounting>=0.6,<0.7",
    ],
    extras_require={
        # Hugging Face in and out; lm-evaluation-harness for downstream benchmarks (`lm-eval`).
        "hf": ["transformers>=5.0,<6", "safetensors>=0.4", "torch==2.13.0",
               "lm-eval[hf]>=0.4.13,<0.5"],
        # `flexolmo plan --topology v5p:...` compiles for TPUs on any host through libtpu (the
        # version jax[tpu] 0.10.2 pins).
        "tpu": ["libtpu==0.0.42.*"],
        # `flexolmo serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn).
        "serve": ["fastapi>=0.115,<1", "uvicorn>=0.30,<1"],
        "test": [
            # pytest 9 ignores the groups pytest-xdist 3.8 gives tests (--dist loadgroup): the
            # quick demo would run on both workers of `make test`.
            "pytest>=8,<9",
            "pytest-timeout>=2.3",
            "pytest-xdist>=3.5",
            "transformers>=5.0,<6",
            "safetensors>=0.4",
            "torch==2.13.0",
            "lm-eval[hf]>=0.4.13,<0.5",
            "libtpu==0.0.42.*",
            "fastapi>=0.115,<1",
            "uvicorn>=0.30,<1",
            # the official client talks to `flexolmo serve` in the serving tests
            "openai>=1.40,<4",
        ],
    },
    entry_points={"console_scripts": ["flexolmo=flexolmo_jax.cli:main"]},
)
