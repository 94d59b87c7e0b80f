"""Keep a pipeline stage's weights in L2 with CUDA's persisting access-policy window.

Why: a decode-like step reads every weight of the stage once; between steps the KV cache,
activations and other kernels stream through L2 and evict them, so each step fetches the weights
from HBM again. Since compute capability 8.0 a process can set aside part of L2 for persisting
accesses (``cudaDeviceSetLimit(cudaLimitPersistingL2CacheSize, bytes)``) and mark one address
range per stream as persisting (``cudaStreamSetAttribute`` with a ``cudaAccessPolicyWindow``):
hits in the window use the set-aside and normal traffic cannot evict them.

A window is one contiguous range, so ``flatten_parameters`` first moves a module's parameters
into one buffer (``param.data`` becomes a view of it). ``l2_persisting`` then sets the limit and
the window, and on exit restores the previous window, drops the persisting lines
(``cudaCtxResetPersistingL2Cache``) and restores the previous limit -- the sequence the CUDA
programming guide gives. Sizes come from the device: the set-aside is at most
``cudaDevAttrMaxPersistingL2CacheSize`` (37.5 MiB of the 50 MiB L2 reported for an H100 80GB
HBM3) and the window at most ``cudaDevAttrMaxAccessPolicyWindowSize``; when the window is larger
than the set-aside, ``hitRatio = set-aside / window`` marks a random subset of the window's lines
persisting instead of letting them thrash the set-aside.

The runtime is NVIDIA's typed ``cuda.bindings.runtime`` (package ``cuda-bindings``) where it is
installed. Elsewhere ``CtypesCudart`` offers the same few calls, enums and structs on the
``libcudart`` torch already uses, through ``ctypes`` with hand-declared structs: a fallback that
keeps machines without cuda-bindings working. ``l2_persisting`` speaks only the cuda-bindings API,
so one code path serves both, and tests drive both with the same fake device. Without CUDA
everything here is a logged no-op.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import enum
import glob
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Protocol, Tuple

import torch

logger = logging.getLogger(__name__)

PARAMETER_ALIGNMENT = 256  # bytes: keeps every view aligned for vectorised loads and cuBLAS
_DEFAULT_STREAM_HINT = ("; stream 0 is the legacy default stream: run the stage under "
                       "torch.cuda.stream(torch.cuda.Stream())")


class CudaRuntimeError(RuntimeError):
    """A CUDA runtime call failed or the runtime library could not be found."""


class CudaRuntime(Protocol):
    """The part of ``cuda.bindings.runtime`` L2 residency uses; ``CtypesCudart`` provides it too.

    Each call returns a tuple whose first element is a ``cudaError_t``, then its results.
    """

    cudaError_t: Any
    cudaDeviceAttr: Any
    cudaLimit: Any
    cudaStreamAttrID: Any
    cudaAccessProperty: Any
    cudaStreamAttrValue: Any

    def cudaDeviceGetAttribute(self, attr: Any, device: int) -> Tuple[Any, int]: ...

    def cudaDeviceGetLimit(self, limit: Any) -> Tuple[Any, int]: ...

    def cudaDeviceSetLimit(self, limit: Any, value: int) -> Tuple[Any]: ...

    def cudaStreamGetAttribute(self, stream: int, attr: Any) -> Tuple[Any, Any]: ...

    def cudaStreamSetAttribute(self, stream: int, attr: Any, value: Any) -> Tuple[Any]: ...

    def cudaCtxResetPersistingL2Cache(self) -> Tuple[Any]: ...

    def cudaGetErrorName(self, error: Any) -> Tuple[Any, bytes]: ...

    def cudaGetErrorString(self, error: Any) -> Tuple[Any, bytes]: ...


def default_runtime() -> CudaRuntime:
    """``cuda.bindings.runtime`` where cuda-bindings is installed, else ``CtypesCudart()``."""
    try:
        from cuda.bindings import runtime
    except ImportError as error:
        logger.info("cuda-bindings unavailable (%s): reaching libcudart through ctypes", error)
        return CtypesCudart()
    return runtime


def _call(runtime: CudaRuntime, name: str, *args: Any, hint: str = "") -> Any:
    """``runtime.<name>(*args)``'s result (None when it has none); a failure raises with the
    CUDA error's name, since the number alone means little."""
    error, *results = getattr(runtime, name)(*args)
    if error != runtime.cudaError_t.cudaSuccess:
        error_name = runtime.cudaGetErrorName(error)[1].decode()
        message = runtime.cudaGetErrorString(error)[1].decode()
        raise CudaRuntimeError(f"{name} failed with {error_name} ({message}){hint}")
    return results[0] if results else None


