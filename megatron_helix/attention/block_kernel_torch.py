"""The ``torch`` block kernel: PyTorch's own flash SDPA aten ops, on CPU and CUDA.

``_scaled_dot_product_flash_attention_for_cpu`` (+ ``_backward``) on CPU and
``_scaled_dot_product_flash_attention`` (+ ``_backward``) on CUDA return the log-sum-exp beside
the output and take the final output and LSE in the backward, which is what a ring step needs
(``block_kernel.py``). On CUDA they are FlashAttention-2 inside PyTorch; on Hopper
``torch.nn.attention.activate_flash_attention_impl("FA3")`` swaps FA3 into the same ops.

The ops take ``[b, heads, s, d]``; from Megatron's ``[s, b, heads, d]`` that is a free view
(they need only the last dim contiguous). GQA k/v go in un-expanded and their gradients come
back reduced to the ``g`` groups. Inputs are checked by ``block_kernel``; CUDA takes fp16/bf16.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

CUDA_DTYPES = (torch.float16, torch.bfloat16)


def _bhsd(x: Tensor) -> Tensor:
    """``[s, b, h, d]`` -> ``[b, h, s, d]`` view."""
    return x.permute(1, 2, 0, 3)


def _sbhd(x: Tensor) -> Tensor:
    """``[b, h, s, d]`` -> ``[s, b, h, d]`` view."""
    return x.permute(2, 0, 1, 3)


def forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float
) -> Tuple[Tensor, Tensor]:
    """q ``[sq, b, h, d]``, k/v ``[sk, b, g, d]`` -> out ``[sq, b, h, d]``, lse ``[sq, b, h]``
    fp32."""
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            _bhsd(q), _bhsd(k), _bhsd(v), 0.0, causal, False, scale=softmax_scale
        )[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _bhsd(q), _bhsd(k), _bhsd(v), 0.0, causal, scale=softmax_scale
        )
    return _sbhd(out), lse.permute(2, 0, 1)


def backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    causal: bool, softmax_scale: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """-> dq ``[sq, b, h, d]``, dk, dv ``[sk, b, g, d]`` given the rows' final out and lse."""
    args = (_bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out))
    lse_bhs = lse.permute(1, 2, 0).contiguous()  # the CUDA kernel indexes lse as dense [b, h, s]
    if q.is_cuda:
        no_rng = torch.empty(0, dtype=torch.uint64, device=q.device)  # read only with dropout
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            *args, lse_bhs, None, None, q.shape[0], k.shape[0], 0.0, causal, no_rng, no_rng,
            scale=softmax_scale,
        )
    else:
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *args, lse_bhs, 0.0, causal, scale=softmax_scale
        )
    dq, dk, dv = (_sbhd(g) for g in grads)
    return dq, dk, dv
