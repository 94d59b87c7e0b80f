"""L2 residency: the CPU no-op, the contiguous parameter buffer, and the exact CUDA runtime call
sequence, checked against one fake device reached through both back ends -- a fake
``cuda.bindings.runtime`` module and the ctypes fallback over a fake libcudart (no GPU needed)."""

import ctypes
import enum
import logging
import sys
import types
from typing import NamedTuple

import pytest
import torch

from megatron_helix import l2_residency as l2
from megatron_helix.l2_residency import (
    AccessPolicyWindow,
    CtypesCudart,
    CudaRuntimeError,
    StreamAttrValue,
    default_runtime,
    flatten_parameters,
    l2_persisting,
    l2_resident,
)

MiB = 2**20


# cuda.bindings.runtime's enums as far as used, with the values cuda-bindings 12.9 and 13.5 give.
class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidResourceHandle = 400


ERROR_STRINGS = {cudaError_t.cudaErrorInvalidDevice: b"invalid device ordinal",
                 cudaError_t.cudaErrorInvalidResourceHandle: b"invalid resource handle"}


class cudaDeviceAttr(enum.IntEnum):
    cudaDevAttrMaxPersistingL2CacheSize = 108
    cudaDevAttrMaxAccessPolicyWindowSize = 109


class cudaLimit(enum.IntEnum):
    cudaLimitPersistingL2CacheSize = 6


class cudaStreamAttrID(enum.IntEnum):
    cudaLaunchAttributeAccessPolicyWindow = 1


class cudaAccessProperty(enum.IntEnum):
    cudaAccessPropertyNormal = 0
    cudaAccessPropertyStreaming = 1
    cudaAccessPropertyPersisting = 2


class Window(NamedTuple):
    """A stream's access-policy window as the fake device keeps it."""

    base_ptr: int = 0
    num_bytes: int = 0
    hitRatio: float = 0.0
    hitProp: str = "cudaAccessPropertyNormal"
    missProp: str = "cudaAccessPropertyNormal"


PERSISTING, STREAMING = "cudaAccessPropertyPersisting", "cudaAccessPropertyStreaming"
PERSISTING_L2 = "cudaLimitPersistingL2CacheSize"


def read_window(native) -> Window:
    """The window in a native ``cudaAccessPolicyWindow`` of either back end."""
    return Window(native.base_ptr or 0, native.num_bytes, round(native.hitRatio, 6),
                  cudaAccessProperty(native.hitProp).name,
                  cudaAccessProperty(native.missProp).name)


def write_window(native, window: Window) -> None:
    native.base_ptr, native.num_bytes, native.hitRatio = window[:3]
    native.hitProp = cudaAccessProperty[window.hitProp]
    native.missProp = cudaAccessProperty[window.missProp]


class FakeDevice:
    """Records every call by its CUDA names; answers like an H100 (37.5 MiB set-aside, window up
    to 128 MiB). ``fail`` maps a call's name to the error it returns instead of succeeding."""

    def __init__(self, max_set_aside=39_321_600, max_window=128 * MiB, limit=0):
        self.calls = []
        self.attributes = {
            "cudaDevAttrMaxPersistingL2CacheSize": max_set_aside,
            "cudaDevAttrMaxAccessPolicyWindowSize": max_window,
        }
        self.limit = limit
        self.windows = {}
        self.fail = {}

    def _status(self, name):
        return self.fail.get(name, cudaError_t.cudaSuccess)

    def attribute(self, attr, device):
        self.calls.append(("attribute", cudaDeviceAttr(attr).name, device))
        return self._status("cudaDeviceGetAttribute"), self.attributes[cudaDeviceAttr(attr).name]

    def get_limit(self, limit):
        self.calls.append(("get_limit", cudaLimit(limit).name))
        return self._status("cudaDeviceGetLimit"), self.limit

    def set_limit(self, limit, value):
        self.calls.append(("set_limit", cudaLimit(limit).name, value))
        status = self._status("cudaDeviceSetLimit")
        if status == cudaError_t.cudaSuccess:
            self.limit = value
        return status

    def get_window(self, stream, attr):
        assert attr == cudaStreamAttrID.cudaLaunchAttributeAccessPolicyWindow
        self.calls.append(("get_window", stream))
        return self._status("cudaStreamGetAttribute"), self.windows.get(stream, Window())

    def set_window(self, stream, attr, window):
        assert attr == cudaStreamAttrID.cudaLaunchAttributeAccessPolicyWindow
        self.calls.append(("set_window", stream, window))
        status = self._status("cudaStreamSetAttribute")
        if status == cudaError_t.cudaSuccess:
            self.windows[stream] = window
        return status

    def reset(self):
        self.calls.append(("reset",))
        return self._status("cudaCtxResetPersistingL2Cache")


class FakePolicyWindow:
    """``cudaAccessPolicyWindow`` of cuda.bindings: plain fields, an empty window at first."""

    def __init__(self):
        write_window(self, Window())


