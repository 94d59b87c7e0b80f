"""Count the bytes every ``torch.distributed`` call moves, per process group and op.

``with CommCounter() as counter: <forward/backward>`` wraps the collectives and point-to-point
calls for the duration of the block and restores them on exit. It wraps the names where callers
find them: ``torch.distributed``, its ``distributed_c10d`` module (whose ``isend``/``irecv``
``P2POp`` and ``batch_isend_irecv`` compare against by identity), and every module of
``megatron`` and ``megatron_helix`` that bound a function at import time (megatron-core's
``tensor_parallel.mappings``, ``tensor_parallel.layers`` and ``distributed.param_and_grad_buffer``
keep ``dist_all_gather_func = torch.distributed.all_gather_into_tensor`` and the like).

Bytes are those *this rank* sends and receives under the algorithm each op stands for, with
``m`` the group size and ``N`` the buffer in bytes (``comm_formulas``' algorithm functions,
the definitions ``attention/strategy.py`` uses, so formulas and measurements compare exactly):

=============================  =====================================  ==========================
op                             sent                                   received
=============================  =====================================  ==========================
all_reduce                     ring: ``2 (m-1) N / m``                same
all_gather(_into_tensor)       ring: ``(m-1)`` local shards           ``(m-1)`` remote shards
reduce_scatter(_tensor)        ring: ``(m-1)`` output shards          same
all_to_all(_single)            every slot but its own                 every slot but its own
broadcast / reduce             chain from / to the root: ``N`` unless last / first in the chain
gather / scatter               flat: each leaf ``N`` to / from the root, the root ``(m-1) N``
isend / send                   ``N``                                  0
irecv / recv                   0                                      ``N``
batch_isend_irecv              its sends                              its receives
=============================  =====================================  ==========================

Integer division rounds down per call. A call made from inside another wrapped call (torch's
``_all_gather_base`` forwards to ``all_gather_into_tensor``; ``batch_isend_irecv`` calls
``isend``) is counted once, by the outermost. Groups are named after the Megatron or helix
getter that returns them (``tp``, ``pp``, ``dp``, ``cp``, ``helix_slice``, ...; the first
match in ``_GROUP_GETTERS`` order wins, so the helix group reads ``tp``), the default group
``world``, anything else ``group``; the ranks tuple tells groups of one name apart.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from megatron_helix.perf.comm_formulas import (
    all_gather_sent,
    all_reduce_sent,
    all_to_all_sent,
    reduce_scatter_sent,
)

Group = Optional[dist.ProcessGroup]


@dataclass(frozen=True)
class CommKey:
    """One row of the tally: a process group (name and global ranks) and an op."""

    group: str
    ranks: Tuple[int, ...]
    op: str


@dataclass
class CommTally:
    """Calls and bytes this rank sent and received for one ``CommKey``."""

    calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass(frozen=True)
class _Call:
    """What a byte rule needs: the bound arguments, the group's size and this rank in it."""

    args: Dict[str, object]
    size: int
    rank: int

    def group_rank_of(self, global_key: str, group_key: str) -> int:
        """The root's rank in the group, from ``src``/``dst`` (global) or ``group_src``/...."""
        if self.args.get(group_key) is not None:
            return int(self.args[group_key])
        group = _group_or_world(self.args.get("group"))
        return dist.get_group_rank(group, int(self.args[global_key]))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _list_bytes(tensors) -> int:
    return sum(_nbytes(t) for t in tensors)


def _all_reduce(c: _Call) -> Tuple[int, int]:
    moved = all_reduce_sent(_nbytes(c.args["tensor"]), c.size)
    return moved, moved


def _all_gather_base(c: _Call) -> Tuple[int, int]:
    moved = all_gather_sent(_nbytes(c.args["input_tensor"]), c.size)
    return moved, moved


def _all_gather(c: _Call) -> Tuple[int, int]:
    received = _list_bytes(c.args["tensor_list"]) - _nbytes(c.args["tensor_list"][c.rank])
    return all_gather_sent(_nbytes(c.args["tensor"]), c.size), received


def _reduce_scatter(c: _Call) -> Tuple[int, int]:
    moved = reduce_scatter_sent(_nbytes(c.args["output"]), c.size)
    return moved, moved


