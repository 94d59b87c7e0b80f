"""Choosing the ring's block kernel, and the flash-attn and cuDNN kernels' glue.

flash-attn runs on CUDA only, so on CPU its glue (layout views, argument order, LSE layout,
gradients written in place) is checked against a stand-in with flash-attn's documented contract
(``[b, s, h, d]`` in, ``[b, h, s]`` fp32 LSE out, dq/dk/dv filled in place) built from torch's CPU
flash ops. The same comparisons run on the real flash-attn where it and CUDA are present.

The cuDNN kernel's glue is checked the same way against a stand-in for the two aten ops: exact
fp64 attention with their schemas, the shapes torch's meta kernels give (``[b, h, s, d]`` out,
``[b, h, s, 1]`` fp32 LSE), GQA k/v un-expanded, top-left causal, and a backward computed from
the out and LSE it is handed. The CUDA tests run the real ops against fp32 attention.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_helix.attention import block_kernel, block_kernel_cudnn, block_kernel_flash_attn
from megatron_helix.attention.block_kernel import (
    auto_order,
    block_attention_backward,
    block_attention_forward,
    select_kernel,
)
from megatron_helix.attention.ring_attention import backward_step, forward_step, ring_attention
from megatron_helix.attention.zigzag import zigzag_block, zigzag_shard, zigzag_unshard
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


def _assert_block_kernel_exact(kernel, q, k, v, dout, causal, tol):
    """One block forward + backward through ``kernel`` equals the fp64 reference within
    ``tol``; ``dout`` goes in with strides unlike the output's, as autograd may hand it."""
    dout = dout.transpose(0, 1).contiguous().transpose(0, 1)
    out, lse = block_attention_forward(q, k, v, causal, HEAD_DIM ** -0.5, kernel)
    grads = block_attention_backward(dout, q, k, v, out, lse, causal, HEAD_DIM ** -0.5, kernel)
    ref_out, ref_lse, ref_grads = reference_with_grads(q, k, v, dout, causal)
    torch.testing.assert_close(out.float(), ref_out, **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want, **tol)


@pytest.mark.parametrize("causal,heads,groups", CASES)
def test_flash_attn_glue_matchesreference_with_grads(flash_attn_on_cpu, causal, heads, groups):
    _assert_block_kernel_exact("flash_attn", *attention_inputs(10, 10, heads, groups), causal,
                               FP32_TOL)
    assert flash_attn_on_cpu.calls == ["forward", "backward"]


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
    _assert_block_kernel_exact("flash_attn", q, k, v, dout, causal, BF16_TOL)


# ---------------------------------------------------------------- the cudnn kernel


class _CudnnAttentionContract:
    """``aten._scaled_dot_product_cudnn_attention`` (+ ``_backward``) as torch 2.13 states them,
    computed exactly in fp64 on CPU; outputs shaped as the ops' meta kernels shape them."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def _probs(q, k, lse, causal, scale):
        """exp(scale q k^T - lse) ``[b, h, sq, sk]`` in fp64, GQA k broadcast to q's heads."""
        k = k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
        scores = q.double() @ k.transpose(-1, -2) * scale
        if causal:  # top-left: query i sees keys 0..i
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1),
                                        float("-inf"))
        lse = scores.logsumexp(-1, keepdim=True) if lse is None else lse.double()
        return (scores - lse).exp(), lse

    @staticmethod
    def _check_bhsd(*tensors):
        for x in tensors:
            assert x.dim() == 4 and x.stride(-1) == 1, "cuDNN attention takes [b, h, s, d]"

    def _scaled_dot_product_cudnn_attention(self, q, k, v, attn_bias, compute_log_sumexp,
                                            dropout_p=0.0, is_causal=False,
                                            return_debug_mask=False, *, scale=None):
        self._check_bhsd(q, k, v)
        assert (attn_bias, compute_log_sumexp, dropout_p, return_debug_mask) == \
            (None, True, 0.0, False)
        self.calls.append("forward")
        probs, lse = self._probs(q, k, None, is_causal, scale)
        groups = q.shape[1] // k.shape[1]
        out = (probs @ v.double().repeat_interleave(groups, 1)).to(q.dtype)
        seed = offset = torch.zeros((), dtype=torch.int64)
        result = (out, lse.float(), None, None, q.shape[2], k.shape[2], seed, offset, None)
        meta = torch.ops.aten._scaled_dot_product_cudnn_attention(
            *(x.to("meta") for x in (q, k, v)), None, True, 0.0, is_causal, False, scale=scale)
        for got, want in zip(result, meta):
            if isinstance(want, torch.Tensor):
                assert (got.shape, got.dtype) == (want.shape, want.dtype)
        return result

    def _scaled_dot_product_cudnn_attention_backward(
            self, dout, q, k, v, out, lse, philox_seed, philox_offset, attn_bias, cum_seq_q,
            cum_seq_k, max_q, max_k, dropout_p, is_causal, *, scale=None):
        self._check_bhsd(dout, q, k, v, out)
        assert dout.stride() == out.stride(), "cuDNN < 9.5.1 needs grad_out in out's strides"
        assert lse.dtype == torch.float32 and lse.shape == (*q.shape[:3], 1)
        assert (attn_bias, cum_seq_q, cum_seq_k, dropout_p) == (None, None, None, 0.0)
        assert (max_q, max_k) == (q.shape[2], k.shape[2])
        self.calls.append("backward")
        groups = q.shape[1] // k.shape[1]
        probs, _ = self._probs(q, k, lse, is_causal, scale)
        dout, out = dout.double(), out.double()
        dv = probs.transpose(-1, -2) @ dout
        dscores = probs * (dout @ v.double().repeat_interleave(groups, 1).transpose(-1, -2)
                           - (dout * out).sum(-1, keepdim=True))
        dq = dscores @ k.double().repeat_interleave(groups, 1) * scale
        dk = dscores.transpose(-1, -2) @ q.double() * scale

        def reduced(g):  # [b, h, sk, d] -> [b, groups, sk, d]
            return g.unflatten(1, (k.shape[1], groups)).sum(2).to(k.dtype)

        return dq.to(q.dtype), reduced(dk), reduced(dv)


