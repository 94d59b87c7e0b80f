"""The two helix score strategies as functions, on 2 gloo ranks forming one slice group.

Each rank holds half the dims (rotate-half slicing) of the same heads; gathering the output
slices must give full-head attention computed on one device. Covers what the module tests
don't: several query blocks, decode-shaped queries (sq < sk), GQA, dropout shared by the slice
group, and half precision.
"""

from __future__ import annotations

import torch

from tests.distributed import run_distributed
from tests.reference_attention import reference_attention


def _reference(q, k, v, causal, mask=None, keep=None):
    """Full-head attention ``[s, b, h, d]`` in fp64, optional dropout keep-mask (scaled)."""
    return reference_attention(q, k, v, causal, mask, keep)[0]


def _my_dims(d, rank, m=2):
    from megatron_helix.layout import slice_dims

    return slice_dims(d, m, rank, "rotate_half")


def _cases(rank, world_size):
    import torch.distributed as dist

    from megatron_helix.attention.redistribute import redistribute_attention
    from megatron_helix.attention.score_allreduce import _dropout_keep, score_allreduce_attention

    group = dist.group.WORLD
    results = []

    def slices(*tensors, dims):
        return [t[..., dims].contiguous().requires_grad_(True) for t in tensors]

    def gather_dims(x, dims, d):
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        full = torch.empty(*x.shape[:-1], d, dtype=x.dtype)
        for r, part in enumerate(parts):
            full[..., _my_dims(d, r)] = part
        return full

    # fp32: several query blocks, GQA, causal and padding, decode shape; both strategies.
    torch.manual_seed(0)
    s, b, h, g, d = 16, 2, 4, 2, 8
    dims = _my_dims(d, rank)
    for causal, sq, strategy in [(True, 16, "allreduce"), (False, 16, "allreduce"),
                                 (True, 1, "allreduce"), (True, 16, "redistribute"),
                                 (False, 16, "redistribute")]:
        q, k, v = torch.randn(sq, b, h, d), torch.randn(s, b, g, d), torch.randn(s, b, g, d)
        dout = torch.randn(sq, b, h, d)
        mask = None if causal else (torch.rand(b, 1, sq, s) < 0.3)
        if mask is not None:
            mask[..., 0] = False  # keep at least one key per row
        ql, kl, vl = slices(q, k, v, dims=dims)
        if strategy == "allreduce":
            out = score_allreduce_attention(ql, kl, vl, group, causal=causal, attention_mask=mask,
                                            softmax_scale=d ** -0.5, query_block_size=3)
        else:
            out = redistribute_attention(ql, kl, vl, group, causal, d ** -0.5, mask)
        out.backward(dout[..., dims])
        qr, kr, vr = (t.double().requires_grad_(True) for t in (q, k, v))
        ref = _reference(qr, kr, vr, causal, mask)
        ref.backward(dout.double())
        for name, got, want in [("out", out, ref), ("dq", ql.grad, qr.grad),
                                ("dk", kl.grad, kr.grad), ("dv", vl.grad, vr.grad)]:
            torch.testing.assert_close(got.double(), want[..., dims], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{strategy} causal={causal} sq={sq} {name}: {m}")
        results.append(f"{strategy} causal={causal} sq={sq}")

    # Dropout: every slice rank applies the same mask, forward and backward (replayed).
    q, k, v = torch.randn(s, b, h, d), torch.randn(s, b, g, d), torch.randn(s, b, g, d)
    dout = torch.randn(s, b, h, d)
    ql, kl, vl = slices(q, k, v, dims=dims)
    generator = torch.Generator().manual_seed(99)
    out = score_allreduce_attention(ql, kl, vl, group, causal=True, softmax_scale=d ** -0.5,
                                    dropout_p=0.3, generator=generator, query_block_size=s)
    out.backward(dout[..., dims])
    keep = _dropout_keep((b, g, h // g, s, s), 0.3, torch.Generator().manual_seed(99), "cpu")
    keep = keep.reshape(b, h, s, s)
    qr, kr, vr = (t.double().requires_grad_(True) for t in (q, k, v))
    ref = _reference(qr, kr, vr, True, keep=keep)
    ref.backward(dout.double())
    full_out = gather_dims(out.detach(), dims, d)
    torch.testing.assert_close(full_out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ql.grad.double(), qr.grad[..., dims], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.grad.double(), kr.grad[..., dims], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref, _reference(q, k, v, True)), "dropout must change the output"
    results.append("dropout")

    # Half precision: within the dtype's rounding of the fp64 result.
    for dtype, tol in [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)]:
        q, k, v = (torch.randn(s, b, h, d).to(dtype) for _ in range(3))
        for strategy in ("allreduce", "redistribute"):
            ql, kl, vl = slices(q, k, v, dims=dims)
            if strategy == "allreduce":
                out = score_allreduce_attention(ql, kl, vl, group, causal=True,
                                                softmax_scale=d ** -0.5)
            else:
                out = redistribute_attention(ql, kl, vl, group, True, d ** -0.5)
            assert out.dtype == dtype
            ref = _reference(q, k, v, True)[..., dims]
            err = (out.double() - ref).norm() / ref.norm()
            assert err < tol, f"{dtype} {strategy}: relative error {err:.2e}"
            results.append(f"{dtype} {strategy}")
    return results


def test_strategies_match_full_head_attention():
    results = run_distributed(_cases, 2)
    assert len(results[0]) == 10
