"""Count the bytes this rank's process-group calls put on the wire, per process group and op.

``with CommCounter() as counter: <forward/backward>`` counts at the dispatcher. Every
``torch.distributed`` collective and point-to-point call reaches its backend (gloo, NCCL) as one
``torch.ops.c10d`` operator, whatever name the caller reached it by, so the counter reads the
tensors and the process group the backend is actually handed. On torch 2.13 with gloo:

- ``all_reduce`` -> ``allreduce_``; ``all_gather`` -> ``allgather_``; ``all_gather_into_tensor``,
  ``_all_gather_base`` and megatron-core's import-time binding ``dist_all_gather_func`` ->
  ``_allgather_base_``; ``reduce_scatter(_tensor)`` -> ``reduce_scatter_`` /
  ``_reduce_scatter_base_``; ``all_to_all(_single)`` -> ``alltoall_`` / ``alltoall_base_``;
  ``broadcast``, ``reduce``, ``gather``, ``scatter`` -> ``broadcast_``, ``reduce_``,
  ``gather_``, ``scatter_``;
- ``send``/``isend`` -> ``send``; ``recv``/``irecv`` -> ``recv_`` (``recv_any_source_`` without
  a source); ``batch_isend_irecv`` -> one ``send`` or ``recv_`` per ``P2POp``;
- collectives issued inside ``_coalescing_manager`` (Megatron DDP's buckets) -> one
  ``allreduce_coalesced_`` / ``allgather_into_tensor_coalesced_`` /
  ``reduce_scatter_tensor_coalesced_`` for the lot;
- calls made in autograd's backward pass, under ``no_grad`` or in inference mode alike.

torch's ``CommDebugMode`` sees these ops from a ``TorchDispatchMode``. Such a mode takes every
aten op through Python and breaks tensor subclasses built under it (helix's causal SDPA builds a
``torch.nn.attention.bias.CausalBias``: "Creating a new Tensor subclass ... already associated
to a python object"), so the counter instead registers a kernel on the c10d ops alone, at the
``BackendSelect`` key every call passes just above the backend, and redispatches below it.
The kernels are registered while a counter is active and removed after.

Bytes are those *this rank* sends and receives under the algorithm each op stands for, with
``m`` the group size and ``N`` the bytes of the tensors handed to the op. The rules are defined
here, from the tensors alone; ``comm_formulas`` prices the same traffic in closed form and the
tests compare the two, so neither side checks itself:

=================================  ===============================  ===========================
c10d op                            sent                             received
=================================  ===============================  ===========================
allreduce_ (+ _coalesced_)         ring: ``2 (m-1) N / m``          same
allgather_, _allgather_base_,      ring: ``(m-1)`` input shards     output less the input
allgather(_into_tensor)_coalesced_
reduce_scatter_, _reduce_scatter   ring: ``(m-1)`` output shards    same
_base_, reduce_scatter_tensor
_coalesced_
alltoall_, alltoall_base_          input less its own slot          output less its own slot
broadcast_ / reduce_               chain from / to the root: ``N`` unless last / first in it
gather_ / scatter_                 flat: each leaf ``N`` to / from the root, the root ``(m-1) N``
send                               ``N``                            0
recv_, recv_any_source_            0                                ``N``
=================================  ===============================  ===========================

Integer division rounds down per call. Barriers carry no payload and are not counted.
Functional collectives (``_c10d_functional``: DTensor, compiled graphs) need not reach the
backend through these ops, so the counter does not promise them; Megatron and helix do not
use them.

Tallies are keyed by the c10d op's name (``allreduce_``, ``send``, ...). Groups are named after
the Megatron or helix getter that returns them (``tp``, ``pp``, ``dp``, ``cp``,
``helix_slice``, ...; the first match in ``_GROUP_GETTERS`` order wins, so a helix group equal
to the TP group reads ``tp``), the default group ``world``, anything else ``group``; the ranks
tuple tells groups of one name apart.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch._C import DispatchKey


@dataclass(frozen=True)
class CommKey:
    """One row of the tally: a process group (name and global ranks) and a c10d op."""

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
    """One c10d op call: its arguments by schema name, the group's size ``m``, this rank in it."""

    args: Dict[str, object]
    size: int
    rank: int

    def nbytes(self, name: str) -> int:
        """Bytes of argument ``name``: a tensor or a (nested) list of tensors."""
        return _nbytes(self.args[name])


