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


def peak_memory(fn, device: torch.device) -> int:
    """Peak memory of one call of ``fn`` above what was in use before it: the allocator's
    peak on CUDA, resident memory sampled every millisecond on the CPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - base
    base, high, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            high[0] = max(high[0], rss())
            time.sleep(0.001)
    thread = threading.Thread(target=sample)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return high[0] - base
