"""The ``cudnn`` block kernel: PyTorch's cuDNN attention aten ops, on CUDA (sm80 and later).

``_scaled_dot_product_cudnn_attention`` returns the log-sum-exp beside the output (with
``compute_log_sumexp=True``) and ``_scaled_dot_product_cudnn_attention_backward`` takes the final
output and LSE, which is what a ring step needs (``block_kernel.py``). Both are cuDNN 9's fused
flash attention, which NVIDIA tunes for Hopper.

Contract, as torch 2.13 states it (op schemas; the meta kernels in ``torch/_meta_registrations.py``;
PyTorch's own context-parallel ring, ``torch/distributed/tensor/experimental/_context_parallel``,
which merges these LSEs with the same sigmoid rule as the flash ones):

* q, k, v, out ``[b, heads, s, d]`` with the last dim contiguous, so Megatron's ``[s, b, heads, d]``
  goes in as a permuted view with no copy; the output is allocated in q's layout;
* the forward returns ``(out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, philox_seed,
  philox_offset, debug_attn_mask)``; ``logsumexp`` is fp32 ``[b, heads, sq, 1]`` (``[b, heads, sq]``
  in older releases; both are read here), the natural-log LSE of the *scaled* scores;
* GQA: k/v may have fewer heads than q (the SDPA dispatcher admits cuDNN with ``enable_gqa``);
  they go in un-expanded and the backward returns dk/dv shaped like k/v, reduced to the groups;
* ``is_causal`` masks top-left (query ``i`` sees keys ``0..i``), which is the ring's diagonal
  block, where ``sq == sk``;
* cuDNN older than 9.5.1 requires ``grad_out`` to have ``out``'s strides, so the backward gives
  it those.

Limits (``unsupported_reason`` names them, after PyTorch's own cuDNN gate in ``sdp_utils.cpp``):
CUDA on sm80..sm121, cuDNN >= 9.0, fp16/bf16, head dim a multiple of 8 and at most 128 (256 on
sm90 with cuDNN >= 9.10). cuDNN does not take a single key, so a block with ``sk == 1`` runs the
``torch`` kernel instead (same LSE convention, exact). No dropout, like the flash kernels.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from megatron_helix.attention import block_kernel_torch
from megatron_helix.attention.block_kernel_torch import _bhsd, _sbhd

_ops = torch.ops.aten  # where the two ops are looked up (the CPU tests put a stand-in here)
DTYPES = (torch.float16, torch.bfloat16)
MIN_CUDNN = 90000
CAPABILITIES = ((8, 0), (12, 1))  # the range PyTorch's cuDNN attention gate admits


def _head_dim_limit(q: Tensor) -> int:
    """128; 256 on Hopper (sm90) with cuDNN >= 9.10, as PyTorch's gate allows."""
    wide = torch.cuda.get_device_capability(q.device) == (9, 0)
    return 256 if wide and (torch.backends.cudnn.version() or 0) >= 91000 else 128


def unsupported_reason(q: Tensor) -> str:
    """Why this kernel cannot run blocks like q ``[s, b, h, d]``; ``""`` when it can."""
    if not q.is_cuda:
        return f"cudnn runs on CUDA only, q is on {q.device}"
    if q.dtype not in DTYPES:
        return f"cudnn takes fp16 or bf16, not {q.dtype}"
    if q.shape[-1] % 8:
        return f"cudnn needs a head dim that is a multiple of 8, not {q.shape[-1]}"
    version = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if not version or version < MIN_CUDNN:
        return f"cudnn attention needs cuDNN >= 9.0, found {version}"
    capability = torch.cuda.get_device_capability(q.device)
    if not CAPABILITIES[0] <= capability <= CAPABILITIES[1]:
        return f"cudnn attention runs on sm80..sm121, not sm{capability[0]}{capability[1]}"
    if q.shape[-1] > _head_dim_limit(q):
        return f"cudnn takes a head dim of at most {_head_dim_limit(q)} here, not {q.shape[-1]}"
    return ""


def forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float
) -> Tuple[Tensor, Tensor]:
    """q ``[sq, b, h, d]``, k/v ``[sk, b, g, d]`` -> out ``[sq, b, h, d]``, lse ``[sq, b, h]``
    fp32."""
    if k.shape[0] == 1:
        return block_kernel_torch.forward(q, k, v, causal, softmax_scale)
    out, lse = _ops._scaled_dot_product_cudnn_attention(
        _bhsd(q), _bhsd(k), _bhsd(v), None, True,  # attn_bias, compute_log_sumexp
        0.0, causal, False, scale=softmax_scale,  # dropout_p, is_causal, return_debug_mask
    )[:2]
    return _sbhd(out), lse.flatten(2).permute(2, 0, 1)


def backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    causal: bool, softmax_scale: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """-> dq ``[sq, b, h, d]``, dk, dv ``[sk, b, g, d]`` given the rows' final out and lse."""
    if k.shape[0] == 1:
        return block_kernel_torch.backward(dout, q, k, v, out, lse, causal, softmax_scale)
    out_, dout_ = _bhsd(out), _bhsd(dout)
    if dout_.stride() != out_.stride():
        dout_ = torch.empty_like(out_).copy_(dout_)
        if dout_.stride() != out_.stride():  # out not dense: give both the default layout
            out_, dout_ = out_.contiguous(), dout_.contiguous()
    no_rng = torch.zeros((), dtype=torch.int64, device=q.device)  # read only with dropout
    grads = _ops._scaled_dot_product_cudnn_attention_backward(
        dout_, _bhsd(q), _bhsd(k), _bhsd(v), out_,
        lse.permute(1, 2, 0).unsqueeze(-1).contiguous(),  # [b, h, sq, 1], as the forward gives
        no_rng, no_rng, None, None, None,  # philox seed/offset, attn_bias, cum_seq_q/k
        q.shape[0], k.shape[0], 0.0, causal, scale=softmax_scale,
    )
    dq, dk, dv = (_sbhd(g) for g in grads)
    return dq, dk, dv
