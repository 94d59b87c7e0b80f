"""Ring attention equals single-device attention; its pieces are exact on their own.

The reference is plain torch math (scores, mask, softmax, autograd) on the full sequence in
fp64 (``tests/reference_attention.py``). In-process tests cover the block kernel, the LSE merge
and the zigzag layout; one 2-rank and one 4-rank gloo world run every ring case (causal and
not, GQA, 3 heads, bf16, attention dropout against the reference with the same position-keyed
mask), check that sends are posted before each block and waited after it,
that every rank computes the same blocks, and (2 ranks) ``RingDotProductAttention`` under
Megatron's parallel state.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from megatron_helix.attention import ring_attention as ring_module
from megatron_helix.attention.block_kernel import (
    block_attention_backward,
    block_attention_forward,
    merge_block_,
)
from megatron_helix.attention.dropout_mask import draw_seed, keep_mask
from megatron_helix.attention.ring_attention import ring_attention
from megatron_helix.attention.zigzag import (
    zigzag_block,
    zigzag_chunks,
    zigzag_shard,
    zigzag_unshard,
)
from tests.distributed import run_distributed
from tests.reference_attention import (
    BATCH,
    BF16_TOL,
    FP32_TOL,
    HEAD_DIM,
    attention_inputs,
    reference_with_grads,
)

CHUNK = 3
# (causal, heads, kv groups, dtype, kv chunk length)
RING_CASES = [
    (True, 4, 4, torch.float32, CHUNK),
    (False, 4, 4, torch.float32, CHUNK),
    (True, 4, 2, torch.float32, CHUNK),
    (False, 4, 2, torch.float32, CHUNK),
    (True, 3, 3, torch.float32, CHUNK),
    (False, 3, 1, torch.float32, CHUNK),
    (False, 4, 2, torch.float32, CHUNK + 2),  # keys longer than queries (non-causal only)
    (True, 4, 2, torch.bfloat16, CHUNK),
]
# (causal, heads, kv groups): fp32 rings with attention dropout
DROPOUT_CASES = [(True, 4, 2), (False, 3, 3)]
DROPOUT_P, DROPOUT_SEED = 0.25, 5


def _scaled_keep(seed: int, heads: int, sq: int, sk: int) -> torch.Tensor:
    """The full-sequence dropout mask of ``dropout_mask``, scaled by ``1 / (1 - p)``."""
    keep = keep_mask(seed, BATCH, heads, torch.arange(sq), torch.arange(sk), DROPOUT_P)
    return keep / (1 - DROPOUT_P)


@pytest.mark.parametrize("causal", [True, False])
def test_block_kernel_with_dropout_matches_reference_with_grads(causal):
    sk = 10 if causal else 13
    q, k, v, dout = attention_inputs(10, sk, 4, 2)
    keep = keep_mask(7, BATCH, 4, torch.arange(10), torch.arange(sk), DROPOUT_P)
    assert 0.6 < keep.float().mean() < 0.9  # about 1 - p of the entries survive
    out, lse = block_attention_forward(q, k, v, causal, HEAD_DIM ** -0.5, "auto", keep, DROPOUT_P)
    ref_out, ref_lse, ref_grads = reference_with_grads(
        q, k, v, dout, causal, keep=keep / (1 - DROPOUT_P))
    torch.testing.assert_close(out, ref_out, **FP32_TOL)
    torch.testing.assert_close(lse, ref_lse, **FP32_TOL)  # the undropped normalizer
    grads = block_attention_backward(
        dout, q, k, v, out, lse, causal, HEAD_DIM ** -0.5, "auto", keep, DROPOUT_P)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **FP32_TOL)
    assert not torch.allclose(out, reference_with_grads(q, k, v, dout, causal)[0], atol=1e-3)


def test_dropout_masks_depend_on_seed_and_position_only():
    rows, cols = torch.arange(8), torch.arange(8)
    full = keep_mask(3, BATCH, 4, rows, cols, DROPOUT_P)
    assert torch.equal(keep_mask(3, BATCH, 4, rows[5:], cols[:4], DROPOUT_P), full[:, :, 5:, :4])
    assert not torch.equal(keep_mask(4, BATCH, 4, rows, cols, DROPOUT_P), full)


# ---------------------------------------------------------------- block kernel, merge, zigzag


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (3, 1)])
def test_block_kernel_matchesreference_with_grads(causal, heads, groups):
    sk = 10 if causal else 13
    q, k, v, dout = attention_inputs(10, sk, heads, groups)
    out, lse = block_attention_forward(q, k, v, causal, HEAD_DIM ** -0.5)
    ref_out, ref_lse, ref_grads = reference_with_grads(q, k, v, dout, causal)
    torch.testing.assert_close(out, ref_out, **FP32_TOL)
    torch.testing.assert_close(lse, ref_lse, **FP32_TOL)
    grads = block_attention_backward(dout, q, k, v, out, lse, causal, HEAD_DIM ** -0.5)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]  # dk, dv un-expanded
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **FP32_TOL)


def test_block_kernel_refuses_bad_shapes():
    q, k, v, _ = attention_inputs(6, 8, 4, 2)
    with pytest.raises(ValueError, match="diagonal block"):
        block_attention_forward(q, k, v, True, 1.0)
    with pytest.raises(ValueError, match="groups must divide heads"):
        block_attention_forward(q[:, :, :3], k, v, False, 1.0)
    with pytest.raises(ValueError, match="at least one"):
        block_attention_forward(q[:0], k, v, False, 1.0)  # the CPU op would crash (SIGFPE)
    with pytest.raises(ValueError, match="same shape"):
        block_attention_forward(q, k, v[:4], False, 1.0)


def test_merge_equals_attention_over_the_union_of_blocks():
    q, k, v, _ = attention_inputs(7, 12, 4, 2)
    out, lse = block_attention_forward(q, k[:5], v[:5], False, 0.5)
    out = out.float()
    block_out, block_lse = block_attention_forward(q, k[5:], v[5:], False, 0.5)
    merge_block_(out, lse, block_out, block_lse)
    whole_out, whole_lse = block_attention_forward(q, k, v, False, 0.5)
    torch.testing.assert_close(out, whole_out, **FP32_TOL)
    torch.testing.assert_close(lse, whole_lse, **FP32_TOL)


def test_merge_does_not_overflow():
    """exp(1000) is inf in fp32: the merge must work on LSE differences only."""
    out, block_out = torch.zeros(1, 1, 1, 2), torch.ones(1, 1, 1, 2)
    lse, block_lse = torch.full((1, 1, 1), 1000.0), torch.full((1, 1, 1), 1001.0)
    merge_block_(out, lse, block_out, block_lse)
    weight = 1 / (1 + math.exp(-1))  # e^1001 / (e^1000 + e^1001)
    torch.testing.assert_close(out, torch.full((1, 1, 1, 2), weight))
    torch.testing.assert_close(lse, torch.full((1, 1, 1), 1001 + math.log1p(math.exp(-1))))


@pytest.mark.parametrize("ring_size", [1, 2, 3, 4])
@pytest.mark.parametrize("dim", [0, 1])
def test_zigzag_round_trip(ring_size, dim):
    shape = [3, 3]
    shape[dim] = 2 * ring_size * 5
    full = torch.arange(shape[0] * shape[1]).reshape(shape)
    shards = [zigzag_shard(full, r, ring_size, dim) for r in range(ring_size)]
    assert all(s.shape[dim] == full.shape[dim] // ring_size for s in shards)
    first = zigzag_shard(torch.arange(4 * ring_size), 0, ring_size)
    assert first.tolist() == [0, 1, 4 * ring_size - 2, 4 * ring_size - 1]  # chunks 0 and 2R-1
    assert torch.equal(zigzag_unshard(shards, dim), full)


def test_zigzag_refuses_indivisible_lengths():
    with pytest.raises(ValueError, match="not divisible by 8.*nearest valid lengths: 16 and 24"):
        zigzag_shard(torch.zeros(20, 3), 0, 4)
    with pytest.raises(ValueError, match="two equal chunks"):
        zigzag_unshard([torch.zeros(3), torch.zeros(3)])


@pytest.mark.parametrize("ring_size", [1, 2, 3, 4])
def test_zigzag_blocks_cover_exactly_the_causal_mask(ring_size):
    """The blocks the ring computes are the visible pairs, each once, equal work per rank."""
    chunk, local = 2, 4
    seq = 2 * ring_size * chunk
    positions = [zigzag_shard(torch.arange(seq), r, ring_size) for r in range(ring_size)]
    covered = torch.zeros(seq, seq, dtype=torch.int64)
    for rank in range(ring_size):
        starts = [c * chunk for c in zigzag_chunks(rank, ring_size)]
        assert positions[rank].tolist()[::chunk] == starts
        for step in range(ring_size):
            source = (rank - step) % ring_size
            block = zigzag_block(rank, source, local, causal=True)
            rows, cols = positions[rank][block.q_rows], positions[source][block.kv_rows]
            visible = torch.ones(len(rows), len(cols), dtype=torch.int64)
            covered[rows[:, None], cols[None, :]] += visible.tril() if block.causal else visible
            assert block.causal == (step == 0)
            if step:
                assert len(rows) * len(cols) == local * chunk  # half a shard x a shard
    assert torch.equal(covered, torch.ones(seq, seq, dtype=torch.int64).tril())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal", [True, False])
def test_block_kernel_cuda_bf16_gqa(causal):
    q, k, v, dout = (x.cuda() for x in attention_inputs(64, 64, 8, 2, torch.bfloat16))
    out, lse = block_attention_forward(q, k, v, causal, HEAD_DIM ** -0.5, "torch")
    ref_out, ref_lse, ref_grads = reference_with_grads(q, k, v, dout, causal)
    torch.testing.assert_close(out.float(), ref_out, **BF16_TOL)
    torch.testing.assert_close(lse, ref_lse, **BF16_TOL)
    grads = block_attention_backward(dout, q, k, v, out, lse, causal, HEAD_DIM ** -0.5, "torch")
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want, **BF16_TOL)


# ---------------------------------------------------------------- ring worlds (gloo ranks)


def _ring_cases(rank, world):
    """Every RING_CASES entry on this rank's zigzag shards -> (out, dq, dk, dv) shards."""
    results = []
    for causal, heads, groups, dtype, kv_chunk in RING_CASES:
        full = attention_inputs(2 * world * CHUNK, 2 * world * kv_chunk, heads, groups, dtype)
        q, k, v, dout = (zigzag_shard(x, rank, world) for x in full)
        q, k, v = (x.requires_grad_(True) for x in (q, k, v))
        out = ring_attention(q, k, v, causal, group=dist.group.WORLD)
        out.backward(dout)
        results.append((out.detach(), q.grad, k.grad, v.grad))
    for causal, heads, groups in DROPOUT_CASES:
        full = attention_inputs(2 * world * CHUNK, 2 * world * CHUNK, heads, groups)
        q, k, v, dout = (zigzag_shard(x, rank, world) for x in full)
        q, k, v = (x.requires_grad_(True) for x in (q, k, v))
        torch.manual_seed(DROPOUT_SEED)  # every rank draws the same mask seed
        out = ring_attention(q, k, v, causal, group=dist.group.WORLD, dropout_p=DROPOUT_P)
        out.backward(dout)
        results.append((out.detach(), q.grad, k.grad, v.grad))
    return results


