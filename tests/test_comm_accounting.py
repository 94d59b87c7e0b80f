"""Bytes counted on the wire equal the closed-form formulas, byte for byte.

One spawned 4-rank gloo world runs, under a ``CommCounter``, one forward + backward of a real
Megatron transformer layer per layout (Megatron TP with and without sequence parallelism, helix
2 x 2 with each score strategy, ring R=4, ring R=2 x helix 2 x 1), one training step of a
4-stage pipeline, and each ``torch.distributed`` call once. The counter prices the c10d ops the
backend is handed by its own rules (``comm_counter``'s table); ``comm_formulas`` prices the same
traffic in closed form. The two are compared per rank and group, and a formula changed by one
term makes the comparison fail. These are byte counts, not timings.
"""

from __future__ import annotations

import pytest

from tests.distributed import run_distributed

B, S, HEADS, GROUPS, HEAD_DIM = 2, 64, 8, 4, 16
HIDDEN = HEADS * HEAD_DIM
FP32 = 4
BLOCK = 24  # the score all-reduce's query block, small enough to exercise the causal blocks
MICRO_BATCHES = 3

# comm_formulas' names, each with one term changed as a slip would change it: name -> (a case
# it prices, a function from the correct value to the changed one).
ONE_TERM_OFF = {
    "all_reduce_sent": ("tp4", lambda f: lambda n, m: (m - 1) * n // m),  # one ring phase of two
    "all_gather_sent": ("tp4_sp", lambda f: lambda shard, m: m * shard),  # own shard sent too
    "reduce_scatter_sent": ("tp4_sp", lambda f: lambda shard, m: m * shard),  # own shard too
    "all_to_all_sent": ("ring2_helix2x1", lambda f: lambda n, m: n),  # own slot sent too
    "FP32_BYTES": ("ring4", lambda f: 2),  # the ring's gradient accumulators at half width
    "allreduce_bytes_sent": (  # causal query blocks priced past the diagonal
        "helix_allreduce", lambda f: lambda shape, backward, causal, block: f(
            shape, backward, False, block)),
    "redistribute_bytes_sent": (  # the backward pass left out
        "helix_redistribute", lambda f: lambda shape, backward: f(shape, False)),
    "pipeline_p2p_bytes": (  # the gradients sent back left out
        "pipeline", lambda f: lambda act, stage, stages, micro_batches: f(
            act, stage, stages, micro_batches, backward=False)),
}


def _layer(spec, tp, cp, sequence_parallel):
    import torch
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    model_parallel_cuda_manual_seed(7, inference_rng_tracker=True)
    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS,
        tensor_model_parallel_size=tp, context_parallel_size=cp,
        sequence_parallel=sequence_parallel, use_cpu_initialization=True,
        params_dtype=torch.float32, attention_dropout=0.0, hidden_dropout=0.0,
    )
    return build_module(spec, config=config, layer_number=1)


def _count_layer(layer, local_tokens):
    """Forward + backward of one layer on ``[local_tokens, B, HIDDEN]``; the counter."""
    import torch

    from megatron_helix.perf.comm_counter import CommCounter

    x = torch.randn(local_tokens, B, HIDDEN, requires_grad=True)
    with CommCounter() as counter:
        out, _ = layer(x, attention_mask=None)
        out.sum().backward()
    return counter


def _summary(counter, p2p=None):
    """``{group: (bytes sent, bytes received)}`` of a counter, optionally p2p only."""
    groups = {key.group for key in counter.tallies if counter.calls(group=key.group, p2p=p2p)}
    return {g: (counter.bytes_sent(group=g, p2p=p2p), counter.bytes_received(group=g, p2p=p2p))
            for g in groups}


