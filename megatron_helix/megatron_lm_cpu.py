"""Run Megatron-LM's training loop (``pretrain_gpt.py``) on CPU gloo ranks: for tests and demos.

This is *CPU testing support*, never a way to train: it lets CI and a newcomer without a GPU run
Megatron-LM's own ``pretrain_gpt.py`` end to end and compare a helix run's loss curve with one
rank's. ``enable_megatron_lm_cpu_execution()`` refuses to run where CUDA exists, so nothing
here can reach the GPU path.

Beside the megatron-core points of ``megatron_helix.cpu``, Megatron-LM (core_v0.16.1 and
core_v0.19.0 alike) touches CUDA in its training loop where the math does not care:

- ``initialize_megatron`` asserts ``torch.cuda.is_available()``; ``_initialize_distributed``
  builds the model-parallel groups and ``_set_random_seed`` seeds the model-parallel RNG only
  when ``torch.cuda.device_count() > 0``, after ``torch.cuda.set_device``;
- ``_compile_dependencies`` builds the fused kernels with ``nvcc`` (the dataset helpers, which
  are needed, build with the host compiler) and ``set_jit_fusion_options`` warms the fusions up
  on ``device="cuda"`` (core_v0.19.0 passes it ``tp_size``);
- ``training.py`` and ``utils.py`` make ``device='cuda'`` bookkeeping tensors (loss and grad-norm
  reductions, timers, flags), call ``model.cuda()`` and ``.cuda()`` on every batch, and set up
  DDP on a side CUDA stream; ``validate_args`` asks the GPU's architecture when TP > 1;
- the rerun state machine and ``checkpointing.py`` save and restore the CUDA RNG state, and the
  checkpoint loader agrees on the iteration with a ``device='cuda'`` all-reduce.

Each is redirected below to its CPU meaning: the CPU is "device 0" of one device, ``.cuda()``
keeps a tensor where it is, streams are the default (CPU) stream, and the CUDA RNG state is
the CPU generator's (``megatron_helix.cpu``). Settings the CPU cannot honour
are set in ``CPU_SETTINGS`` with the reason, and printed once, just before ``validate_args``
(wherever the tree calls it from: ``megatron_helix.compat.megatron_lm_argument_modules``).
"""

from __future__ import annotations

import argparse
import functools
import os
from typing import Callable, List, Tuple

import torch

from megatron_helix.cpu import CpuCuda, CpuTorch, enable_cpu_execution

#: Megatron-LM arguments the CPU mode sets: (attribute, value, flag as a user writes it, why).
CPU_SETTINGS: Tuple[Tuple[str, object, str, str], ...] = (
    ("distributed_backend", "gloo", "--distributed-backend gloo", "NCCL needs GPUs"),
    ("gradient_accumulation_fusion", False, "--no-gradient-accumulation-fusion",
     "the fused weight-gradient kernel is a CUDA extension"),
    ("no_persist_layer_norm", True, "--no-persist-layer-norm", "apex's persistent kernel is CUDA"),
    ("masked_softmax_fusion", False, "--no-masked-softmax-fusion", "a CUDA kernel"),
    ("bias_gelu_fusion", False, "--no-bias-gelu-fusion", "a CUDA fusion"),
    ("bias_swiglu_fusion", False, "--no-bias-swiglu-fusion", "a CUDA fusion"),
    ("bias_dropout_fusion", False, "--no-bias-dropout-fusion", "a CUDA fusion"),
    ("apply_rope_fusion", False, "--no-rope-fusion", "the fused RoPE is Transformer Engine's"),
    ("rerun_mode", "disabled", "--rerun-mode disabled", "the rerun state machine is for GPUs"),
)

_ENABLED = False


