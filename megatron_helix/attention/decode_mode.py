"""Choosing how a helix slice group decodes with a static KV cache, from the bytes it sends.

``slices``: every rank caches all tokens of its heads at ``d/m`` dims and runs the score
all-reduce (``score_allreduce.py``) over the partial scores ``b x H/n x s_kv`` fp32 per step:
traffic grows with the context. ``kv-parallel`` (``kv_parallel_decode.py``): every rank caches
``1/m`` of the tokens at the full head dim and exchanges only the new tokens' q, k, v, their
fp32 log-sum-exp and the output: traffic independent of the context. The byte counts are what
each rank *sends* per attention layer and forward (``attention/strategy.py``'s conventions:
ring all-gather ``m-1`` local shards, ring reduce-scatter ``m-1`` output shards), the same
formulas the communication tests check against measured traffic.
"""

from __future__ import annotations

from megatron_helix.attention.strategy import SliceGroupShape, allreduce_bytes_sent

DECODE_MODES = ("auto", "kv-parallel", "slices")
LSE_BYTES = 4  # the log-sum-exp always travels in fp32


def kv_parallel_bytes_sent(shape: SliceGroupShape) -> int:
    """KV-parallel forward of ``shape.seq_q`` new tokens: one all-gather of their q, k and v
    slices (``H/n + 2 G/n`` heads of ``d/m``), one of their fp32 LSE (``H/n`` per token) and
    one reduce-scatter of the output to ``d/m`` dims. ``shape.seq_kv`` does not enter."""
    m = shape.m
    if m == 1:
        return 0
    tokens = shape.batch * shape.seq_q
    qkv = tokens * (shape.heads + 2 * shape.kv_heads) * shape.slice_dim * shape.element_bytes
    lse = tokens * shape.heads * LSE_BYTES
    out = tokens * shape.heads * shape.slice_dim * shape.element_bytes
    return (m - 1) * (qkv + lse + out)


def slices_decode_bytes_sent(shape: SliceGroupShape) -> int:
    """The slice path's forward over a context of ``shape.seq_kv`` tokens: the score
    all-reduce, ``b x H/n x seq_q x seq_kv`` fp32 (new queries see the whole context)."""
    return allreduce_bytes_sent(shape, backward=False, causal=True)


def choose_decode_mode(requested: str, shape: SliceGroupShape) -> str:
    """Resolve ``auto`` for a decode step (``shape.seq_q`` new tokens per sequence) at the
    context's maximum length ``shape.seq_kv``: ``kv-parallel`` when ``m > 1`` and it sends
    fewer bytes than the slice path, else ``slices``. With ``m == 1`` every rank holds whole
    heads and every token, so both modes are the same and ``slices`` is returned."""
    if requested not in DECODE_MODES:
        raise ValueError(f"--helix-decode {requested!r} not in {DECODE_MODES}")
    if shape.m == 1:
        return "slices"
    if requested != "auto":
        return requested
    cheaper = kv_parallel_bytes_sent(shape) < slices_decode_bytes_sent(shape)
    return "kv-parallel" if cheaper else "slices"