def _layer_cases(rank):
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_helix import parallel_state as helix_state
    from megatron_helix.specs import get_gpt_layer_helix_spec

    results = {}

    def run(name, m, n, ring, spec, sequence_parallel=False, block=None):
        helix_state.initialize_helix(m, n, ring_size=ring)
        helix_state.helix_manual_seed(7)
        try:
            layer = _layer(spec, m * n, ring, sequence_parallel)
            if block is not None:
                layer.self_attention.core_attention.query_block_size = block
            tokens = S // ring // (m * n if sequence_parallel else 1)
            results[name] = _summary(_count_layer(layer, tokens))
        finally:
            mpu.destroy_model_parallel()
            helix_state.destroy_helix()

    run("tp4", 1, 4, 1, get_gpt_layer_local_spec())
    run("tp4_sp", 1, 4, 1, get_gpt_layer_local_spec(), sequence_parallel=True)
    run("helix_allreduce", 2, 2, 1, get_gpt_layer_helix_spec(score_strategy="allreduce"),
        block=BLOCK)
    run("helix_redistribute", 2, 2, 1, get_gpt_layer_helix_spec(score_strategy="redistribute"))
    run("ring4", 1, 1, 4, get_gpt_layer_helix_spec(ring=True))
    run("ring2_helix2x1", 2, 1, 2, get_gpt_layer_helix_spec(ring=True))
    return results


def _pipeline_case(rank):
    from megatron_helix.perf.comm_counter import CommCounter
    from megatron_helix.trainer import build_parser, train

    argv = ["--num-layers", "4", "--hidden-size", str(HIDDEN), "--num-attention-heads",
            str(HEADS), "--seq-length", str(S), "--micro-batch-size", str(B),
            "--global-batch-size", str(MICRO_BATCHES * B), "--train-iters", "1",
            "--pipeline-model-parallel-size", "4"]
    with CommCounter() as counter:
        train(build_parser().parse_args(argv))
    return _summary(counter, p2p=True)