def apply_cpu_settings(args: argparse.Namespace) -> None:
    """Set ``CPU_SETTINGS`` on parsed Megatron-LM args (before ``validate_args``); say which
    changed, once, on rank 0."""
    changed = []
    for attr, value, flag, why in CPU_SETTINGS:
        if hasattr(args, attr) and getattr(args, attr) != value:
            setattr(args, attr, value)
            changed.append(f"{flag} ({why})")
    if changed and getattr(args, "rank", 0) == 0:
        print("megatron_helix CPU mode sets: " + "; ".join(changed), flush=True)


def _view_torch_as_cpu(*modules) -> None:
    view = CpuTorch(cuda=CpuCuda())
    for module in modules:
        module.torch = view


def dataset_helpers_make_command(datasets_dir: str) -> List[str]:
    """``make`` for Megatron's dataset index helpers in ``datasets_dir`` (a tree's
    ``megatron/core/datasets``), for the running interpreter.

    Megatron's Makefile asks ``python3-config`` and ``python3 -m pybind11`` from ``PATH``, which
    under pyenv or a venv can be another Python than the one running (a tree's
    ``.python-version`` selects it); the extension suffix and include paths are therefore given
    here.
    """
    import sysconfig

    import pybind11

    includes = f"-I{sysconfig.get_paths()['include']} -I{pybind11.get_include()}"
    return ["make", "-C", datasets_dir, f"LIBEXT={sysconfig.get_config_var('EXT_SUFFIX')}",
            f"CPPFLAGS={includes}"]


def _compile_dataset_helpers_only() -> None:
    """``_compile_dependencies`` without the CUDA fused kernels: the dataset index helpers
    (host C++, ``dataset_helpers_make_command``) on rank 0, then a barrier."""
    import subprocess
    import sys

    from megatron.core import datasets

    if torch.distributed.get_rank() == 0:
        command = dataset_helpers_make_command(os.path.dirname(os.path.abspath(datasets.__file__)))
        if subprocess.run(command).returncode != 0:
            sys.exit(f"megatron_helix CPU mode: '{' '.join(command)}' failed to build "
                     f"Megatron's dataset helpers")
    torch.distributed.barrier()


def _keep_on_cpu(self, *args, **kwargs):
    """``Tensor.cuda`` / ``Module.cuda`` without CUDA: the object stays where it is."""
    return self


def enable_megatron_lm_cpu_execution() -> None:
    """Redirect Megatron-LM's (and megatron-core's) CUDA touch points to the CPU. Idempotent.

    Call after ``sys.path`` puts the Megatron-LM tree first and before its script runs.

    Raises:
        RuntimeError: CUDA is available (the CPU mode is for machines without a GPU).
    """
    global _ENABLED
    if _ENABLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "megatron_helix's CPU mode is for machines without a GPU, and CUDA is available "
            "here: run the script without --cpu"
        )
    enable_cpu_execution()
    from megatron.training import arguments, initialize, training

    from megatron_helix.compat import megatron_lm_argument_modules, megatron_lm_cuda_modules

    _view_torch_as_cpu(*megatron_lm_cuda_modules())
    initialize._compile_dependencies = _compile_dataset_helpers_only
    training.set_jit_fusion_options = lambda *args, **kwargs: None
    arguments.get_device_arch_version = lambda: 0
    _, validating = megatron_lm_argument_modules()
    validating.validate_args = _applying_cpu_settings(validating.validate_args)
    initialize.initialize_megatron = _allowing_no_cuda(initialize.initialize_megatron)
    training.initialize_megatron = initialize.initialize_megatron
    torch.Tensor.cuda = _keep_on_cpu
    torch.nn.Module.cuda = _keep_on_cpu
    _ENABLED = True


def _applying_cpu_settings(validate_args: Callable) -> Callable:
    @functools.wraps(validate_args)
    def wrapped(args, *rest, **kwargs):
        apply_cpu_settings(args)
        return validate_args(args, *rest, **kwargs)

    return wrapped


def _allowing_no_cuda(initialize_megatron: Callable) -> Callable:
    @functools.wraps(initialize_megatron)
    def wrapped(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return initialize_megatron(*args, **kwargs)

    return wrapped