Rule = Callable[[_Call], Tuple[int, int]]


def _nbytes(tensors) -> int:
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(_nbytes(t) for t in tensors)


def _all_reduce(c: _Call) -> Tuple[int, int]:
    moved = 2 * (c.size - 1) * c.nbytes("tensors") // c.size
    return moved, moved


def _all_gather(inputs: str, outputs: str) -> Rule:
    """Ring all-gather: forward ``m - 1`` shards the size of one's own, receive all others."""

    def rule(c: _Call) -> Tuple[int, int]:
        own = c.nbytes(inputs)
        return (c.size - 1) * own, c.nbytes(outputs) - own

    return rule


def _reduce_scatter(outputs: str) -> Rule:
    """Ring reduce-scatter: ``m - 1`` partial shards of the output's size each way."""

    def rule(c: _Call) -> Tuple[int, int]:
        moved = (c.size - 1) * c.nbytes(outputs)
        return moved, moved

    return rule


def _own_slot(tensor: torch.Tensor, splits, c: _Call) -> int:
    """Bytes of this rank's slot of an all-to-all buffer: ``1/m`` of it, or ``splits`` rows."""
    if not splits:
        return _nbytes(tensor) // c.size
    return splits[c.rank] * (_nbytes(tensor) // max(1, tensor.shape[0]))


def _all_to_all_base(c: _Call) -> Tuple[int, int]:
    out, inp = c.args["output"], c.args["input"]
    return (
        _nbytes(inp) - _own_slot(inp, c.args["input_split_sizes"], c),
        _nbytes(out) - _own_slot(out, c.args["output_split_sizes"], c),
    )


def _all_to_all(c: _Call) -> Tuple[int, int]:
    out, inp = c.args["output_tensors"], c.args["input_tensors"]
    return _nbytes(inp) - _nbytes(inp[c.rank]), _nbytes(out) - _nbytes(out[c.rank])


def _chain(towards_root: bool) -> Rule:
    """Pipelined chain over the group, ranks ordered from the root (broadcast) or to it."""

    def rule(c: _Call) -> Tuple[int, int]:
        position = (c.rank - c.args["root_rank"]) % c.size
        first, last = position == 0, position == c.size - 1
        n = c.nbytes("tensors")
        if towards_root:  # reduce: data flows from position m-1 down to the root
            return (0 if first else n), (0 if last else n)
        return (0 if last else n), (0 if first else n)

    return rule


def _gather(c: _Call) -> Tuple[int, int]:
    """Flat gather: each leaf sends its ``N`` straight to the root."""
    n = c.nbytes("input_tensors")
    return (0, (c.size - 1) * n) if c.rank == c.args["root_rank"] else (n, 0)


def _scatter(c: _Call) -> Tuple[int, int]:
    """Flat scatter: the root sends each leaf its ``N``."""
    n = c.nbytes("output_tensors")
    return ((c.size - 1) * n, 0) if c.rank == c.args["root_rank"] else (0, n)


def _send(c: _Call) -> Tuple[int, int]:
    return c.nbytes("tensors"), 0


def _recv(c: _Call) -> Tuple[int, int]:
    return 0, c.nbytes("tensors")


_RULES: Dict[str, Rule] = {
    "allreduce_": _all_reduce,
    "allreduce_coalesced_": _all_reduce,
    "allgather_": _all_gather("input_tensors", "output_tensors"),
    "_allgather_base_": _all_gather("input_tensor", "output_tensor"),
    "allgather_coalesced_": _all_gather("input_list", "output_lists"),
    "allgather_into_tensor_coalesced_": _all_gather("inputs", "outputs"),
    "reduce_scatter_": _reduce_scatter("output_tensors"),
    "_reduce_scatter_base_": _reduce_scatter("output_tensor"),
    "reduce_scatter_tensor_coalesced_": _reduce_scatter("outputs"),
    "alltoall_base_": _all_to_all_base,
    "alltoall_": _all_to_all,
    "broadcast_": _chain(towards_root=False),
    "reduce_": _chain(towards_root=True),
    "gather_": _gather,
    "scatter_": _scatter,
    "send": _send,
    "recv_": _recv,
    "recv_any_source_": _recv,
}
_P2P_OPS = ("send", "recv_", "recv_any_source_")

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
)


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