class FakeStreamAttrValue:
    def __init__(self):
        self.accessPolicyWindow = FakePolicyWindow()


def typed(value, enum_type):
    """cuda.bindings takes its enums' members; a bare number would be a mistake here."""
    assert isinstance(value, enum_type), f"{value!r} is not a {enum_type.__name__}"
    return value


def fake_cuda_bindings(device: FakeDevice) -> types.ModuleType:
    """A ``cuda.bindings.runtime`` module over ``device``: same names, same return tuples."""
    runtime = types.ModuleType("cuda.bindings.runtime")
    for enum_type in (cudaError_t, cudaDeviceAttr, cudaLimit, cudaStreamAttrID,
                      cudaAccessProperty):
        setattr(runtime, enum_type.__name__, enum_type)
    runtime.cudaStreamAttrValue = FakeStreamAttrValue

    def get_attribute(stream, attr):
        status, window = device.get_window(stream, typed(attr, cudaStreamAttrID))
        value = FakeStreamAttrValue()
        write_window(value.accessPolicyWindow, window)
        return status, value

    def set_attribute(stream, attr, value):
        assert isinstance(stream, int) and isinstance(value, FakeStreamAttrValue)
        window = read_window(value.accessPolicyWindow)
        return (device.set_window(stream, typed(attr, cudaStreamAttrID), window),)

    runtime.cudaDeviceGetAttribute = lambda attr, dev: device.attribute(
        typed(attr, cudaDeviceAttr), dev)
    runtime.cudaDeviceGetLimit = lambda limit: device.get_limit(typed(limit, cudaLimit))
    runtime.cudaDeviceSetLimit = lambda limit, value: (
        device.set_limit(typed(limit, cudaLimit), value),)
    runtime.cudaStreamGetAttribute = get_attribute
    runtime.cudaStreamSetAttribute = set_attribute
    runtime.cudaCtxResetPersistingL2Cache = lambda: (device.reset(),)
    runtime.cudaGetErrorName = lambda error: (cudaError_t.cudaSuccess,
                                              typed(error, cudaError_t).name.encode())
    runtime.cudaGetErrorString = lambda error: (cudaError_t.cudaSuccess, ERROR_STRINGS[error])
    return runtime


def fake_libcudart(device: FakeDevice) -> types.SimpleNamespace:
    """libcudart's C functions over ``device``, as ``ctypes`` calls them: outputs through
    ``byref`` pointers, status codes returned, error names as bytes."""

    def get_attribute(stream, attr, value):
        status, window = device.get_window(stream, attr)
        write_window(value._obj.accessPolicyWindow, window)
        return status

    def output(status_and_value, pointer):
        pointer._obj.value = status_and_value[1]
        return status_and_value[0]

    return types.SimpleNamespace(
        cudaDeviceGetAttribute=lambda out, attr, dev: output(device.attribute(attr, dev), out),
        cudaDeviceGetLimit=lambda out, limit: output(device.get_limit(limit), out),
        cudaDeviceSetLimit=lambda limit, value: device.set_limit(limit, value),
        cudaStreamGetAttribute=get_attribute,
        cudaStreamSetAttribute=lambda stream, attr, value: device.set_window(
            stream, attr, read_window(value._obj.accessPolicyWindow)),
        cudaCtxResetPersistingL2Cache=lambda: device.reset(),
        cudaGetErrorName=lambda error: cudaError_t(error).name.encode(),
        cudaGetErrorString=lambda error: ERROR_STRINGS[error],
    )


def test_the_fake_enums_match_cuda_bindings():
    """Where cuda-bindings is installed (the GPU machines), the fake's names and values are its."""
    runtime = pytest.importorskip("cuda.bindings.runtime")
    for enum_type in (cudaError_t, cudaDeviceAttr, cudaLimit, cudaStreamAttrID,
                      cudaAccessProperty):
        real = getattr(runtime, enum_type.__name__)
        assert {member.name: int(getattr(real, member.name)) for member in enum_type} == {
            member.name: int(member) for member in enum_type}


@pytest.fixture(params=["cuda.bindings", "ctypes"])
def connect(request):
    """Makes the runtime of one back end over a fake device; every scenario runs with both."""
    if request.param == "cuda.bindings":
        return fake_cuda_bindings
    return lambda device: CtypesCudart(fake_libcudart(device))


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


