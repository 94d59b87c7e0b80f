"""Ring attention over the sequence composed with helix over heads and head dims.

With a context-parallel ring of ``R`` ranks and helix ``(m, n)``, a rank holds ``s/R`` tokens
(zigzag) of its ``H/n`` heads restricted to ``d/m`` dims. The ring needs whole heads, so inside
the slice group one all-to-all trades dims for heads — ``[s/R, b, H/n, d/m]`` becomes
``[s/R, b, H/(n m), d]`` — the ring runs on whole heads over the context-parallel group, and the
inverse all-to-all returns the output to dim slices. q, k and v move once each way; the ring
traffic is that of ``H/(n m)`` whole heads, i.e. the same bytes as ``m`` rings of ``d/m``.

Requires ``(H/n) % m == 0`` and ``(G/n) % m == 0`` so whole query heads and their KV heads land
on one rank.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.tensor_parallel.mappings import all_to_all
from torch import Tensor

from megatron_helix import parallel_state as helix_state
from megatron_helix.attention.ring_core_attention import RingDotProductAttention


def dims_to_heads(x: Tensor, m: int, group) -> Tensor:
    """``[s, b, h, d/m]`` (all heads, my dims) -> ``[s, b, h/m, d]`` (my heads, all dims).

    Head dims come out in slice order (slice 0's dims first), a permutation shared by q, k
    and v, which leaves attention unchanged.
    """
    s, b, h, dm = x.shape
    send = x.view(s, b, m, h // m, dm).permute(2, 0, 1, 3, 4)  # slot j: heads of rank j
    received = all_to_all(group, send)  # slot j: my heads, dims of rank j
    return received.permute(1, 2, 3, 0, 4).reshape(s, b, h // m, m * dm)


def heads_to_dims(y: Tensor, m: int, group) -> Tensor:
    """Inverse of ``dims_to_heads``: ``[s, b, h/m, d]`` -> ``[s, b, h, d/m]``."""
    s, b, hm, d = y.shape
    send = y.reshape(s, b, hm, m, d // m).permute(3, 0, 1, 2, 4)  # slot j: dims of rank j
    received = all_to_all(group, send)  # slot j: heads of rank j, my dims
    return received.permute(1, 2, 0, 3, 4).reshape(s, b, m * hm, d // m)


class HelixRingCoreAttention(RingDotProductAttention):
    """``RingDotProductAttention`` on helix dim slices (constructor and forward unchanged)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.helix_m = helix_state.get_helix_m()
        n, config = helix_state.get_helix_n(), self.config
        heads = config.num_attention_heads // n
        groups = (config.num_query_groups or config.num_attention_heads) // n
        if self.helix_m > 1 and (heads % self.helix_m or groups % self.helix_m):
            raise ValueError(
                f"--helix-ring-size with --helix-m {self.helix_m}: the ring attends whole heads, "
                f"so each head group's {heads} heads and {groups} key/value heads must divide by "
                f"m = {self.helix_m}; use --helix-m 1 (heads only) or a --helix-n that leaves "
                f"multiples of m"
            )

    def _attend(
        self, query: Tensor, key: Tensor, value: Tensor, causal: bool, mask: Optional[Tensor],
        dropout_p: float,
    ) -> Tensor:
        """query ``[s, b, h, d/m]``, key/value ``[s, b, g, d/m]`` -> ``[s, b, h, d/m]``."""
        m = self.helix_m
        if m == 1:
            return super()._attend(query, key, value, causal, mask, dropout_p)
        group = helix_state.get_helix_slice_group()
        q, k, v = (dims_to_heads(t, m, group) for t in (query, key, value))
        out = super()._attend(q, k, v, causal, mask, dropout_p)  # [s, b, h/m, d]
        return heads_to_dims(out, m, group)
