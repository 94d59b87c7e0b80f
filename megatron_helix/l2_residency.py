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

The runtime is reached through ``ctypes`` on the ``libcudart`` torch already uses; tests inject a
fake ``CudaRuntime``. Without CUDA everything here is a logged no-op.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import logging
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Protocol

import torch

logger = logging.getLogger(__name__)

# driver_types.h (CUDA 11.0+; unchanged in 12.x and 13.x)
CUDA_LIMIT_PERSISTING_L2_CACHE_SIZE = 0x06
CUDA_DEV_ATTR_MAX_PERSISTING_L2_CACHE_SIZE = 108
CUDA_DEV_ATTR_MAX_ACCESS_POLICY_WINDOW_SIZE = 109
CUDA_STREAM_ATTRIBUTE_ACCESS_POLICY_WINDOW = 1  # cudaLaunchAttributeAccessPolicyWindow
CUDA_ACCESS_PROPERTY_NORMAL = 0
CUDA_ACCESS_PROPERTY_STREAMING = 1
CUDA_ACCESS_PROPERTY_PERSISTING = 2

PARAMETER_ALIGNMENT = 256  # bytes: keeps every view aligned for vectorised loads and cuBLAS


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


class CudaRuntimeError(RuntimeError):
    """A CUDA runtime call failed or the runtime library could not be found."""


class CudaRuntime(Protocol):
    """The CUDA runtime calls L2 residency needs (``Cudart``, or a fake in tests)."""

    def device_attribute(self, attribute: int, device: int) -> int: ...

    def get_limit(self, limit: int) -> int: ...

    def set_limit(self, limit: int, value: int) -> None: ...

    def get_stream_window(self, stream: int) -> AccessPolicyWindow: ...

    def set_stream_window(self, stream: int, window: AccessPolicyWindow) -> None: ...

    def reset_persisting_l2_cache(self) -> None: ...


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