class AccessPolicyWindow(ctypes.Structure):
    """``struct cudaAccessPolicyWindow``: 8 + 8 + 4 + 4 + 4 bytes, padded to 32."""

    _fields_ = [
        ("base_ptr", ctypes.c_void_p),
        ("num_bytes", ctypes.c_size_t),
        ("hitRatio", ctypes.c_float),
        ("hitProp", ctypes.c_int),  # enum cudaAccessProperty
        ("missProp", ctypes.c_int),
    ]


class StreamAttrValue(ctypes.Union):
    """``cudaStreamAttrValue`` (= ``union cudaLaunchAttributeValue``, 64 bytes since CUDA 12).

    The runtime may read or write the whole union, so it is passed at its full size.
    """

    _fields_ = [("pad", ctypes.c_char * 64), ("accessPolicyWindow", AccessPolicyWindow)]


def find_libcudart() -> str:
    """Path of libcudart: the one already mapped into this process (torch's), else one shipped
    in torch's or the ``nvidia`` wheels' ``lib`` folders, else the system's."""
    with contextlib.suppress(OSError):
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libcudart.so"):
                    return path
    site = os.path.dirname(os.path.dirname(torch.__file__))
    for pattern in ("torch/lib/libcudart*.so*", "nvidia/*/lib/libcudart.so*"):
        found = sorted(glob.glob(os.path.join(site, pattern)))
        if found:
            return found[-1]
    system = ctypes.util.find_library("cudart")
    if system:
        return system
    raise CudaRuntimeError("libcudart not found in this process, torch's wheels or the system")


class CtypesCudart:
    """``CudaRuntime`` on libcudart through ``ctypes``: the fallback without cuda-bindings.

    Names and return tuples copy ``cuda.bindings.runtime``'s so that this can stand in for it.
    The enums hold only the members used, with the values of ``driver_types.h`` (CUDA 11.0+,
    unchanged in 12.x and 13.x).
    """

    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0

    class cudaDeviceAttr(enum.IntEnum):
        cudaDevAttrMaxPersistingL2CacheSize = 108
        cudaDevAttrMaxAccessPolicyWindowSize = 109

    class cudaLimit(enum.IntEnum):
        cudaLimitPersistingL2CacheSize = 0x06

    class cudaStreamAttrID(enum.IntEnum):
        cudaLaunchAttributeAccessPolicyWindow = 1

    class cudaAccessProperty(enum.IntEnum):
        cudaAccessPropertyStreaming = 1
        cudaAccessPropertyPersisting = 2

    cudaStreamAttrValue = StreamAttrValue

    def __init__(self, lib: Optional[Any] = None):
        """``lib``: the loaded libcudart (a fake in tests); default ``find_libcudart()``'s."""
        lib = lib if lib is not None else ctypes.CDLL(find_libcudart())
        attr_value = ctypes.POINTER(StreamAttrValue)
        signatures = {
            "cudaDeviceGetAttribute": [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int],
            "cudaDeviceGetLimit": [ctypes.POINTER(ctypes.c_size_t), ctypes.c_int],
            "cudaDeviceSetLimit": [ctypes.c_int, ctypes.c_size_t],
            "cudaStreamGetAttribute": [ctypes.c_void_p, ctypes.c_int, attr_value],
            "cudaStreamSetAttribute": [ctypes.c_void_p, ctypes.c_int, attr_value],
            "cudaCtxResetPersistingL2Cache": [],
        }
        for name, argtypes in signatures.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = ctypes.c_int  # cudaError_t
        for name in ("cudaGetErrorName", "cudaGetErrorString"):
            getattr(lib, name).argtypes = [ctypes.c_int]
            getattr(lib, name).restype = ctypes.c_char_p
        self._lib = lib

    def cudaDeviceGetAttribute(self, attr: int, device: int) -> Tuple[int, int]:
        value = ctypes.c_int()
        return self._lib.cudaDeviceGetAttribute(ctypes.byref(value), attr, device), value.value

    def cudaDeviceGetLimit(self, limit: int) -> Tuple[int, int]:
        value = ctypes.c_size_t()
        return self._lib.cudaDeviceGetLimit(ctypes.byref(value), limit), value.value

    def cudaDeviceSetLimit(self, limit: int, value: int) -> Tuple[int]:
        return (self._lib.cudaDeviceSetLimit(limit, value),)

    def cudaStreamGetAttribute(self, stream: int, attr: int) -> Tuple[int, StreamAttrValue]:
        value = StreamAttrValue()
        return self._lib.cudaStreamGetAttribute(stream, attr, ctypes.byref(value)), value

    def cudaStreamSetAttribute(self, stream: int, attr: int, value: StreamAttrValue) -> Tuple[int]:
        return (self._lib.cudaStreamSetAttribute(stream, attr, ctypes.byref(value)),)

    def cudaCtxResetPersistingL2Cache(self) -> Tuple[int]:
        return (self._lib.cudaCtxResetPersistingL2Cache(),)

    def cudaGetErrorName(self, error: int) -> Tuple[int, bytes]:
        return self.cudaError_t.cudaSuccess, self._lib.cudaGetErrorName(error)

    def cudaGetErrorString(self, error: int) -> Tuple[int, bytes]:
        return self.cudaError_t.cudaSuccess, self._lib.cudaGetErrorString(error)


