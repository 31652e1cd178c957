"""Measurements shared by the benchmark scripts: the median time of repeated calls
(synchronizing the GPU around each call so queued kernels are counted) and the peak
memory of one call."""

from __future__ import annotations

import resource
import statistics
import threading
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device: torch.device, repeats: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rss() -> int:
    """Resident memory of this process, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def heap_in_use() -> int:
    """Bytes the C allocator has handed out and not taken back (glibc's mallinfo2: heap
    blocks in use plus mmapped blocks); resident memory where that is unavailable. Unlike
    resident memory it does not depend on when freed pages are returned to the system."""
    global _mallinfo2
    if _mallinfo2 is None:
        try:
            import ctypes

            class Info(ctypes.Structure):
                _fields_ = [(name, ctypes.c_size_t) for name in (
                    "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                    "keepcost")]
            fn = ctypes.CDLL("libc.so.6").mallinfo2
            fn.restype = Info
            _mallinfo2 = fn
        except (OSError, AttributeError):
            _mallinfo2 = False
    if not _mallinfo2:
        return rss()
    info = _mallinfo2()
    return info.uordblks + info.hblkhd


_mallinfo2 = None


def peak_memory(fn, device: torch.device) -> int:
    """Peak memory of one call of ``fn`` above what was in use before it: the allocator's
    peak on CUDA, the C heap in use (:func:`heap_in_use`) sampled every millisecond on
    the CPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - base
    base, high, done = heap_in_use(), [0], threading.Event()

    def sample():
        while not done.is_set():
            high[0] = max(high[0], heap_in_use())
            time.sleep(0.001)
    thread = threading.Thread(target=sample)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return high[0] - base
