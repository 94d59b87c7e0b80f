"""Packaging for megatron_helix: helix, ring and layer-wise parallelism for megatron-core."""

from setuptools import find_packages, setup

# What Megatron-LM's training code (pretrain_gpt.py, megatron.training) imports beyond
# megatron-core, and what builds its dataset helpers (pybind11); psutil for megatron-core's
# checkpoint writer, which hangs without it. The tests run the vendored Megatron-LM.
MEGATRON_LM_REQUIRES = ["six", "regex", "pyyaml", "pydantic", "einops", "triton", "pybind11",
                        "psutil"]
# The Hugging Face export (megatron_helix/hf_export.py): mbridge maps megatron-core's GPT weights
# to transformers' Llama; tested with mbridge 0.15.1 and transformers 4.57.6.
HF_REQUIRES = ["mbridge>=0.15.1,<0.16", "transformers>=4.56", "safetensors"]

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
        # CI runs torch 2.13.0 (scripts/env.sh pins it).
        "torch>=2.5",
        # The tested range (CI: 0.16.1 on Python 3.11, 0.19.2 on Python 3.12). The plugin
        # subclasses SelfAttention and calls internals that change between minor releases;
        # megatron_helix/compat.py holds the differences and refuses other releases.
        "megatron-core>=0.16.1,<0.20",
        "numpy",
    ],
    extras_require={
        "megatron-lm": MEGATRON_LM_REQUIRES,
        "hf": HF_REQUIRES,
        "test": ["pytest>=7.3", "matplotlib", *MEGATRON_LM_REQUIRES, *HF_REQUIRES],
        "plot": ["matplotlib"],
        # The L2 residency window (megatron_helix/l2_residency.py) goes through NVIDIA's typed
        # runtime bindings where installed, else through libcudart by ctypes.
        "cuda": ["cuda-bindings"],
        # transformer-engine and apex are used when importable; they are never required.
    },
    entry_points={"console_scripts": ["megatron-helix=megatron_helix.cli:main"]},
)