# --------------------------------------------------------------------------- the kernels

_LOCK = threading.Lock()
_ACTIVE: List["CommCounter"] = []
_LIBRARY: List[torch.library.Library] = []  # the registration while a counter is active


def _kernel(op: torch._ops.OpOverload, rule: Rule) -> Callable:
    """A ``BackendSelect`` kernel for ``op``: price the call by ``rule`` for every active
    counter, then run the backend's kernel."""

    def kernel(keyset, *args, **kwargs):
        counters = list(_ACTIVE)
        if counters:
            bound = {a.name: v for a, v in zip(op._schema.arguments, args)}
            bound.update(kwargs)
            group = dist.ProcessGroup.unbox(bound["process_group"])
            sent, received = rule(_Call(bound, group.size(), group.rank()))
            for counter in counters:
                counter._add(op._opname, group, sent, received)
        return op.redispatch(keyset.remove(DispatchKey.BackendSelect), *args, **kwargs)

    return kernel


def _install() -> None:
    library = torch.library.Library("c10d", "IMPL")
    for name, rule in _RULES.items():
        op = getattr(torch.ops.c10d, name).default
        library.impl(name, _kernel(op, rule), "BackendSelect", with_keyset=True)
    _LIBRARY.append(library)


def _uninstall() -> None:
    _LIBRARY.pop()._destroy()  # torch's way to drop a Library's registrations


class CommCounter:
    """Context manager tallying this rank's communication per ``(group, ranks, op)``.

    Counters may nest or overlap: the kernels are registered while at least one is active and
    every active counter sees every call, from any thread (backward may run on autograd's
    device threads). Groups are named by ``known_group_names()`` when first seen;
    ``group_names`` adds or overrides names.
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

    def _add(self, op: str, group: dist.ProcessGroup, sent: int, received: int) -> None:
        name, ranks = self._describe(group)
        with _LOCK:
            tally = self.tallies.setdefault(CommKey(name, ranks, op), CommTally())
            tally.calls += 1
            tally.bytes_sent += sent
            tally.bytes_received += received

    def _describe(self, group: dist.ProcessGroup) -> Tuple[str, Tuple[int, ...]]:
        """Name and ranks of ``group``, looked up when first seen (groups may be built after
        the counter started, e.g. by a trainer running inside it)."""
        seen = self._seen.get(id(group))
        if seen is None or seen[0] is not group:
            names = known_group_names()
            names.update({id(g): name for g, name in self._extra_names.items()})
            ranks = tuple(dist.get_process_group_ranks(group))
            seen = (group, names.get(id(group), "group"), ranks)
            self._seen[id(group)] = seen
        return seen[1], seen[2]

    def _select(
        self, group: Optional[str], op: Optional[str], p2p: Optional[bool]
    ) -> Iterator[CommTally]:
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
        lines = [f"{'group':<16} {'ranks':<20} {'op':<34} {'calls':>6} {'sent B':>14} "
                 f"{'recv B':>14}"]
        order = sorted(self.tallies.items(), key=lambda kv: (kv[0].group, kv[0].ranks, kv[0].op))
        for key, t in order:
            ranks = ",".join(map(str, key.ranks))
            lines.append(
                f"{key.group:<16} {ranks:<20} {key.op:<34} {t.calls:>6} {t.bytes_sent:>14} "
                f"{t.bytes_received:>14}"
            )
        return "\n".join(lines)
