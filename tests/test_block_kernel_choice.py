"""Choosing the ring's block kernel, and the flash-attn kernel's glue.

flash-attn runs on CUDA only, so on CPU its glue (layout views, argument order, LSE layout,
gradients written in place) is checked against a stand-in with flash-attn's documented contract
(``[b, s, h, d]`` in, ``[b, h, s]`` fp32 LSE out, dq/dk/dv filled in place) built from torch's CPU
flash ops. The same comparisons run on the real flash-attn where it and CUDA are present.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_helix.attention import block_kernel_flash_attn
from megatron_helix.attention.block_kernel import (
    block_attention_backward,
    block_attention_forward,
    select_kernel,
)
from megatron_helix.attention.ring_attention import ring_attention
from tests.reference_attention import (
    BF16_TOL,
    FP32_TOL,
    HEAD_DIM,
    attention_inputs,
    reference_with_grads,
)

CASES = [(True, 4, 4), (False, 4, 2), (True, 4, 1)]  # (causal, heads, kv groups)


class _FlashAttnContract:
    """flash_attn.flash_attn_interface's two ops, as documented, computed by torch on CPU."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def _check_bshd(*tensors):
        for x in tensors:
            assert x.dim() == 4 and x.stride(-1) == 1, "flash-attn takes [b, s, h, d]"

    def _flash_attn_forward(self, q, k, v, dropout_p, softmax_scale, causal, window_left,
                            window_right, softcap, alibi_slopes, return_softmax):
        self._check_bshd(q, k, v)
        assert (dropout_p, window_left, window_right, softcap, alibi_slopes, return_softmax) == \
            (0.0, -1, -1, 0.0, None, False)
        self.calls.append("forward")
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal,
            scale=softmax_scale,
        )
        return out.transpose(1, 2), lse, None, None  # out [b, s, h, d], lse [b, h, s]

    def _flash_attn_backward(self, dout, q, k, v, out, lse, dq, dk, dv, dropout_p,
                             softmax_scale, causal, window_left, window_right, softcap,
                             alibi_slopes, deterministic, rng_state=None):
        self._check_bshd(dout, q, k, v, out, dq, dk, dv)
        assert lse.is_contiguous() and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
        assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
        assert (dropout_p, window_left, window_right, softcap, alibi_slopes, deterministic) == \
            (0.0, -1, -1, 0.0, None, False)
        self.calls.append("backward")
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *(x.transpose(1, 2) for x in (dout, q, k, v, out)), lse, 0.0, causal,
            scale=softmax_scale,
        )
        for into, grad in zip((dq, dk, dv), grads):
            into.copy_(grad.transpose(1, 2))
        return torch.empty(q.shape[0], q.shape[2], q.shape[1])


@pytest.fixture
def flash_attn_on_cpu(monkeypatch):
    """Route the ``flash_attn`` kernel to the CPU stand-in."""
    contract = _FlashAttnContract()
    monkeypatch.setattr(block_kernel_flash_attn, "_load", lambda: (contract, ""))
    monkeypatch.setattr(block_kernel_flash_attn, "unsupported_reason", lambda q: "")
    return contract


@pytest.mark.parametrize("causal,heads,groups", CASES)
def test_flash_attn_glue_matchesreference_with_grads(flash_attn_on_cpu, causal, heads, groups):
    q, k, v, dout = attention_inputs(10, 10, heads, groups)
    dout = dout.transpose(0, 1).contiguous().transpose(0, 1)  # autograd may hand any strides
    out, lse = block_attention_forward(q, k, v, causal, HEAD_DIM ** -0.5, "flash_attn")
    grads = block_attention_backward(dout, q, k, v, out, lse, causal, HEAD_DIM ** -0.5,
                                     "flash_attn")
    assert flash_attn_on_cpu.calls == ["forward", "backward"]
    ref_out, ref_lse, ref_grads = reference_with_grads(q, k, v, dout, causal)
    torch.testing.assert_close(out, ref_out, **FP32_TOL)
    torch.testing.assert_close(lse, ref_lse, **FP32_TOL)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **FP32_TOL)


def test_ring_attention_passes_the_kernel_to_every_block(flash_attn_on_cpu):
    q, k, v, dout = attention_inputs(8, 8, 4, 2)
    q.requires_grad_(True)
    ring_attention(q, k, v, causal=True, kernel="flash_attn").backward(dout)
    assert flash_attn_on_cpu.calls == ["forward", "backward"]


def test_kernel_selection_explains_refusals():
    q = torch.zeros(4, 1, 2, 8)
    assert select_kernel(q, "auto") == "torch"
    assert select_kernel(q, "torch") == "torch"
    with pytest.raises(ValueError, match="unknown block kernel 'flash'.*'flash_attn'"):
        select_kernel(q, "flash")
    with pytest.raises(ValueError, match="'flash_attn' cannot run here: flash_attn"):
        select_kernel(q, "flash_attn")
    with pytest.raises(ValueError, match="cannot run here"):
        ring_attention(q, q, q, kernel="flash_attn")
    # selection reads only these attributes: a CUDA fp32 q without needing a GPU
    fp32_on_cuda = SimpleNamespace(is_cuda=True, device="cuda:0", dtype=torch.float32,
                                   shape=(4, 1, 2, 8))
    for name in ("auto", "torch"):
        with pytest.raises(TypeError, match="fp16 or bf16"):
            select_kernel(fp32_on_cuda, name)


def test_flash_attn_names_what_it_cannot_run():
    installed = block_kernel_flash_attn._load()[0] is not None
    reason = block_kernel_flash_attn.unsupported_reason(torch.zeros(4, 1, 2, 8))
    assert ("CUDA only" if installed else "pip install flash-attn") in reason


@pytest.mark.skipif(
    not torch.cuda.is_available() or block_kernel_flash_attn._load()[0] is None,
    reason="needs CUDA and flash-attn >= 2.7",
)
@pytest.mark.parametrize("causal,heads,groups", CASES)
def test_flash_attn_cuda_matches_torch_kernel(causal, heads, groups):
    q, k, v, dout = (x.cuda() for x in attention_inputs(64, 64, heads, groups, torch.bfloat16))
    assert select_kernel(q, "auto") == "flash_attn"
    out, lse = block_attention_forward(q, k, v, causal, HEAD_DIM ** -0.5, "flash_attn")
    grads = block_attention_backward(dout, q, k, v, out, lse, causal, HEAD_DIM ** -0.5,
                                     "flash_attn")
    ref_out, ref_lse, ref_grads = reference_with_grads(q, k, v, dout, causal)
    torch.testing.assert_close(out.float(), ref_out, **BF16_TOL)
    torch.testing.assert_close(lse, ref_lse, **BF16_TOL)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want, **BF16_TOL)