class Cudart:
    """The CUDA runtime through ``ctypes``: the documented calls above, each status-checked."""

    def __init__(self, path: Optional[str] = None):
        self.path = path or find_libcudart()
        lib = ctypes.CDLL(self.path)
        signatures = {
            "cudaDeviceGetAttribute": [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int],
            "cudaDeviceGetLimit": [ctypes.POINTER(ctypes.c_size_t), ctypes.c_int],
            "cudaDeviceSetLimit": [ctypes.c_int, ctypes.c_size_t],
            "cudaStreamGetAttribute": [ctypes.c_void_p, ctypes.c_int,
                                       ctypes.POINTER(StreamAttrValue)],
            "cudaStreamSetAttribute": [ctypes.c_void_p, ctypes.c_int,
                                       ctypes.POINTER(StreamAttrValue)],
            "cudaCtxResetPersistingL2Cache": [],
        }
        for name, argtypes in signatures.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = ctypes.c_int  # cudaError_t
        lib.cudaGetErrorString.argtypes = [ctypes.c_int]
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        self._lib = lib

    def _call(self, name: str, *args, hint: str = "") -> None:
        status = getattr(self._lib, name)(*args)
        if status:
            message = self._lib.cudaGetErrorString(status).decode()
            raise CudaRuntimeError(f"{name} failed with error {status} ({message}){hint}")

    def device_attribute(self, attribute: int, device: int) -> int:
        value = ctypes.c_int()
        self._call("cudaDeviceGetAttribute", ctypes.byref(value), attribute, device)
        return value.value

    def get_limit(self, limit: int) -> int:
        value = ctypes.c_size_t()
        self._call("cudaDeviceGetLimit", ctypes.byref(value), limit)
        return value.value

    def set_limit(self, limit: int, value: int) -> None:
        self._call("cudaDeviceSetLimit", limit, value)

    def get_stream_window(self, stream: int) -> AccessPolicyWindow:
        value = StreamAttrValue()
        self._call("cudaStreamGetAttribute", ctypes.c_void_p(stream),
                   CUDA_STREAM_ATTRIBUTE_ACCESS_POLICY_WINDOW, ctypes.byref(value))
        return value.accessPolicyWindow

    def set_stream_window(self, stream: int, window: AccessPolicyWindow) -> None:
        value = StreamAttrValue()
        value.accessPolicyWindow = window
        hint = ("; stream 0 is the legacy default stream: run the stage under "
                "torch.cuda.stream(torch.cuda.Stream())") if stream == 0 else ""
        self._call("cudaStreamSetAttribute", ctypes.c_void_p(stream),
                   CUDA_STREAM_ATTRIBUTE_ACCESS_POLICY_WINDOW, ctypes.byref(value), hint=hint)

    def reset_persisting_l2_cache(self) -> None:
        self._call("cudaCtxResetPersistingL2Cache")


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
        runtime: the CUDA runtime; default ``Cudart()`` for CUDA buffers. A fake runtime in tests
            needs an explicit ``stream``.

    Yields the ``L2Residency`` set, or None when it is a no-op (no CUDA, or a device without
    persisting L2). Restores the previous window and limit on exit, exceptions included.
    """
    if runtime is None:
        if not buffer.is_cuda:
            logger.info("L2 residency skipped: no CUDA device (buffer on %s)", buffer.device)
            yield None
            return
        runtime = Cudart()
    if not buffer.is_contiguous():
        raise ValueError("the access-policy window covers one contiguous range: flatten first")
    device = buffer.device.index if buffer.is_cuda else 0
    if stream is None:
        stream = torch.cuda.current_stream(buffer.device).cuda_stream
    max_set_aside = runtime.device_attribute(CUDA_DEV_ATTR_MAX_PERSISTING_L2_CACHE_SIZE, device)
    if max_set_aside == 0:
        logger.info("L2 residency skipped: device %d has no persisting L2 (compute capability "
                    "below 8.0)", device)
        yield None
        return
    max_window = runtime.device_attribute(CUDA_DEV_ATTR_MAX_ACCESS_POLICY_WINDOW_SIZE, device)
    buffer_bytes = buffer.numel() * buffer.element_size()
    window_bytes = min(buffer_bytes, max_window)
    set_aside = min(window_bytes, max_set_aside)
    ratio = min(1.0, set_aside / window_bytes) if hit_ratio is None else hit_ratio
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"hit_ratio must be in (0, 1], got {ratio}")

    old_limit = runtime.get_limit(CUDA_LIMIT_PERSISTING_L2_CACHE_SIZE)
    old_window = runtime.get_stream_window(stream)
    window = AccessPolicyWindow(
        base_ptr=buffer.data_ptr(),
        num_bytes=window_bytes,
        hitRatio=ratio,
        hitProp=CUDA_ACCESS_PROPERTY_PERSISTING,
        missProp=CUDA_ACCESS_PROPERTY_STREAMING,
    )
    # Never shrink a larger set-aside someone else configured; it is restored on exit anyway.
    runtime.set_limit(CUDA_LIMIT_PERSISTING_L2_CACHE_SIZE, max(old_limit, set_aside))
    try:
        runtime.set_stream_window(stream, window)
        try:
            yield L2Residency(buffer.data_ptr(), window_bytes, set_aside, ratio, buffer_bytes)
        finally:
            runtime.set_stream_window(stream, old_window)
    finally:
        runtime.reset_persisting_l2_cache()
        runtime.set_limit(CUDA_LIMIT_PERSISTING_L2_CACHE_SIZE, old_limit)


@contextlib.contextmanager
def l2_resident(
    module: torch.nn.Module, stream: Optional[int] = None, runtime: Optional[CudaRuntime] = None
) -> Iterator[Optional[L2Residency]]:
    """Flatten ``module``'s parameters into one buffer and keep it persisting in L2 inside the
    block (see ``l2_persisting``). The parameters stay in that buffer afterwards."""
    with l2_persisting(flatten_parameters(module), stream=stream, runtime=runtime) as residency:
        yield residency
