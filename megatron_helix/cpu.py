"""Run megatron-core (0.16.1 through 0.19.x) on CPU ranks (gloo): the support code for tests and the demo.

megatron-core assumes CUDA in a handful of places that have nothing to do with the math:
``torch.cuda.current_device()`` used as a device, ``device="cuda"`` bookkeeping tensors in the
pipeline schedules, optimizer and gradient clipping, the CUDA-type assertion of gradient
clipping, ``torch.cuda.synchronize()`` in p2p, the gradient buffer's stream waits, the MoE all-to-all dispatcher's side stream, an
unimported name in the MoE utilities, and the RNG tracker, which keeps *device* generator
states (on CPU the device generator is the CPU's, so forks, attention dropout and activation
recomputation behave as on a GPU). ``enable_cpu_execution()`` redirects exactly those, once,
and only when CUDA is absent; it never runs on a GPU machine, so nothing here is on the GPU
path. Everything numerical (linear layers, softmax, collectives) stays megatron-core's.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

logger = logging.getLogger(__name__)

_ENABLED = False


def enable_cpu_execution() -> bool:
    """Patch megatron-core's CUDA touch points for CPU execution; returns whether it did.

    A no-op (returning False) when CUDA is available. Idempotent.
    """
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    _ENABLED = True

    # torch.cuda.current_device() is used as `device=` all over megatron-core.
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    _redirect_cuda_factories()
    _give_the_gradient_buffer_the_cpu_stream()
    _route_default_causal_mask_to_cpu()
    _define_missing_moe_gemm_name()
    _allow_sequence_parallel_torch_norm()
    _select_cp_rotary_positions_on_cpu()
    _give_the_moe_dispatcher_the_cpu_stream()
    _clip_cpu_grads()
    _route_rng_tracker_to_cpu_generator()
    _run_the_distributed_optimizer_on_cpu()
    logger.info("megatron_helix: megatron-core patched for CPU execution")
    return True


class _CpuStream:
    """The one (CPU) stream, and its events: work is done when it is issued."""

    def wait_stream(self, stream) -> None:
        del stream

    def wait_event(self, event) -> None:
        del event

    def record_event(self, event=None) -> "_CpuStream":
        return self

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_CPU_STREAM = _CpuStream()


class CpuCuda:
    """What a redirected module sees as ``torch.cuda``: one device, the CPU, and one stream.

    Names not redefined here are ``torch.cuda``'s own.
    """

    is_available = staticmethod(lambda: True)
    device_count = staticmethod(lambda: 1)
    current_device = staticmethod(lambda: "cpu")
    set_device = staticmethod(lambda device: None)
    synchronize = staticmethod(lambda *args, **kwargs: None)
    empty_cache = staticmethod(lambda: None)
    Stream = staticmethod(lambda *args, **kwargs: _CPU_STREAM)
    current_stream = staticmethod(lambda *args, **kwargs: _CPU_STREAM)
    stream = staticmethod(lambda stream: contextlib.nullcontext())
    get_rng_state = staticmethod(lambda *args, **kwargs: torch.get_rng_state())
    set_rng_state = staticmethod(lambda state, *args, **kwargs: torch.set_rng_state(state))
    manual_seed = staticmethod(torch.manual_seed)

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


def _cpu_device(kwargs: dict) -> dict:
    if str(kwargs.get("device", "")).startswith("cuda"):
        kwargs = dict(kwargs, device="cpu")
    return kwargs


class CpuTorch:
    """A view of ``torch`` whose tensor factories map ``device="cuda"`` to the CPU.

    Assigned as a module's ``torch`` name, it redirects that module alone. ``cuda``, when given,
    replaces what the module sees as ``torch.cuda``.
    """

    _FACTORIES = ("zeros", "ones", "empty", "tensor", "full")

    def __init__(self, cuda=None):
        self._cuda = cuda

    def __getattr__(self, name):
        if name == "cuda" and self._cuda is not None:
            return self._cuda
        attr = getattr(torch, name)
        if name in self._FACTORIES:
            return functools.wraps(attr)(lambda *a, **k: attr(*a, **_cpu_device(k)))
        return attr


def _redirect_cuda_factories() -> None:
    """Modules that allocate small bookkeeping tensors with a literal ``device="cuda"``:
    the pipeline schedules (token counts), the optimizer (loss scale, found-inf), gradient
    clipping and the local multi-tensor fallbacks in ``megatron.core.utils`` (norms)."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer.moe import moe_utils

    for module in (schedules, optimizer, clip_grads, moe_utils, utils):
        module.torch = CpuTorch()


