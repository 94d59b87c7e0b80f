"""L2 residency: the CPU no-op, the contiguous parameter buffer, and the exact CUDA runtime call
sequence, checked against a fake runtime (no GPU needed)."""

import ctypes
import logging

import pytest
import torch

from megatron_helix import l2_residency as l2
from megatron_helix.l2_residency import (
    AccessPolicyWindow,
    StreamAttrValue,
    flatten_parameters,
    l2_persisting,
    l2_resident,
)

MiB = 2**20


class FakeRuntime:
    """Records every call; answers like an H100 (37.5 MiB set-aside, window up to 128 MiB)."""

    def __init__(self, max_set_aside=39_321_600, max_window=128 * MiB, limit=0):
        self.calls = []
        self.attributes = {
            l2.CUDA_DEV_ATTR_MAX_PERSISTING_L2_CACHE_SIZE: max_set_aside,
            l2.CUDA_DEV_ATTR_MAX_ACCESS_POLICY_WINDOW_SIZE: max_window,
        }
        self.limit = limit
        self.windows = {}

    def device_attribute(self, attribute, device):
        self.calls.append(("attribute", attribute, device))
        return self.attributes[attribute]

    def get_limit(self, limit):
        self.calls.append(("get_limit", limit))
        return self.limit

    def set_limit(self, limit, value):
        self.calls.append(("set_limit", limit, value))
        self.limit = value

    def get_stream_window(self, stream):
        self.calls.append(("get_window", stream))
        return self.windows.get(stream, AccessPolicyWindow())

    def set_stream_window(self, stream, window):
        self.calls.append(("set_window", stream, window.base_ptr or 0, window.num_bytes,
                           round(window.hitRatio, 6), window.hitProp, window.missProp))
        self.windows[stream] = window

    def reset_persisting_l2_cache(self):
        self.calls.append(("reset",))


def test_struct_layouts_match_the_cuda_headers():
    assert ctypes.sizeof(AccessPolicyWindow) == 32
    offsets = [getattr(AccessPolicyWindow, name).offset
               for name in ("base_ptr", "num_bytes", "hitRatio", "hitProp", "missProp")]
    assert offsets == [0, 8, 16, 20, 24]
    assert ctypes.sizeof(StreamAttrValue) == 64
    assert StreamAttrValue.accessPolicyWindow.offset == 0


def test_cpu_is_a_logged_no_op(caplog):
    layer = torch.nn.Linear(8, 8)
    with caplog.at_level(logging.INFO, logger=l2.__name__):
        with l2_resident(layer) as residency:
            assert residency is None
            layer(torch.randn(2, 8))
    assert len(caplog.records) == 1 and "no CUDA" in caplog.records[0].getMessage()


def test_flatten_keeps_values_and_shares_one_aligned_buffer():
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7),
                                torch.nn.Linear(7, 3, bias=False))
    x = torch.randn(4, 5)
    before, params = block(x), [p.detach().clone() for p in block.parameters()]
    buffer = flatten_parameters(block)
    assert buffer.dtype == torch.uint8 and buffer.is_contiguous()
    start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
    for param, original in zip(block.parameters(), params):
        assert torch.equal(param, original)
        assert start <= param.data_ptr() < end and (param.data_ptr() - start) % 256 == 0
    assert torch.equal(block(x), before)
    block(x).sum().backward()  # autograd still reaches the parameters
    assert all(p.grad is not None for p in block.parameters())
    mixed = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(3, dtype=torch.float16)),
                                    torch.nn.Parameter(torch.randn(2, 5, dtype=torch.float64))])
    originals = [p.detach().clone() for p in mixed]
    flatten_parameters(mixed)
    assert all(torch.equal(p, o) and p.dtype == o.dtype for p, o in zip(mixed, originals))


def test_cuda_call_sequence_sets_and_restores():
    fake = FakeRuntime(limit=4 * MiB)
    buffer = torch.empty(24 * MiB, dtype=torch.uint8)
    with l2_persisting(buffer, stream=77, runtime=fake) as residency:
        assert residency.num_bytes == 24 * MiB and residency.hit_ratio == 1.0
        inside = list(fake.calls)
    limit = l2.CUDA_LIMIT_PERSISTING_L2_CACHE_SIZE
    assert inside == [
        ("attribute", l2.CUDA_DEV_ATTR_MAX_PERSISTING_L2_CACHE_SIZE, 0),
        ("attribute", l2.CUDA_DEV_ATTR_MAX_ACCESS_POLICY_WINDOW_SIZE, 0),
        ("get_limit", limit),
        ("get_window", 77),
        ("set_limit", limit, 24 * MiB),
        ("set_window", 77, buffer.data_ptr(), 24 * MiB, 1.0,
         l2.CUDA_ACCESS_PROPERTY_PERSISTING, l2.CUDA_ACCESS_PROPERTY_STREAMING),
    ]
    assert fake.calls[len(inside):] == [
        ("set_window", 77, 0, 0, 0.0, 0, 0),  # the stream's previous (empty) window
        ("reset",),
        ("set_limit", limit, 4 * MiB),
    ]


def test_buffer_larger_than_the_set_aside_gets_a_partial_hit_ratio():
    fake = FakeRuntime(max_set_aside=30 * MiB, max_window=40 * MiB)
    buffer = torch.empty(60 * MiB, dtype=torch.uint8)
    with l2_persisting(buffer, stream=5, runtime=fake) as residency:
        assert residency.num_bytes == 40 * MiB  # clamped to the largest window
        assert residency.set_aside_bytes == 30 * MiB
        assert residency.hit_ratio == pytest.approx(0.75)
        assert fake.windows[5].hitRatio == pytest.approx(0.75)


def test_restores_on_exceptions_and_skips_devices_without_persisting_l2():
    fake = FakeRuntime()
    with pytest.raises(RuntimeError, match="boom"):
        with l2_persisting(torch.empty(1024, dtype=torch.uint8), stream=3, runtime=fake):
            raise RuntimeError("boom")
    assert fake.calls[-2:] == [("reset",), ("set_limit", l2.CUDA_LIMIT_PERSISTING_L2_CACHE_SIZE, 0)]
    assert fake.windows[3].num_bytes == 0
    old_gpu = FakeRuntime(max_set_aside=0)
    with l2_persisting(torch.empty(1024, dtype=torch.uint8), stream=3, runtime=old_gpu) as res:
        assert res is None
    assert not [call for call in old_gpu.calls if call[0].startswith("set")]