def _trace(rank, world):
    """The order of posts, block computes and waits in one causal GQA forward + backward."""
    events, shapes = [], []

    def logged(name, kernel, q_index, causal_index):  # where q and causal are in its arguments
        def run(*args):
            q, k, causal = args[q_index], args[q_index + 1], args[causal_index]
            events.append(name)
            shapes.append((name, q.shape[0], k.shape[0], causal))
            return kernel(*args)
        return run

    def logged_post(ops):
        events.append("post")
        return batch_isend_irecv(ops)

    def logged_wait(transfer):
        events.append("wait")
        return saved[2](transfer)

    batch_isend_irecv = dist.batch_isend_irecv
    saved = (ring_module.block_attention_forward, ring_module.block_attention_backward,
             ring_module._Transfer.wait)
    ring_module.block_attention_forward = logged("fwd", saved[0], 0, 3)
    ring_module.block_attention_backward = logged("bwd", saved[1], 1, 6)
    ring_module._Transfer.wait = logged_wait
    dist.batch_isend_irecv = logged_post
    try:
        q, k, v, dout = (zigzag_shard(x, rank, world) for x in attention_inputs(
            2 * world * CHUNK, 2 * world * CHUNK, 4, 2))
        q.requires_grad_(True)
        ring_attention(q, k, v, True, group=dist.group.WORLD).backward(dout)
    finally:
        (ring_module.block_attention_forward, ring_module.block_attention_backward,
         ring_module._Transfer.wait) = saved
        dist.batch_isend_irecv = batch_isend_irecv
    return events, shapes


