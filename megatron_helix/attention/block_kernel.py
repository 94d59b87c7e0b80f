"""Block attention with log-sum-exp: the kernel every ring step runs, and the LSE merge.

A ring step attends local queries to one visiting key/value block. To combine blocks exactly
the kernel must return, besides the output, the log-sum-exp of each query row's scaled scores,
``lse = log(sum_j exp(scale * q . k_j))``; the backward of a block then needs that row's *global*
output and LSE, never a per-block softmax. These kernels provide that pair:

* ``torch`` (``block_kernel_torch.py``): PyTorch's flash SDPA aten ops, CPU and CUDA, always
  there;
* ``flash_attn`` (``block_kernel_flash_attn.py``): flash-attn >= 2.7 on CUDA, when installed;
* ``cudnn`` (``block_kernel_cudnn.py``): PyTorch's cuDNN attention aten ops on CUDA (sm80+,
  cuDNN >= 9), always installed with a CUDA torch; not yet run on a GPU in this repository;
* ``math`` (``block_kernel_math.py``): explicit fp32 scores, any device; the one with attention
  dropout (a ``keep`` mask from ``dropout_mask``), which a block with dropout always runs.

``kernel="auto"`` walks ``AUTO_ORDER`` for q's device (a CUDA compute capability, or ``None`` for
the default) and takes the first kernel that can run the block; ``torch`` ends every order. The
order is data, not a measured ranking: it stays ``flash_attn``, ``torch`` until a GPU run of
``benchmarks/ring_efficiency.py --kernel ...`` shows another kernel faster on some device, which
then gets its own entry. Naming a kernel that cannot run the block is an error that says why.

Layout: Megatron's ``[s, b, heads, d]`` throughout, ``lse`` as ``[s, b, heads]`` fp32. GQA:
``k``/``v`` arrive un-expanded (``g`` groups, query head ``i`` uses group ``i // (heads // g)``,
Megatron's ``repeat_interleave`` order) and their gradients leave reduced to ``g`` groups.
Causal means the diagonal block: ``sq == sk`` and query ``i`` sees keys ``0..i``.

The flash and cuDNN kernels run no dropout (the CPU op refuses it, and the CUDA backward would
need the forward's RNG state carried alongside the LSE) and no fp32 on CUDA (fp16/bf16 only).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_helix.attention import (
    block_kernel_cudnn,
    block_kernel_flash_attn,
    block_kernel_math,
    block_kernel_torch,
)

KERNELS = {"torch": block_kernel_torch, "flash_attn": block_kernel_flash_attn,
           "cudnn": block_kernel_cudnn, "math": block_kernel_math}
KERNEL_CHOICES = ("auto", *KERNELS)

# ``auto``'s preference per CUDA compute capability ((major, minor); ``None``: any other device).
# Only a recorded GPU measurement may put a kernel ahead of another here; none exists for cudnn.
AUTO_ORDER: Dict[Optional[Tuple[int, int]], Tuple[str, ...]] = {
    None: ("flash_attn", "torch"),
}


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Raise ``ValueError`` unless q ``[sq, b, h, d]``, k/v ``[sk, b, g, d]`` fit together."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "attention expects q [s, b, heads, d] and k, v [s, b, groups, d]; got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch (dim 1) and head "
            "dim (dim 3)"
        )
    heads, groups = q.shape[2], k.shape[2]
    if heads % groups:
        raise ValueError(
            f"{heads} query heads cannot share {groups} key/value groups: groups must divide heads"
        )
    if q.dtype != k.dtype or k.dtype != v.dtype or q.device != k.device or k.device != v.device:
        raise ValueError(
            f"q, k, v must share dtype and device; got {q.dtype}/{q.device}, "
            f"{k.dtype}/{k.device}, {v.dtype}/{v.device}"
        )


def check_kernel_name(kernel: str) -> None:
    """Raise ``ValueError`` unless ``kernel`` is one of ``KERNEL_CHOICES``."""
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"unknown block kernel {kernel!r}; choose one of {KERNEL_CHOICES}")


def _unsupported_reason(kernel: str, q: Tensor) -> str:
    """Why ``kernel`` cannot run blocks like q; ``""`` for the kernels that run anywhere."""
    reason = getattr(KERNELS[kernel], "unsupported_reason", None)
    return reason(q) if reason is not None else ""


def auto_order(q: Tensor) -> Tuple[str, ...]:
    """``AUTO_ORDER``'s entry for q's device, the default one where it has none."""
    capability = None
    if q.is_cuda and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability(q.device)
    order = AUTO_ORDER.get(capability, AUTO_ORDER[None])
    return order if order[-1] == "torch" else (*order, "torch")


def select_kernel(q: Tensor, kernel: str = "auto") -> str:
    """The kernel that runs blocks like q ``[s, b, h, d]``: ``kernel`` itself, checked, or for
    ``"auto"`` the first of ``auto_order(q)`` that can run them."""
    check_kernel_name(kernel)
    if kernel == "auto":
        kernel = next(name for name in auto_order(q) if not _unsupported_reason(name, q))
    else:
        why = _unsupported_reason(kernel, q)
        if why:
            raise ValueError(f"block kernel {kernel!r} cannot run here: {why}")
    if kernel == "torch" and q.is_cuda and q.dtype not in block_kernel_torch.CUDA_DTYPES:
        raise TypeError(
            f"flash attention on CUDA takes fp16 or bf16, not {q.dtype}; run fp32 on CPU"
        )
    return kernel


def _check_block(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> None:
    check_qkv(q, k, v)
    if q.shape[0] == 0 or k.shape[0] == 0:
        raise ValueError("block attention needs at least one query and one key")
    if causal and q.shape[0] != k.shape[0]:
        raise ValueError(
            f"a causal block is a diagonal block: sq ({q.shape[0]}) must equal sk ({k.shape[0]})"
        )


def block_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float, kernel: str = "auto",
    keep: Optional[Tensor] = None, dropout_p: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    """``softmax(scale * q k^T) v`` for one block, with its log-sum-exp.

    q ``[sq, b, h, d]``, k/v ``[sk, b, g, d]`` -> out ``[sq, b, h, d]`` (q's dtype),
    lse ``[sq, b, h]`` fp32. With ``keep`` (bool ``[b, h, sq, sk]``) the probabilities are
    dropped where it is False and scaled by ``1 / (1 - dropout_p)``: the ``math`` kernel.
    """
    _check_block(q, k, v, causal)
    if keep is not None:
        return block_kernel_math.forward(q, k, v, causal, softmax_scale, keep, dropout_p)
    return KERNELS[select_kernel(q, kernel)].forward(q, k, v, causal, softmax_scale)


def block_attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    causal: bool, softmax_scale: float, kernel: str = "auto",
    keep: Optional[Tensor] = None, dropout_p: float = 0.0,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of one block given the rows' final ``out`` ``[sq, b, h, d]`` and ``lse``
    ``[sq, b, h]``.

    Passing the merged (global) out and lse rather than the block's own makes the result this
    block's exact share of the full gradient: ``P = exp(scale q k^T - lse)`` is the global
    probability and ``rowsum(dout * out)`` the global softmax correction.
    ``keep`` / ``dropout_p``: the forward's dropout mask, rebuilt by the caller.
    Returns dq ``[sq, b, h, d]``, dk, dv ``[sk, b, g, d]`` in the inputs' dtype.
    """
    _check_block(q, k, v, causal)
    if keep is not None:
        return block_kernel_math.backward(
            dout, q, k, v, out, lse, causal, softmax_scale, keep, dropout_p)
    return KERNELS[select_kernel(q, kernel)].backward(
        dout, q, k, v, out, lse, causal, softmax_scale
    )


def merge_block_(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """Fold one block's result into the running ``out`` ``[s, b, h, d]`` / ``lse`` ``[s, b, h]``
    (both fp32, updated in place; views such as row slices are fine).

    The exact softmax merge is ``lse' = log(e^lse + e^lse_b)`` and
    ``out' = (e^lse out + e^lse_b out_b) / e^lse'``. Written with sigmoids of LSE differences it
    never exponentiates a large number: ``out' = out + sigmoid(lse_b - lse) (out_b - out)``, one
    ``lerp`` pass over the output, and ``lse' = lse - logsigmoid(lse - lse_b)``.
    """
    block_lse = block_lse.float()
    out.lerp_(block_out.float(), torch.sigmoid(block_lse - lse).unsqueeze(-1))
    lse.sub_(F.logsigmoid(lse - block_lse))