def _slots_but_own(tensor: torch.Tensor, splits, c: _Call) -> int:
    """All-to-all bytes outside this rank's own slot (even, or ``splits`` rows per rank)."""
    if not splits:
        return all_to_all_sent(_nbytes(tensor), c.size)
    row_bytes = _nbytes(tensor) // max(1, tensor.shape[0])
    return _nbytes(tensor) - splits[c.rank] * row_bytes


def _all_to_all_single(c: _Call) -> Tuple[int, int]:
    out, inp = c.args["output"], c.args["input"]
    return (
        _slots_but_own(inp, c.args.get("input_split_sizes"), c),
        _slots_but_own(out, c.args.get("output_split_sizes"), c),
    )


def _all_to_all(c: _Call) -> Tuple[int, int]:
    out, inp = c.args["output_tensor_list"], c.args["input_tensor_list"]
    return (
        _list_bytes(inp) - _nbytes(inp[c.rank]),
        _list_bytes(out) - _nbytes(out[c.rank]),
    )


def _chain(c: _Call, root: int, towards_root: bool) -> Tuple[int, int]:
    """Pipelined chain over the group, ranks ordered from the root (broadcast) or to it."""
    position = (c.rank - root) % c.size
    first, last = position == 0, position == c.size - 1
    n = _nbytes(c.args["tensor"])
    if towards_root:  # reduce: data flows from position m-1 down to the root
        return (0 if first else n), (0 if last else n)
    return (0 if last else n), (0 if first else n)


def _broadcast(c: _Call) -> Tuple[int, int]:
    return _chain(c, c.group_rank_of("src", "group_src"), towards_root=False)


def _reduce(c: _Call) -> Tuple[int, int]:
    return _chain(c, c.group_rank_of("dst", "group_dst"), towards_root=True)


def _gather(c: _Call) -> Tuple[int, int]:
    n = _nbytes(c.args["tensor"])
    if c.rank == c.group_rank_of("dst", "group_dst"):
        return 0, (c.size - 1) * n
    return n, 0


def _scatter(c: _Call) -> Tuple[int, int]:
    n = _nbytes(c.args["tensor"])
    if c.rank == c.group_rank_of("src", "group_src"):
        return (c.size - 1) * n, 0
    return 0, n


def _send(c: _Call) -> Tuple[int, int]:
    return _nbytes(c.args["tensor"]), 0


def _recv(c: _Call) -> Tuple[int, int]:
    return 0, _nbytes(c.args["tensor"])


_BYTE_RULES: Dict[str, Callable[[_Call], Tuple[int, int]]] = {
    "all_reduce": _all_reduce,
    "all_gather_into_tensor": _all_gather_base,
    "_all_gather_base": _all_gather_base,
    "all_gather": _all_gather,
    "reduce_scatter_tensor": _reduce_scatter,
    "_reduce_scatter_base": _reduce_scatter,
    "reduce_scatter": _reduce_scatter,
    "all_to_all_single": _all_to_all_single,
    "all_to_all": _all_to_all,
    "broadcast": _broadcast,
    "reduce": _reduce,
    "gather": _gather,
    "scatter": _scatter,
    "isend": _send,
    "send": _send,
    "irecv": _recv,
    "recv": _recv,
}
_P2P_OPS = ("isend", "irecv", "send", "recv", "batch_isend_irecv")

# (name, module, getter, kwargs): megatron's and helix's groups, in naming priority.
_GROUP_GETTERS = (
    ("tp", "megatron.core.parallel_state", "get_tensor_model_parallel_group", {}),
    ("pp", "megatron.core.parallel_state", "get_pipeline_model_parallel_group", {}),
    ("cp", "megatron.core.parallel_state", "get_context_parallel_group", {}),
    ("dp", "megatron.core.parallel_state", "get_data_parallel_group", {}),
    ("dp_cp", "megatron.core.parallel_state", "get_data_parallel_group",
     {"with_context_parallel": True}),
    ("tp_cp", "megatron.core.parallel_state", "get_tensor_and_context_parallel_group", {}),
    ("tp_dp", "megatron.core.parallel_state", "get_tensor_and_data_parallel_group", {}),
    ("mp", "megatron.core.parallel_state", "get_model_parallel_group", {}),
    ("embd", "megatron.core.parallel_state", "get_embedding_group", {}),
    ("pos_embd", "megatron.core.parallel_state", "get_position_embedding_group", {}),
    ("ep", "megatron.core.parallel_state", "get_expert_model_parallel_group", {}),
    ("etp", "megatron.core.parallel_state", "get_expert_tensor_parallel_group", {}),
    ("edp", "megatron.core.parallel_state", "get_expert_data_parallel_group", {}),
    ("helix_slice", "megatron_helix.parallel_state", "get_helix_slice_group", {}),
    ("helix_head_group", "megatron_helix.parallel_state", "get_helix_head_group_group", {}),
)