def _module_checks(rank, world):
    """RingDotProductAttention under Megatron's parallel state: CP=2, then CP=1."""
    from megatron.core import parallel_state
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_helix import compat
    from megatron_helix.attention.ring_core_attention import RingDotProductAttention
    from megatron_helix.cpu import enable_cpu_execution

    enable_cpu_execution()
    seq, results = 2 * world * CHUNK, {}

    def config(cp):
        return TransformerConfig(
            num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
            context_parallel_size=cp, attention_dropout=0.0,
        )

    def attention(cp, mask_type=AttnMaskType.causal, **kwargs):
        return RingDotProductAttention(config(cp), 1, mask_type, "self", **kwargs)

    parallel_state.initialize_model_parallel(context_parallel_size=world)
    tokens = torch.arange(seq).repeat(BATCH, 1)  # [b, s], as Megatron's batches are
    results["megatron_split"] = torch.equal(
        compat.get_batch_on_this_cp_rank({"tokens": tokens.clone()})["tokens"],
        zigzag_shard(tokens, rank, world, dim=1),
    )
    full = attention_inputs(seq, seq, 4, 2, head_dim=16)
    q, k, v, dout = (zigzag_shard(x, rank, world) for x in full)
    # Megatron's fused QKV output [s, b, groups, (heads/groups + 2) * d], split into strided views
    mixed = torch.cat((q.reshape(*q.shape[:2], 2, 32), k, v), dim=-1).requires_grad_(True)
    query, key, value = mixed.split([32, 16, 16], dim=-1)
    query = query.reshape(q.shape)
    out = attention(world)(query, key, value, attention_mask=None)
    out.backward(dout.flatten(2))
    dq, dk, dv = mixed.grad.split([32, 16, 16], dim=-1)
    results["cp"] = (out.detach(), dq.reshape(q.shape), dk, dv)
    with torch.no_grad():
        results["eval_with_dropout"] = torch.equal(
            attention(world, attention_dropout=0.1).eval()(query, key, value, None), out
        )
    refusals = [
        (lambda: attention(world)(q, k, v, None, packed_seq_params=object()), "packed sequences"),
        (lambda: attention(world, AttnMaskType.padding)(
            q, k, v, torch.zeros(BATCH, 1, seq // world, seq, dtype=torch.bool)), "padding"),
        (lambda: attention(world, cp_comm_type="a2a"), "cp_comm_type 'a2a'"),
        (lambda: attention(world, block_kernel="fast"), "unknown block kernel 'fast'"),
        (lambda: attention(world, block_kernel="flash_attn")(q, k, v, None), "cannot run here"),
    ]
    for call, match in refusals:
        with pytest.raises((NotImplementedError, ValueError), match=match):
            call()

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(context_parallel_size=1)
    q, k, v, _ = attention_inputs(seq, seq, 4, 2, head_dim=16)
    mask = torch.zeros(BATCH, 1, seq, seq, dtype=torch.bool)
    mask[1, :, :, seq - 3:] = True  # the last three keys of sample 1 are padding
    with torch.no_grad():
        results["cp1_causal"] = attention(1)(q, k, v, None)
        results["cp1_padding"] = attention(1, AttnMaskType.padding)(q, k, v, mask)
    parallel_state.destroy_model_parallel()
    return results


def _ring_world(rank, world):
    results = {"ring": _ring_cases(rank, world), "trace": _trace(rank, world)}
    if world == 2:
        results["module"] = _module_checks(rank, world)
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=lambda r: f"R{r}")
def ring_world(request):
    return request.param, run_distributed(_ring_world, request.param)


def test_ring_matches_single_device_attention(ring_world):
    world, results = ring_world
    for i, (causal, heads, groups, dtype, kv_chunk) in enumerate(RING_CASES):
        full = attention_inputs(2 * world * CHUNK, 2 * world * kv_chunk, heads, groups, dtype)
        want_out, _, (want_dq, want_dk, want_dv) = reference_with_grads(*full, causal)
        tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
        for j, want in enumerate((want_out, want_dq, want_dk, want_dv)):
            got = zigzag_unshard([rank_results["ring"][i][j] for rank_results in results])
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), want, **tol, msg=lambda m: (
                f"case {RING_CASES[i]}, {'out dq dk dv'.split()[j]}: {m}"))