def _counted_calls(rank):
    """Each ``torch.distributed`` call once on the 4-rank world, each under its own counter
    nested in one outer counter: ``{call: (c10d ops counted, sent, received)}``, the outer
    counter's ``(sent, received)``, and whether a call after its block went uncounted."""
    from unittest import mock

    import torch
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings
    from torch.distributed import _coalescing_manager

    from megatron_helix.perf import comm_formulas
    from megatron_helix.perf.comm_counter import CommCounter

    def empty(rows=4):
        return torch.empty(rows, 3)

    class AllReduceGrad(torch.autograd.Function):
        """Identity forward, gradient all-reduced in backward, as Megatron's TP regions do."""

        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, grad):
            grad = grad.clone()
            dist.all_reduce(grad)
            return grad

    def coalesced():
        with _coalescing_manager(dist.group.WORLD, async_ops=True) as cm:
            dist.all_reduce(x, async_op=True)
            dist.all_reduce(torch.ones(8), async_op=True)
        cm.wait()

    def send_or_receive():
        if rank % 2 == 0:
            dist.send(x, rank + 1)
        else:
            dist.recv(empty(), rank - 1)

    def ring_shift():
        ops = [dist.P2POp(dist.isend, x, (rank + 1) % 4),
               dist.P2POp(dist.irecv, empty(), (rank - 1) % 4)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    def all_reduce_formula_changed():
        _, change = ONE_TERM_OFF["all_reduce_sent"]
        with mock.patch.object(comm_formulas, "all_reduce_sent",
                               change(comm_formulas.all_reduce_sent)):
            dist.all_reduce(x)

    x = torch.ones(4, 3)  # 48 bytes
    calls = {
        "all_reduce": lambda: dist.all_reduce(x),
        "all_reduce, formula changed": all_reduce_formula_changed,
        "all_reduce in backward": lambda: AllReduceGrad.apply(
            torch.ones(4, 3, requires_grad=True)).sum().backward(),
        "all_gather": lambda: dist.all_gather([empty() for _ in range(4)], x),
        "megatron dist_all_gather_func": lambda: mappings.dist_all_gather_func(empty(16), x),
        "reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(empty(1), x),
        "all_to_all_single, uneven": lambda: dist.all_to_all_single(
            empty(4 * (rank + 1)), empty(10), [rank + 1] * 4, [1, 2, 3, 4]),
        "all_to_all": lambda: dist.all_to_all([empty(1) for _ in range(4)], list(x.split(1))),
        "broadcast from 1": lambda: dist.broadcast(x, src=1),
        "reduce to 1": lambda: dist.reduce(x, dst=1),
        "gather to 0": lambda: dist.gather(x, [empty() for _ in range(4)] if rank == 0 else None),
        "scatter from 0": lambda: dist.scatter(empty(), [x] * 4 if rank == 0 else None),
        "coalesced all_reduce": coalesced,
        "send / recv": send_or_receive,
        "batch_isend_irecv": ring_shift,
    }
    counted = {}
    with CommCounter() as outer:
        for name, call in calls.items():
            with CommCounter() as counter:
                call()
            ops = tuple(sorted({key.op for key in counter.tallies}))
            counted[name] = (ops, counter.bytes_sent(), counter.bytes_received())
    totals = (outer.bytes_sent(), outer.bytes_received())
    dist.all_reduce(x)
    quiet = (outer.bytes_sent(), outer.bytes_received()) == totals
    return {"calls": counted, "outer": totals, "quiet_after_exit": quiet}


def _world(rank, world_size):
    from megatron_helix.cpu import enable_cpu_execution

    enable_cpu_execution()
    cases = _layer_cases(rank)
    cases["pipeline"] = _pipeline_case(rank)
    return {"cases": cases, "counted": _counted_calls(rank)}


@pytest.fixture(scope="module")
def measured():
    return run_distributed(_world, 4)


def _formulas(case):
    """What ``comm_formulas`` says each rank sends and receives per group in ``case``, as
    ``[{group: (sent, received)}]`` by rank; looked up now, so a changed formula shows."""
    from megatron_helix.attention.strategy import SliceGroupShape
    from megatron_helix.perf import comm_formulas as f

    if case == "pipeline":
        activation = S * B * HIDDEN * FP32
        return [{"pp": (f.pipeline_p2p_bytes(activation, stage, 4, MICRO_BATCHES),
                        f.pipeline_p2p_bytes(activation, 3 - stage, 4, MICRO_BATCHES))}
                for stage in range(4)]
    m, ring_tokens = 2, B * S // 2
    helix = SliceGroupShape(m=m, batch=B, seq_q=S, seq_kv=S, heads=HEADS // 2,
                            kv_heads=GROUPS // 2, slice_dim=HEAD_DIM // m, element_bytes=FP32)
    tp = f.tp_layer_bytes(B * S, HIDDEN, 4, FP32, sequence_parallel=False)
    sent = {
        "tp4": {"tp": tp},
        "tp4_sp": {"tp": f.tp_layer_bytes(B * S, HIDDEN, 4, FP32, sequence_parallel=True)},
        "helix_allreduce": {"tp": tp, "helix_slice": f.helix_attention_bytes(
            helix, "allreduce", causal=True, query_block_size=BLOCK)},
        "helix_redistribute": {"tp": tp, "helix_slice": f.helix_attention_bytes(
            helix, "redistribute", causal=True)},
        "ring4": {"cp": f.ring_attention_bytes(4, B * S // 4, GROUPS, HEAD_DIM, FP32)},
        "ring2_helix2x1": {
            "cp": f.ring_attention_bytes(2, ring_tokens, GROUPS // m, HEAD_DIM, FP32),
            "helix_slice": f.helix_ring_exchange_bytes(
                m, ring_tokens, HEADS, GROUPS, HEAD_DIM // m, FP32),
            "tp": f.tp_layer_bytes(ring_tokens, HIDDEN, m, FP32, sequence_parallel=False),
        },
    }[case]
    return [{group: (n, n) for group, n in sent.items()}] * 4  # a rank receives what it sends


def _compare(measured, case):
    """Assert every rank's counted ``(sent, received)`` per group is the formulas', on the
    same groups and no others."""
    counted = [rank["cases"][case] for rank in measured]
    formulas = _formulas(case)
    assert counted == formulas, f"{case}: counted {counted}, formulas {formulas}"


@pytest.mark.parametrize("case", ["tp4", "tp4_sp", "helix_allreduce", "helix_redistribute",
                                  "ring4", "ring2_helix2x1", "pipeline"])
def test_counted_bytes_equal_the_formulas(measured, case):
    assert all(n > 0 for rank in _formulas(case) for pair in rank.values() for n in pair)
    _compare(measured, case)


@pytest.mark.parametrize("name", sorted(ONE_TERM_OFF))
def test_a_formula_one_term_off_fails_the_comparison(measured, monkeypatch, name):
    """A slip of one term in a formula fails the comparison. The change is made here, after the
    world counted; that counts do not follow such a change is the world's all_reduce counted
    under the same change to ``all_reduce_sent`` (``_by_hand``)."""
    from megatron_helix.perf import comm_formulas

    case, change = ONE_TERM_OFF[name]
    monkeypatch.setattr(comm_formulas, name, change(getattr(comm_formulas, name)))
    with pytest.raises(AssertionError, match="counted"):
        _compare(measured, case)


def _by_hand(rank):
    """Each call of ``_counted_calls`` on ``rank`` of 4, priced by hand from the counter's
    table: ``x`` is 48 bytes, a row 12."""
    chain_from_1 = (rank - 1) % 4  # broadcast / reduce chain position, root 1 first
    return {
        "all_reduce": (("allreduce_",), 72, 72),  # 2 (m-1) N / m
        "all_reduce, formula changed": (("allreduce_",), 72, 72),
        "all_reduce in backward": (("allreduce_",), 72, 72),
        "all_gather": (("allgather_",), 144, 144),
        "megatron dist_all_gather_func": (("_allgather_base_",), 144, 144),
        "reduce_scatter_tensor": (("_reduce_scatter_base_",), 36, 36),
        "all_to_all_single, uneven": (("alltoall_base_",), 12 * (10 - (rank + 1)),
                                      12 * 3 * (rank + 1)),
        "all_to_all": (("alltoall_",), 36, 36),
        "broadcast from 1": (("broadcast_",), 48 * (chain_from_1 < 3), 48 * (chain_from_1 > 0)),
        "reduce to 1": (("reduce_",), 48 * (chain_from_1 > 0), 48 * (chain_from_1 < 3)),
        "gather to 0": (("gather_",), 0, 144) if rank == 0 else (("gather_",), 48, 0),
        "scatter from 0": (("scatter_",), 144, 0) if rank == 0 else (("scatter_",), 0, 48),
        "coalesced all_reduce": (("allreduce_coalesced_",), 120, 120),  # N = 48 + 32
        "send / recv": (("send",), 48, 0) if rank % 2 == 0 else (("recv_",), 0, 48),
        "batch_isend_irecv": (("recv_", "send"), 48, 48),
    }


def test_each_call_is_counted_at_its_c10d_op_by_the_documented_rule(measured):
    for rank, result in enumerate(measured):
        assert result["counted"]["calls"] == _by_hand(rank), f"rank {rank}"


def test_nested_counters_both_count_and_stop_at_exit(measured):
    for result in measured:
        calls = result["counted"]["calls"].values()
        inner = (sum(sent for _, sent, _ in calls), sum(received for _, _, received in calls))
        assert result["counted"]["outer"] == inner
        assert result["counted"]["quiet_after_exit"]


def test_the_kernels_are_registered_only_while_a_counter_is_active():
    import torch

    from megatron_helix.perf.comm_counter import CommCounter

    def registered():
        return torch._C._dispatch_has_kernel_for_dispatch_key("c10d::send", "BackendSelect")

    assert not registered()
    with CommCounter(), CommCounter():
        assert registered()
    assert not registered()