def flatten_parameters(
    module: torch.nn.Module, alignment: int = PARAMETER_ALIGNMENT
) -> torch.Tensor:
    """Move ``module``'s parameters into one contiguous byte buffer; return the buffer.

    Each parameter's ``.data`` becomes a view of the buffer at an ``alignment``-byte offset, so
    values, shapes, dtypes and autograd identity are unchanged. Shared parameters are moved
    once. Call it before an optimizer or a wrapper takes its own views of the storage (Megatron's
    DistributedDataParallel keeps its own contiguous buffer: pin that one instead).
    """
    params = list({id(p): p for p in module.parameters()}.values())
    if not params:
        raise ValueError(f"{type(module).__name__} has no parameters to flatten")
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"parameters span several devices {sorted(map(str, devices))}")
    sizes = [p.numel() * p.element_size() for p in params]
    padded = [_ceil_to(size, alignment) for size in sizes]
    buffer = torch.empty(sum(padded), dtype=torch.uint8, device=devices.pop())
    offset = 0
    for param, size, step in zip(params, sizes, padded):
        view = buffer[offset:offset + size].view(param.dtype).view(param.shape)
        view.copy_(param.data)
        param.data = view
        offset += step
    return buffer


def _ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class L2Residency:
    """What ``l2_persisting`` set: the window (``base_ptr``, ``num_bytes``), the set-aside and
    the hit ratio; ``buffer_bytes - num_bytes`` bytes past the window's limit stay normal."""

    base_ptr: int
    num_bytes: int
    set_aside_bytes: int
    hit_ratio: float
    buffer_bytes: int