def test_ring_with_dropout_drops_what_one_device_drops(ring_world):
    """The ring's masks are keyed by global position: the fp64 reference with the same full
    mask gives the same output and gradients at every ring size."""
    world, results = ring_world
    torch.manual_seed(DROPOUT_SEED)
    seed = draw_seed(torch.device("cpu"))
    for i, (causal, heads, groups) in enumerate(DROPOUT_CASES, start=len(RING_CASES)):
        seq = 2 * world * CHUNK
        full = attention_inputs(seq, seq, heads, groups)
        keep = _scaled_keep(seed, heads, seq, seq)
        want_out, _, want_grads = reference_with_grads(*full, causal, keep=keep)
        for j, want in enumerate((want_out, *want_grads)):
            got = zigzag_unshard([rank_results["ring"][i][j] for rank_results in results])
            torch.testing.assert_close(got, want, **FP32_TOL)


def _expected_events(world):
    """Forward: post the next shard, compute, then wait. Backward: post k/v, compute, wait for
    the travelling dk/dv accumulator (in flight during the compute), pass it on, wait k/v."""
    events = []
    for step in range(world):
        more = step + 1 < world
        events += ["post"] * more + ["fwd"] + ["wait"] * more
    for step in range(world):
        more = step + 1 < world
        events += ["post"] * more + ["bwd"] + ["wait"] * (step > 0) + ["post"] + ["wait"] * more
    return events + ["wait"]