def _give_the_gradient_buffer_the_cpu_stream() -> None:
    """The gradient buffer waits on ``torch.cuda.current_stream()`` when it starts and
    finishes a gradient sync (megatron-core 0.19; 0.16.1 asks only when overlapping): on CPU
    every wait is on the one stream, where work is done when it is issued."""
    from megatron.core.distributed import param_and_grad_buffer

    param_and_grad_buffer.torch = CpuTorch(cuda=CpuCuda())


@contextlib.contextmanager
def _cpu_tensors_named_as_cuda():
    """``Tensor.type()`` (no argument) reports ``torch.cuda.FloatTensor`` for a CPU fp32 tensor,
    and likewise for every dtype; any other use of ``Tensor.type`` is unchanged."""
    original = torch.Tensor.type

    def named(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and not self.is_cuda:
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = named
    try:
        yield
    finally:
        torch.Tensor.type = original


def _run_the_distributed_optimizer_on_cpu() -> None:
    """megatron-core 0.16.1's ``DistributedOptimizer`` on CPU parameters.

    Its construction sorts parameters into fp32 and fp16/bf16 groups by their CUDA type names
    and raises for any other name: it sees CPU parameters under the CUDA names of their dtypes.
    Gathering its state for a checkpoint moves each shard to the GPU unless it is told to use
    the gloo data-parallel group, which on CPU it always is. With torch's Adam (the optimizer
    without Transformer Engine or apex) its ``state_dict`` reads Adam's step from the
    parameters' state, which a fresh optimizer about to load a checkpoint does not have yet:
    there it reads step 0, as the fused optimizers' parameter groups would say; and loading the
    model-space (``fully_reshardable``) format copies every state entry, the step included,
    from the checkpoint's tensors, which carry the step in the parameter groups instead: the
    step already restored from there is kept. That restored step is one tensor shared by every
    parameter, which torch's Adam increments in place once per parameter, so every parameter
    gets its own copy. (Its buffers allocate on ``torch.cuda.current_device()``, the CPU
    here.)
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    init, gather = DistributedOptimizer.__init__, DistributedOptimizer.get_parameter_state_dp_zero
    state_dict = DistributedOptimizer.state_dict
    set_states = DistributedOptimizer._set_main_param_and_optimizer_states
    load_state_dict = DistributedOptimizer.load_state_dict

    @functools.wraps(init)
    def init_on_cpu(self, *args, **kwargs):
        with _cpu_tensors_named_as_cuda():
            init(self, *args, **kwargs)

    @functools.wraps(gather)
    def gather_with_gloo(self, use_gloo_comm=True, empty_data=False, return_on_all_ranks=False):
        del use_gloo_comm
        return gather(self, use_gloo_comm=True, empty_data=empty_data,
                      return_on_all_ranks=return_on_all_ranks)

    @functools.wraps(state_dict)
    def state_dict_before_the_first_step(self):
        if self.optimizer.state:
            return state_dict(self)
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                self.optimizer.state[param]["step"] = torch.tensor(0.0)
        try:
            return state_dict(self)
        finally:
            self.optimizer.state.clear()

    @functools.wraps(set_states)
    def set_states_keeping_the_step(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        step = self.optimizer.state[main_param].get("step")
        if step is not None and "step" not in tensors:
            tensors = {**tensors, "step": step}
        set_states(self, model_param, tensors)

    @functools.wraps(load_state_dict)
    def load_state_dict_with_a_step_per_parameter(self, state_dict):
        load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    DistributedOptimizer.__init__ = init_on_cpu
    DistributedOptimizer.load_state_dict = load_state_dict_with_a_step_per_parameter
    DistributedOptimizer.get_parameter_state_dp_zero = gather_with_gloo
    DistributedOptimizer.state_dict = state_dict_before_the_first_step
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states_keeping_the_step


def _give_the_moe_dispatcher_the_cpu_stream() -> None:
    """The all-to-all token dispatcher copies its split sizes to the host (as numpy arrays, which
    the collectives take as split sizes) on a side CUDA stream. On CPU the side stream is the one
    stream, and a host tensor still becomes the numpy array the dispatcher asked for."""
    from megatron.core.transformer.moe import token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.numpy()
        return tensor

    token_dispatcher.torch = CpuTorch(cuda=CpuCuda())
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _clip_cpu_grads() -> None:
    """``clip_grad_by_total_norm_fp32`` asserts that every gradient is a
    ``torch.cuda.FloatTensor``; on CPU the same fp32 gradients are scaled by the same
    ``max_norm / (total_norm + 1e-6)`` when that is below 1."""
    from megatron.core.optimizer import clip_grads, optimizer

    original = clip_grads.clip_grad_by_total_norm_fp32

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if use_decoupled_grad:
            return original(parameters, max_norm, total_norm, use_decoupled_grad)
        grads = [param.grad.detach() for param in parameters if param.grad is not None]
        if any(grad.dtype != torch.float32 for grad in grads):
            raise TypeError("clip_grad_by_total_norm_fp32 expects fp32 gradients")
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0 and grads:
            torch._foreach_mul_(grads, clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


def _route_default_causal_mask_to_cpu() -> None:
    """``get_default_causal_mask`` hard-codes ``device="cuda"`` (imported by name in two places)."""
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    @functools.lru_cache(maxsize=None)
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    utils.get_default_causal_mask = get_default_causal_mask
    fused_softmax.get_default_causal_mask = get_default_causal_mask


def _define_missing_moe_gemm_name() -> None:
    """0.16.1's ``moe_utils`` references ``te_general_gemm`` without importing it."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _allow_sequence_parallel_torch_norm() -> None:
    """Let the torch-norm fallback run under sequence parallelism (apex/TE norms do).

    A LayerNorm over a sequence shard is the same LayerNorm; what sequence parallelism adds is
    that its weight gradients are partial per rank, which Megatron's ``finalize_model_grads``
    all-reduces for parameters flagged ``sequence_parallel`` — the flag set here, as apex's
    and TE's norms set it. Needed on CPU because MoE with tensor parallelism requires SP.
    """
    import copy

    from megatron.core.transformer import torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__

    def __new__(cls, config, hidden_size, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, *args, **kwargs)
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = original_new(cls, plain, hidden_size, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(__new__)


def _select_cp_rotary_positions_on_cpu() -> None:
    """``get_pos_emb_on_this_cp_rank`` builds its index in pinned memory and calls ``.cuda()``.

    Same selection (this rank's two zigzag chunks of the rotary table), index on the table's
    device.
    """
    from megatron.core.models.common.embeddings import (
        rope_utils,
        rotary_pos_embedding,
        yarn_rotary_pos_embedding,
    )

    def get_pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
        cp_size, cp_rank = cp_group.size(), cp_group.rank()
        index = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
        chunks = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1,
                              *pos_emb.shape[seq_dim + 1:])
        selected = chunks.index_select(seq_dim, index)
        return selected.view(*selected.shape[:seq_dim], -1, *selected.shape[seq_dim + 2:])

    for module in (rope_utils, rotary_pos_embedding, yarn_rotary_pos_embedding):
        module.get_pos_emb_on_this_cp_rank = get_pos_emb_on_this_cp_rank


def _route_rng_tracker_to_cpu_generator() -> None:
    """Megatron's RNG tracker keeps and swaps *device* generator states; on CPU the device
    generator is the CPU one, so ``fork()`` swaps the CPU generator's state. Its check that the
    CPU state did not change inside a fork cannot hold then, and its warning is silenced.
    Attention dropout drawn inside a fork, and activation recomputation, which restores the
    tracker's states before replaying a layer, then behave as on a GPU."""
    from megatron.core.tensor_parallel import random

    def get_state(device=-1, clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    random._get_cuda_rng_state = get_state
    random._set_cuda_rng_state = set_state
    random.torch = CpuTorch(cuda=CpuCuda())
    logging.getLogger(random.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage()
    )