@contextlib.contextmanager
def l2_persisting(
    buffer: torch.Tensor,
    stream: Optional[int] = None,
    hit_ratio: Optional[float] = None,
    runtime: Optional[CudaRuntime] = None,
) -> Iterator[Optional[L2Residency]]:
    """Mark ``buffer`` persisting in L2 for kernels launched on ``stream`` inside the block.

    Args:
        buffer: a contiguous tensor, e.g. from ``flatten_parameters``.
        stream: raw ``cudaStream_t`` handle (``torch.cuda.Stream().cuda_stream``); defaults to
            the current stream of the buffer's device. Use a created stream: the legacy default
            stream (handle 0) may refuse attributes.
        hit_ratio: fraction of the window's lines to mark persisting; default
            ``min(1, set-aside / window bytes)``.
        runtime: the CUDA runtime; default ``default_runtime()`` for CUDA buffers. A fake runtime
            in tests needs an explicit ``stream``.

    Yields the ``L2Residency`` set, or None when it is a no-op (no CUDA, or a device without
    persisting L2). Restores the previous window and limit on exit, exceptions included.
    """
    if runtime is None:
        if not buffer.is_cuda:
            logger.info("L2 residency skipped: no CUDA device (buffer on %s)", buffer.device)
            yield None
            return
        runtime = default_runtime()
    if not buffer.is_contiguous():
        raise ValueError("the access-policy window covers one contiguous range: flatten first")
    device = buffer.device.index if buffer.is_cuda else 0
    if stream is None:
        stream = torch.cuda.current_stream(buffer.device).cuda_stream
    attribute = runtime.cudaDeviceAttr
    max_set_aside = _call(runtime, "cudaDeviceGetAttribute",
                          attribute.cudaDevAttrMaxPersistingL2CacheSize, device)
    if max_set_aside == 0:
        logger.info("L2 residency skipped: device %d has no persisting L2 (compute capability "
                    "below 8.0)", device)
        yield None
        return
    max_window = _call(runtime, "cudaDeviceGetAttribute",
                       attribute.cudaDevAttrMaxAccessPolicyWindowSize, device)
    buffer_bytes = buffer.numel() * buffer.element_size()
    window_bytes = min(buffer_bytes, max_window)
    set_aside = min(window_bytes, max_set_aside)
    ratio = min(1.0, set_aside / window_bytes) if hit_ratio is None else hit_ratio
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"hit_ratio must be in (0, 1], got {ratio}")

    limit = runtime.cudaLimit.cudaLimitPersistingL2CacheSize
    window_id = runtime.cudaStreamAttrID.cudaLaunchAttributeAccessPolicyWindow
    old_limit = _call(runtime, "cudaDeviceGetLimit", limit)
    old_window = _call(runtime, "cudaStreamGetAttribute", stream, window_id)
    window = _persisting_window(runtime, buffer.data_ptr(), window_bytes, ratio)
    # Never shrink a larger set-aside someone else configured; it is restored on exit anyway.
    _call(runtime, "cudaDeviceSetLimit", limit, max(old_limit, set_aside))
    try:
        _call(runtime, "cudaStreamSetAttribute", stream, window_id, window,
              hint=_DEFAULT_STREAM_HINT if stream == 0 else "")
        try:
            yield L2Residency(buffer.data_ptr(), window_bytes, set_aside, ratio, buffer_bytes)
        finally:
            _call(runtime, "cudaStreamSetAttribute", stream, window_id, old_window)
    finally:
        _call(runtime, "cudaCtxResetPersistingL2Cache")
        _call(runtime, "cudaDeviceSetLimit", limit, old_limit)


def _persisting_window(runtime: CudaRuntime, base_ptr: int, num_bytes: int,
                       hit_ratio: float) -> Any:
    """A ``cudaStreamAttrValue`` whose window marks ``hit_ratio`` of the range's lines
    persisting and lets the rest stream (misses do not evict the set-aside)."""
    value = runtime.cudaStreamAttrValue()
    window = value.accessPolicyWindow  # a view into ``value`` in both back ends
    window.base_ptr, window.num_bytes, window.hitRatio = base_ptr, num_bytes, hit_ratio
    window.hitProp = runtime.cudaAccessProperty.cudaAccessPropertyPersisting
    window.missProp = runtime.cudaAccessProperty.cudaAccessPropertyStreaming
    return value


@contextlib.contextmanager
def l2_resident(
    module: torch.nn.Module, stream: Optional[int] = None, runtime: Optional[CudaRuntime] = None
) -> Iterator[Optional[L2Residency]]:
    """Flatten ``module``'s parameters into one buffer and keep it persisting in L2 inside the
    block (see ``l2_persisting``). The parameters stay in that buffer afterwards."""
    with l2_persisting(flatten_parameters(module), stream=stream, runtime=runtime) as residency:
        yield residency
