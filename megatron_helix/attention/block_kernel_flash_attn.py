"""The ``flash_attn`` block kernel: Dao-AILab flash-attn 2 (>= 2.7), on CUDA, when installed.

A ring step needs the forward's log-sum-exp and a backward fed with the rows' *final* output
and LSE (``block_kernel.py``). flash-attn's public ``flash_attn_func`` returns the LSE but its
backward only ever uses the block's own output, so this goes one level down, to the ops
``flash_attn_func`` itself wraps: ``flash_attn.flash_attn_interface._flash_attn_forward`` and
``_flash_attn_backward`` (registered as ``torch.ops.flash_attn.*`` since 2.7.0, with the
signatures used here unchanged through 2.8).

Layout: flash-attn takes ``[b, s, heads, d]`` and needs only the last dim contiguous, so
Megatron's ``[s, b, heads, d]`` goes in as a transposed view with no copy; outputs and gradients
are allocated with the inputs' strides and come back the same way. The LSE is ``[b, heads, s]``
fp32. GQA k/v go in un-expanded; flash-attn reduces dk/dv to the ``g`` groups itself.

Limits (``unsupported_reason`` names them): CUDA, fp16/bf16, head dim a multiple of 8 and at
most 256.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Optional, Tuple

import torch
from torch import Tensor

MIN_VERSION = (2, 7)
_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _load() -> Tuple[Optional[ModuleType], str]:
    """-> (``flash_attn.flash_attn_interface``, "") or (None, why it cannot be used)."""
    try:
        import flash_attn
        from flash_attn import flash_attn_interface
    except ImportError as err:  # not installed, or built against another torch
        return None, f"flash_attn cannot be imported ({err})"
    version = getattr(flash_attn, "__version__", "0")
    if tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < MIN_VERSION:
        return None, f"flash_attn {version} is older than {'.'.join(map(str, MIN_VERSION))}"
    return flash_attn_interface, ""


def unsupported_reason(q: Tensor) -> str:
    """Why this kernel cannot run blocks like q ``[s, b, h, d]``; ``""`` when it can."""
    interface, why = _load()
    if interface is None:
        return why + " (pip install flash-attn)"
    if not q.is_cuda:
        return f"flash_attn runs on CUDA only, q is on {q.device}"
    if q.dtype not in _DTYPES:
        return f"flash_attn takes fp16 or bf16, not {q.dtype}"
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return f"flash_attn needs a head dim that is a multiple of 8 and at most 256, not " \
               f"{q.shape[-1]}"
    return ""


def _bshd(x: Tensor) -> Tensor:
    """``[s, b, h, d]`` <-> ``[b, s, h, d]`` view."""
    return x.transpose(0, 1)


def forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float
) -> Tuple[Tensor, Tensor]:
    """q ``[sq, b, h, d]``, k/v ``[sk, b, g, d]`` -> out ``[sq, b, h, d]``, lse ``[sq, b, h]``
    fp32."""
    interface = _load()[0]
    out, lse = interface._flash_attn_forward(
        _bshd(q), _bshd(k), _bshd(v),
        0.0, softmax_scale, causal,  # dropout_p, softmax_scale, causal
        -1, -1, 0.0, None,  # no sliding window, no softcap, no ALiBi
        False,  # return_softmax
    )[:2]
    return _bshd(out), lse.permute(2, 0, 1)


def backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    causal: bool, softmax_scale: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """-> dq ``[sq, b, h, d]``, dk, dv ``[sk, b, g, d]`` given the rows' final out and lse."""
    interface = _load()[0]
    q_, k_, v_ = _bshd(q), _bshd(k), _bshd(v)
    dq, dk, dv = torch.empty_like(q_), torch.empty_like(k_), torch.empty_like(v_)
    interface._flash_attn_backward(
        _bshd(dout), q_, k_, v_, _bshd(out), lse.permute(1, 2, 0).contiguous(),
        dq, dk, dv,  # written in place
        0.0, softmax_scale, causal, -1, -1, 0.0, None,
        False,  # deterministic
    )
    return _bshd(dq), _bshd(dk), _bshd(dv)