def _group_or_world(group: Group) -> dist.ProcessGroup:
    return group if group is not None else dist.group.WORLD


def known_group_names() -> Dict[int, str]:
    """``id(process group) -> name`` for every Megatron / helix group built on this rank."""
    names: Dict[int, str] = {id(dist.group.WORLD): "world"}
    for name, module_name, getter, kwargs in _GROUP_GETTERS:
        module = sys.modules.get(module_name)
        if module is None:
            continue
        try:
            group = getattr(module, getter)(**kwargs)
        except (AssertionError, RuntimeError, TypeError, AttributeError):
            continue  # not initialized on this rank
        if group is not None:
            names.setdefault(id(group), name)
    return names


# --------------------------------------------------------------------------- patching

_LOCK = threading.Lock()
_ACTIVE: List["CommCounter"] = []
_PATCHES: List[Tuple[object, str, object]] = []  # (module, attribute, original)
_DEPTH = threading.local()


def _record(op: str, group: Group, sent: int, received: int) -> None:
    for counter in list(_ACTIVE):
        counter._add(op, group, sent, received)


class _Depth:
    """Per-thread nesting of wrapped calls: only the outermost call is counted.

    Per thread because autograd runs CUDA backward passes on its own threads.
    """

    def __enter__(self) -> bool:
        level = getattr(_DEPTH, "level", 0)
        _DEPTH.level = level + 1
        return level == 0

    def __exit__(self, *exc) -> None:
        _DEPTH.level -= 1


def _wrap(name: str, original: Callable) -> Callable:
    rule = _BYTE_RULES[name]
    signature = inspect.signature(original)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        with _Depth() as outermost:
            if outermost and _ACTIVE:
                bound = signature.bind(*args, **kwargs).arguments
                group = bound.get("group")
                world = _group_or_world(group)
                call = _Call(bound, dist.get_world_size(world), dist.get_rank(world))
                _record(name, group, *rule(call))
            return original(*args, **kwargs)

    wrapper.__wrapped_original__ = original  # type: ignore[attr-defined]
    return wrapper


def _wrap_batch(original: Callable, isend_wrapper: Callable, irecv_wrapper: Callable) -> Callable:
    """``batch_isend_irecv``: count each ``P2POp``; the ``isend``/``irecv`` it calls are nested.

    An op built before the counter started holds the unwrapped ``isend``; torch tells sends
    from receives by identity with the (now wrapped) module global, so such ops are pointed at
    the wrappers first.
    """
    unwrapped = {isend_wrapper.__wrapped_original__: isend_wrapper,
                 irecv_wrapper.__wrapped_original__: irecv_wrapper}

    @functools.wraps(original)
    def wrapper(p2p_op_list):
        with _Depth() as outermost:
            for p2p in p2p_op_list:
                p2p.op = unwrapped.get(p2p.op, p2p.op)
                if outermost and _ACTIVE:
                    n = _nbytes(p2p.tensor)
                    sent = n if p2p.op is isend_wrapper else 0
                    _record("batch_isend_irecv", p2p.group, sent, n - sent)
            return original(p2p_op_list)

    return wrapper


def _modules_to_patch() -> Iterator[object]:
    yield dist
    yield distributed_c10d
    for name, module in list(sys.modules.items()):
        if module is not None and name.split(".")[0] in ("megatron", "megatron_helix"):
            yield module


