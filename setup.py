"""Packaging for megatron_helix: helix, ring and layer-wise parallelism for megatron-core."""

from setuptools import find_packages, setup

setup(
    name="megatron_helix",
    version="0.1.0",
    description=(
        "Helix two-level attention partitioning, ring sequence parallelism and "
        "layer-wise cache-aware pipelines for Megatron-LM / megatron-core"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_helix", "megatron_helix.*"]),
    python_requires=">=3.10",
    install_requires=[
        # The CPU build of torch 2.13.0 is what CI runs; CUDA builds >= 2.5 work on GPUs
        # (torch 2.11 + CUDA 13 was used on H100).
        "torch>=2.5",
        # Only 0.16.x is supported: the plugin subclasses SelfAttention and uses
        # parallel_state internals whose signatures change between minor releases.
        "megatron-core>=0.16.1,<0.17",
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=7", "matplotlib"],
        "plot": ["matplotlib"],
        # transformer-engine and apex are used when importable; they are never required.
    },
    entry_points={"console_scripts": ["megatron-helix=megatron_helix.cli:main"]},
)