def test_ring_overlaps_and_balances_causal_work(ring_world):
    world, results = ring_world
    chunk, local = CHUNK, 2 * CHUNK
    for events, shapes in (r["trace"] for r in results):
        assert events == _expected_events(world)
        for name in ("fwd", "bwd"):
            blocks = [shape[1:] for shape in shapes if shape[0] == name]
            assert blocks[0] == (local, local, True)  # the diagonal
            assert all(sq * sk == local * chunk and not causal for sq, sk, causal in blocks[1:])


def test_ring_core_attention_module(ring_world):
    world, results = ring_world
    if world != 2:
        pytest.skip("the module runs in the 2-rank world")
    module = [r["module"] for r in results]
    seq = 2 * world * CHUNK
    full = attention_inputs(seq, seq, 4, 2, head_dim=16)
    want_out, _, want_grads = reference_with_grads(*full, causal=True)
    assert all(m["megatron_split"] and m["eval_with_dropout"] for m in module)
    got = [zigzag_unshard([m["cp"][j] for m in module]) for j in range(4)]
    torch.testing.assert_close(got[0], want_out.flatten(2), **FP32_TOL)
    for g, want in zip(got[1:], want_grads):
        torch.testing.assert_close(g, want, **FP32_TOL)
    torch.testing.assert_close(module[0]["cp1_causal"], want_out.flatten(2), **FP32_TOL)
    mask = torch.zeros(BATCH, 1, seq, seq, dtype=torch.bool)
    mask[1, :, :, seq - 3:] = True
    want_padded = reference_with_grads(*full, causal=False, mask=mask)[0]
    torch.testing.assert_close(module[0]["cp1_padding"], want_padded.flatten(2), **FP32_TOL)
