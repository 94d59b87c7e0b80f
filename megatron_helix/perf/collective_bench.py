"""Time collectives on the ranks of this job and fit an alpha-beta link per collective.

Run under ``torchrun`` (``megatron-helix bench`` does): every rank takes part; rank 0 writes
the fitted links as JSON. Each collective runs on the whole world and, where the world splits
into pairs, on every pair at once, so the timings include the contention the trainer's groups
see when all of them communicate together. A timing is the median over repeats of the slowest
rank (a collective ends when its last rank does).

Fit: ``seconds = steps * alpha + sent / beta`` by least squares over message sizes, with
``sent`` the bytes a rank sends under ``comm_formulas``' definitions and ``steps`` the
algorithm's sequential steps (ring all-reduce ``2 (m-1)``, all-gather, reduce-scatter and
all-to-all ``m - 1``, a ring shift 1). Each group also gets its ``sync`` cost
(``measure_sync``), the same for every collective on it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.distributed as dist

from megatron_helix.perf.calibration import Link
from megatron_helix.perf.comm_formulas import (
    all_gather_sent,
    all_reduce_sent,
    all_to_all_sent,
    reduce_scatter_sent,
)

SIZES = (2**12, 2**14, 2**16, 2**18, 2**19, 2**20, 2**21, 2**22, 2**23)  # per-rank buffer bytes


def _collective(op: str, n_bytes: int, group, m: int) -> Tuple[Callable[[], None], int, int]:
    """(call, bytes this rank sends, steps) of ``op`` on a ``n_bytes`` fp32 buffer."""
    x = torch.ones(n_bytes // 4)
    if op == "all_reduce":
        return lambda: dist.all_reduce(x, group=group), all_reduce_sent(n_bytes, m), 2 * (m - 1)
    if op == "all_gather":
        out = torch.empty(m * x.numel())
        return (lambda: dist.all_gather_into_tensor(out, x, group=group),
                all_gather_sent(n_bytes, m), m - 1)
    if op == "reduce_scatter":
        big = torch.ones(m * x.numel())
        return (lambda: dist.reduce_scatter_tensor(x, big, group=group),
                reduce_scatter_sent(n_bytes, m), m - 1)
    if op == "all_to_all":
        out = torch.empty_like(x)
        return (lambda: dist.all_to_all_single(out, x, group=group),
                all_to_all_sent(n_bytes, m), m - 1)
    ranks = dist.get_process_group_ranks(group)
    me = ranks.index(dist.get_rank())
    nxt, prv = ranks[(me + 1) % m], ranks[(me - 1) % m]
    out = torch.empty_like(x)

    def shift():
        for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, x, nxt, group),
                                            dist.P2POp(dist.irecv, out, prv, group)]):
            work.wait()

    return shift, n_bytes, 1


def _slowest(seconds: float) -> float:
    elapsed = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def _time(call: Callable[[], None], repeats: int) -> float:
    """Median wall seconds per call of the slowest rank, all ranks starting together."""
    call()
    samples = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        call()
        samples.append(_slowest(time.perf_counter() - start))
    return statistics.median(samples)


def fit_link(points: List[Tuple[int, int, float]],
             sync: Tuple[Tuple[float, float], ...] = ()) -> Link:
    """``seconds = steps * alpha + sent / beta`` over ``(sent, steps, seconds)`` points, least
    squares in *relative* error so small and large messages weigh alike."""
    y = torch.tensor([max(seconds, 1e-7) for _, _, seconds in points], dtype=torch.float64)
    a = torch.tensor([[steps, sent] for sent, steps, _ in points], dtype=torch.float64)
    a, ones = a / y.unsqueeze(1), torch.ones_like(y).unsqueeze(1)
    alpha, inv_beta = torch.linalg.lstsq(a, ones).solution.squeeze(1).tolist()
    return Link(alpha=max(alpha, 0.0), beta=1.0 / max(inv_beta, 1e-15), sync=sync)


SYNC_CHUNKS = (4, 16, 64)  # GEMMs of 192^3 between calls: ~0.4 to ~6 ms of compute


def _uncontended_gemm_seconds(a: torch.Tensor) -> float:
    """One GEMM's time on this rank while the others wait (no contention)."""
    seconds = 0.0
    for rank in range(dist.get_world_size()):
        dist.barrier()
        if rank == dist.get_rank():
            seconds = _time_local(lambda: a @ a)
    dist.barrier()
    return seconds


def _time_local(call: Callable[[], object], repeats: int = 50) -> float:
    call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats


def measure_sync(group, repeats: int = 3) -> Tuple[Tuple[float, float], ...]:
    """Extra wall seconds a call costs when every rank computes between calls, as a function
    of that compute: ``((compute seconds between calls, extra seconds per call), ...)``.

    Per ``SYNC_CHUNKS``: a loop of GEMMs with and without a 4-byte all-reduce after each chunk;
    the extra time per call minus the all-reduce's own time (median of ``repeats``). On cores
    shared by more ranks than they hold, the ranks fall out of step while they compute and a
    collective waits for the last one to be scheduled again; longer compute phases drift
    further apart. The compute is measured uncontended, the unit the cost model uses."""
    a, x = torch.randn(192, 192), torch.ones(1)
    gemm = _uncontended_gemm_seconds(a)
    alone = _time(lambda: dist.all_reduce(x, group=group), 21)

    def loop(chunk: int, calls: int, with_call: bool) -> float:
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            for _ in range(chunk):
                a @ a
            if with_call:
                dist.all_reduce(x, group=group)
        return _slowest(time.perf_counter() - start)

    points = []
    for chunk in SYNC_CHUNKS:
        calls = max(20, 800 // chunk)
        loop(chunk, 5, True)
        extra = [(loop(chunk, calls, True) - loop(chunk, calls, False)) / calls - alone
                 for _ in range(repeats)]
        points.append((chunk * gemm, max(0.0, statistics.median(extra))))
    return tuple(points)


def measure(repeats: int = 9) -> Dict[str, Dict[str, Link]]:
    """``{"gloo<m>": {collective: Link}}`` for the whole world (``m`` ranks) and, where the
    world splits into pairs, for all pairs at once (``gloo2``)."""
    world = dist.get_world_size()
    groups = {f"gloo{world}": (dist.group.WORLD, world)}
    if world % 2 == 0 and world > 2:
        pairs = [dist.new_group([r, r + 1]) for r in range(0, world, 2)]
        groups["gloo2"] = (pairs[dist.get_rank() // 2], 2)
    links: Dict[str, Dict[str, Link]] = {}
    for name, (group, m) in groups.items():
        sync = measure_sync(group)
        links[name] = {}
        for op in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p"):
            points = []
            for size in SIZES:
                call, sent, steps = _collective(op, size, group, m)
                points.append((sent, steps, _time(call, repeats)))
            links[name][op] = fit_link(points, sync)
    return links


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where rank 0 writes the fitted links")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    links = measure(args.repeats)
    if dist.get_rank() == 0:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({group: {op: vars(link) for op, link in ops.items()}
                       for group, ops in links.items()}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
