"""llama4-jax: a JAX/Flax framework for training Meta's Llama 4 (Scout, Maverick)."""
from setuptools import find_packages, setup

setup(
    name="llama4-jax",
    version="0.1.0",
    description="Llama 4 (Scout/Maverick) in JAX/Flax: HF-exact model, sharding, training stages",
    python_requires=">=3.11",
    packages=find_packages(include=["llama4_jax*", "train*", "sharding*"]),
    # jax/jaxlib 0.10.x is the newest pair flax 0.12.8 works with (jax 0.11.1 removed an API flax uses).
    install_requires=[
        "jax>=0.10.2,<0.11",
        "jaxlib>=0.10.2,<0.11",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "grain==0.2.18",
        "tensorstore==0.1.86",
        "numpy>=2.0,<3",
        "ml_dtypes>=0.5",
        "safetensors>=0.6,<1",
        "tokenizers>=0.22,<1",
        "pyyaml>=6,<7",
        "tqdm>=4.66",
        "pyarrow>=17",
        "tensorboardX>=2.6,<3",
        "flatbuffers>=24.3",  # jax.export's serialization (train/step_cache.py)
        "matplotlib>=3.9,<4",
        "pillow>=10,<14",  # the image processor (llama4_jax/processor.py)
    ],
    package_data={"train.launch": ["*.yaml", "*.sbatch", "*.sh"]},
    entry_points={"console_scripts": ["llama4-train=train.__main__:main",
                                      "llama4-launch=train.launch:main",
                                      "llama4-plan=train.plan:main",
                                      "llama4-convert=train.convert:main",
                                      "llama4-generate=train.generate:main",
                                      "llama4-eval=train.harness:main"]},
    extras_require={
        # libtpu: `llama4-plan --topology` and the TPU compile tests compile for TPU pods on any
        # machine (AOT); CPU runs are unaffected (JAX_PLATFORMS=cpu in the tests and the planner).
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
        # `llama4-eval`: EleutherAI's lm-evaluation-harness with our model class
        "eval": ["lm-eval==0.4.13"],
        # torch 2.13.0 (CPU) comes from a local wheel; any other pin pulls a multi-GB CUDA build.
        "test": [
            "pytest>=8,<10",
            "pytest-xdist>=3.6,<4",
            "torch==2.13.0",
            "transformers==5.23.0",
            # Meta's own Llama 4 code (tokenizer, chat format, Transformer): a second reference;
            # its model-parallel layers come from fairscale (world size 1 in the tests)
            "llama-models==0.3.0",
            "fairscale==0.4.13",
            "lm-eval==0.4.13",
            # writes the FP8 test checkpoint with its own quantizer; transformers reads it
            "compressed-tensors==0.20.1",
        ],
    },
)