def test_cuda_call_sequence_sets_and_restores(connect):
    fake = FakeDevice(limit=4 * MiB)
    previous = Window(0x7F00_0000_1000, MiB, 0.5, PERSISTING, "cudaAccessPropertyNormal")
    fake.windows[77] = previous
    buffer = torch.empty(24 * MiB, dtype=torch.uint8)
    with l2_persisting(buffer, stream=77, runtime=connect(fake)) as residency:
        assert residency.num_bytes == 24 * MiB and residency.hit_ratio == 1.0
        inside = list(fake.calls)
    assert inside == [
        ("attribute", "cudaDevAttrMaxPersistingL2CacheSize", 0),
        ("attribute", "cudaDevAttrMaxAccessPolicyWindowSize", 0),
        ("get_limit", PERSISTING_L2),
        ("get_window", 77),
        ("set_limit", PERSISTING_L2, 24 * MiB),
        ("set_window", 77, Window(buffer.data_ptr(), 24 * MiB, 1.0, PERSISTING, STREAMING)),
    ]
    assert fake.calls[len(inside):] == [
        ("set_window", 77, previous),  # the stream's previous window, field for field
        ("reset",),
        ("set_limit", PERSISTING_L2, 4 * MiB),
    ]
    assert fake.limit == 4 * MiB and fake.windows[77] == previous


def test_a_larger_limit_already_set_is_kept(connect):
    fake = FakeDevice(limit=32 * MiB)
    with l2_persisting(torch.empty(MiB, dtype=torch.uint8), stream=9, runtime=connect(fake)):
        assert fake.limit == 32 * MiB
    assert ("set_limit", PERSISTING_L2, 32 * MiB) in fake.calls


def test_buffer_larger_than_the_set_aside_gets_a_partial_hit_ratio(connect):
    fake = FakeDevice(max_set_aside=30 * MiB, max_window=40 * MiB)
    buffer = torch.empty(60 * MiB, dtype=torch.uint8)
    with l2_persisting(buffer, stream=5, runtime=connect(fake)) as residency:
        assert residency.num_bytes == 40 * MiB  # clamped to the largest window
        assert residency.set_aside_bytes == 30 * MiB
        assert residency.hit_ratio == pytest.approx(0.75)
        assert fake.windows[5].hitRatio == pytest.approx(0.75)
        assert fake.windows[5].num_bytes == 40 * MiB and fake.limit == 30 * MiB


def test_restores_on_exceptions_and_skips_devices_without_persisting_l2(connect):
    fake = FakeDevice()
    with pytest.raises(RuntimeError, match="boom"):
        with l2_persisting(torch.empty(1024, dtype=torch.uint8), stream=3, runtime=connect(fake)):
            raise RuntimeError("boom")
    assert fake.calls[-3:] == [("set_window", 3, Window()), ("reset",),
                               ("set_limit", PERSISTING_L2, 0)]
    assert fake.windows[3].num_bytes == 0
    old_gpu = FakeDevice(max_set_aside=0)
    with l2_persisting(torch.empty(1024, dtype=torch.uint8), stream=3,
                       runtime=connect(old_gpu)) as res:
        assert res is None
    assert not [call for call in old_gpu.calls if call[0].startswith("set")]


def test_runtime_errors_say_the_cuda_error_and_still_restore_the_limit(connect):
    fake = FakeDevice(limit=2 * MiB)
    fake.fail["cudaStreamSetAttribute"] = cudaError_t.cudaErrorInvalidResourceHandle
    expected = ("cudaStreamSetAttribute failed with cudaErrorInvalidResourceHandle "
                r"\(invalid resource handle\); stream 0 is the legacy default stream")
    with pytest.raises(CudaRuntimeError, match=expected):
        with l2_persisting(torch.empty(1024, dtype=torch.uint8), stream=0, runtime=connect(fake)):
            pytest.fail("the block must not run without its window")
    assert fake.calls[-2:] == [("reset",), ("set_limit", PERSISTING_L2, 2 * MiB)]
    assert fake.limit == 2 * MiB and 0 not in fake.windows

    no_device = FakeDevice()
    no_device.fail["cudaDeviceGetAttribute"] = cudaError_t.cudaErrorInvalidDevice
    with pytest.raises(CudaRuntimeError, match="cudaDeviceGetAttribute failed with "
                                               "cudaErrorInvalidDevice"):
        with l2_persisting(torch.empty(1024, dtype=torch.uint8), stream=3,
                           runtime=connect(no_device)):
            pytest.fail("unreachable")
    assert len(no_device.calls) == 1


def test_default_runtime_prefers_cuda_bindings(monkeypatch, caplog):
    runtime = fake_cuda_bindings(FakeDevice())
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = runtime
    monkeypatch.setitem(sys.modules, "cuda", types.ModuleType("cuda"))
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", runtime)
    assert default_runtime() is runtime

    monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # as if it were not installed
    lib = fake_libcudart(FakeDevice())
    monkeypatch.setattr(l2, "find_libcudart", lambda: "libcudart.so.12")
    monkeypatch.setattr(l2.ctypes, "CDLL", lambda path: lib if path == "libcudart.so.12" else None)
    with caplog.at_level(logging.INFO, logger=l2.__name__):
        fallback = default_runtime()
    assert isinstance(fallback, CtypesCudart) and fallback._lib is lib
    assert "cuda-bindings unavailable" in caplog.text