def _install() -> None:
    originals = {name: getattr(dist, name) for name in _BYTE_RULES if hasattr(dist, name)}
    wrappers = {name: _wrap(name, fn) for name, fn in originals.items()}
    batch = dist.batch_isend_irecv
    wrappers["batch_isend_irecv"] = _wrap_batch(batch, wrappers["isend"], wrappers["irecv"])
    originals["batch_isend_irecv"] = batch
    by_identity = {id(fn): wrappers[name] for name, fn in originals.items()}
    for module in _modules_to_patch():
        for attr, value in list(vars(module).items()):
            wrapper = by_identity.get(id(value))
            if wrapper is not None:
                _PATCHES.append((module, attr, value))
                setattr(module, attr, wrapper)


def _uninstall() -> None:
    while _PATCHES:
        module, attr, original = _PATCHES.pop()
        setattr(module, attr, original)


class CommCounter:
    """Context manager tallying this rank's communication per ``(group, ranks, op)``.

    Counters may nest or overlap: the functions are wrapped while at least one is active and
    every active counter sees every call. Groups are named by ``known_group_names()`` when
    first seen; ``group_names`` adds or overrides names.
    """

    def __init__(self, group_names: Optional[Dict[dist.ProcessGroup, str]] = None):
        self._extra_names = dict(group_names or {})
        # id -> (group, name, ranks); holding the group keeps its id from being reused.
        self._seen: Dict[int, Tuple[dist.ProcessGroup, str, Tuple[int, ...]]] = {}
        self.tallies: Dict[CommKey, CommTally] = {}

    def __enter__(self) -> "CommCounter":
        with _LOCK:
            if not _ACTIVE:
                _install()
            _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        with _LOCK:
            _ACTIVE.remove(self)
            if not _ACTIVE:
                _uninstall()

    def _describe(self, group: Group) -> Tuple[str, Tuple[int, ...]]:
        """Name and ranks of ``group``, looked up when first seen (groups may be built after
        the counter started, e.g. by a trainer running inside it)."""
        world = _group_or_world(group)
        seen = self._seen.get(id(world))
        if seen is None or seen[0] is not world:
            names = known_group_names()
            names.update({id(g): name for g, name in self._extra_names.items()})
            ranks = tuple(dist.get_process_group_ranks(world))
            seen = (world, names.get(id(world), "group"), ranks)
            self._seen[id(world)] = seen
        return seen[1], seen[2]

    def _add(self, op: str, group: Group, sent: int, received: int) -> None:
        name, ranks = self._describe(group)
        with _LOCK:
            tally = self.tallies.setdefault(CommKey(name, ranks, op), CommTally())
            tally.calls += 1
            tally.bytes_sent += sent
            tally.bytes_received += received

    def _select(self, group: Optional[str], op: Optional[str], p2p: Optional[bool]):
        for key, tally in self.tallies.items():
            if group is not None and key.group != group:
                continue
            if op is not None and key.op != op:
                continue
            if p2p is not None and (key.op in _P2P_OPS) != p2p:
                continue
            yield tally

    def bytes_sent(
        self, group: Optional[str] = None, op: Optional[str] = None, p2p: Optional[bool] = None
    ) -> int:
        """Bytes sent, optionally only in groups of one name, of one op, or p2p / collective."""
        return sum(t.bytes_sent for t in self._select(group, op, p2p))

    def bytes_received(
        self, group: Optional[str] = None, op: Optional[str] = None, p2p: Optional[bool] = None
    ) -> int:
        return sum(t.bytes_received for t in self._select(group, op, p2p))

    def calls(
        self, group: Optional[str] = None, op: Optional[str] = None, p2p: Optional[bool] = None
    ) -> int:
        return sum(t.calls for t in self._select(group, op, p2p))

    def table(self) -> str:
        """A readable table, one row per ``(group, ranks, op)``."""
        lines = [f"{'group':<16} {'ranks':<20} {'op':<24} {'calls':>6} {'sent B':>14} "
                 f"{'recv B':>14}"]
        order = sorted(self.tallies.items(), key=lambda kv: (kv[0].group, kv[0].ranks, kv[0].op))
        for key, t in order:
            ranks = ",".join(map(str, key.ranks))
            lines.append(
                f"{key.group:<16} {ranks:<20} {key.op:<24} {t.calls:>6} {t.bytes_sent:>14} "
                f"{t.bytes_received:>14}"
            )
        return "\n".join(lines)