@pytest.fixture
def cudnn_on_cpu(monkeypatch):
    """Route the ``cudnn`` kernel to the CPU stand-in."""
    contract = _CudnnAttentionContract()
    monkeypatch.setattr(block_kernel_cudnn, "_ops", contract)
    monkeypatch.setattr(block_kernel_cudnn, "unsupported_reason", lambda q: "")
    return contract


CUDNN_CASES = [(*case, 10, 10) for case in CASES] + [(False, 4, 2, 10, 6)]  # + sq != sk


@pytest.mark.parametrize("causal,heads,groups,sq,sk", CUDNN_CASES)
def test_cudnn_glue_matches_reference_with_grads(cudnn_on_cpu, causal, heads, groups, sq, sk):
    _assert_block_kernel_exact("cudnn", *attention_inputs(sq, sk, heads, groups), causal,
                               FP32_TOL)
    assert cudnn_on_cpu.calls == ["forward", "backward"]


def test_cudnn_runs_a_single_key_block_on_the_torch_kernel(cudnn_on_cpu):
    _assert_block_kernel_exact("cudnn", *attention_inputs(4, 1, 4, 2), False, FP32_TOL)
    assert cudnn_on_cpu.calls == []  # cuDNN takes no sk == 1


def test_ring_attention_runs_cudnn_blocks(cudnn_on_cpu):
    q, k, v, dout = attention_inputs(8, 8, 4, 2)
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    out = ring_attention(q, k, v, causal=True, kernel="cudnn")
    out.backward(dout)
    assert cudnn_on_cpu.calls == ["forward", "backward"]
    ref_out, _, ref_grads = reference_with_grads(q, k, v, dout, True)
    torch.testing.assert_close(out, ref_out, **FP32_TOL)
    torch.testing.assert_close((q.grad, k.grad, v.grad), ref_grads, **FP32_TOL)


def _ring_on_one_device(q, k, v, dout, ring_size, kernel):
    """Causal ring attention of ``ring_size`` zigzag ranks, every rank's steps run here in turn
    (the shards' k/v read in place of the messages) -> out, dq, dk, dv, unsharded."""
    def shards(x):
        return [zigzag_shard(x, rank, ring_size) for rank in range(ring_size)]

    kvs = [torch.stack(kv) for kv in zip(shards(k), shards(v))]
    dkvs = [torch.zeros_like(kv, dtype=torch.float32) for kv in kvs]
    outs, dqs = [], []
    for rank, (q_, dout_) in enumerate(zip(shards(q), shards(dout))):
        steps = [(kvs[source], dkvs[source], zigzag_block(rank, source, q_.shape[0], True))
                 for source in ((rank - step) % ring_size for step in range(ring_size))]
        out = lse = None
        for kv, _, block in steps:
            out, lse = forward_step(q_, kv, block, HEAD_DIM ** -0.5, out, lse, kernel)
        outs.append(out.to(q.dtype))
        dqs.append(torch.zeros_like(q_, dtype=torch.float32))
        for kv, dkv, block in steps:
            grads = backward_step(dout_, q_, kv, outs[-1], lse, block, HEAD_DIM ** -0.5, dqs[-1],
                                  kernel)
            for into, grad in zip(dkv, grads):
                into[block.kv_rows].add_(grad)
    return (zigzag_unshard(outs), zigzag_unshard(dqs), zigzag_unshard([d[0] for d in dkvs]),
            zigzag_unshard([d[1] for d in dkvs]))


def test_two_rank_ring_of_cudnn_blocks(cudnn_on_cpu):
    q, k, v, dout = attention_inputs(16, 16, 4, 2)
    got = _ring_on_one_device(q, k, v, dout, 2, "cudnn")
    assert cudnn_on_cpu.calls.count("forward") == 4  # diagonal + one half block per rank
    ref_out, _, ref_grads = reference_with_grads(q, k, v, dout, True)
    torch.testing.assert_close(got, (ref_out, *ref_grads), **FP32_TOL)


def test_cudnn_names_what_it_cannot_run():
    q = torch.zeros(4, 1, 2, 8)
    assert "CUDA only, q is on cpu" in block_kernel_cudnn.unsupported_reason(q)
    with pytest.raises(ValueError, match="'cudnn' cannot run here: cudnn runs on CUDA only"):
        select_kernel(q, "cudnn")
    # the dtype and head-dim checks read only these attributes: CUDA inputs without a GPU
    on_cuda = dict(is_cuda=True, device="cuda:0")
    fp32 = SimpleNamespace(**on_cuda, dtype=torch.float32, shape=(4, 1, 2, 8))
    assert block_kernel_cudnn.unsupported_reason(fp32) == "cudnn takes fp16 or bf16, not " \
        "torch.float32"
    odd_head_dim = SimpleNamespace(**on_cuda, dtype=torch.bfloat16, shape=(4, 1, 2, 12))
    assert "multiple of 8, not 12" in block_kernel_cudnn.unsupported_reason(odd_head_dim)
    with pytest.raises(ValueError, match="dropout runs the 'math' block kernel.*'cudnn'"):
        ring_attention(q, q, q, kernel="cudnn", dropout_p=0.1)


def test_auto_follows_the_preference_order(monkeypatch, cudnn_on_cpu):
    q = torch.zeros(4, 1, 2, 8)
    assert auto_order(q) == ("flash_attn", "torch")  # no measurement has ranked cudnn yet
    assert select_kernel(q, "auto") == "torch"  # on CPU, as before cudnn existed
    monkeypatch.setitem(block_kernel.AUTO_ORDER, None, ("cudnn",))  # as a measurement would
    assert auto_order(q) == ("cudnn", "torch")
    assert select_kernel(q, "auto") == "cudnn"


def _cudnn_runs_here():
    return torch.cuda.is_available() and not block_kernel_cudnn.unsupported_reason(
        torch.empty(1, 1, 1, HEAD_DIM, dtype=torch.bfloat16, device="cuda"))


@pytest.mark.skipif(not _cudnn_runs_here(), reason="needs CUDA with cuDNN attention")
@pytest.mark.parametrize("causal,heads,groups,sq,sk",
                         [(*case, 64, 64) for case in CASES] + [(False, 4, 2, 64, 96)])
def test_cudnn_cuda_matches_fp32_attention(causal, heads, groups, sq, sk):
    q, k, v, dout = (x.cuda() for x in attention_inputs(sq, sk, heads, groups, torch.bfloat16))
    _assert_block_kernel_exact("cudnn", q, k, v, dout, causal, BF16_TOL)


@pytest.mark.skipif(not _cudnn_runs_here(), reason="needs CUDA with cuDNN attention")
def test_ring_attention_cudnn_cuda_matches_fp32_attention():
    q, k, v, dout = (x.cuda() for x in attention_inputs(64, 64, 8, 2, torch.bfloat16))
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    out = ring_attention(q, k, v, causal=True, kernel="cudnn")  # a ring of one rank
    out.backward(dout)
    ref_out, _, ref_grads = reference_with_grads(q, k, v, dout, True)
    two_ranks = _ring_on_one_device(q.detach(), k.detach(), v.detach(), dout, 2, "cudnn")
    for got, want in zip(((out.detach(), q.grad, k.grad, v.grad), two_ranks),
                         ((ref_out, *ref_grads),) * 2):
        for got_x, want_x in zip(got, want):
            torch.testing.assert_close(got_x.float(), want_x, **BF16_TOL)
