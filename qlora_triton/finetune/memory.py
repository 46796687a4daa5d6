"""Peak memory of one phase, measured the same way for every phase.

Each fine-tuning phase runs in its own Python process (see ``train.py``), so
its peak is its own and not the high-water mark of an earlier phase.

* CUDA: ``torch.cuda.max_memory_allocated`` (bytes of tensors, the number the
  QLoRA paper's memory claims are about).
* CPU: the process's peak resident set size from ``resource.getrusage``. It
  includes the Python interpreter and the imported libraries (torch,
  transformers, peft: a few hundred MB that have nothing to do with the
  model), so the phase also reports ``baseline`` (RSS after the imports,
  before the model is loaded) and ``delta = peak - baseline``: what the model,
  its optimizer state and activations added. On the CPU the NF4 reference
  path also dequantizes each weight for the duration of its matmul, so the
  weights' resident footprint (``weight_bytes``) is the fairer view of the
  4-bit saving there.
"""

from __future__ import annotations

import resource

import torch


def current_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    # Linux reports ru_maxrss in kilobytes.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """``start()`` at the beginning of a phase, ``result()`` at the end."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            self.baseline = current_rss_bytes()

    def result(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak, kind = torch.cuda.max_memory_allocated(self.device), "cuda_max_memory_allocated"
        else:
            peak, kind = peak_rss_bytes(), "cpu_peak_rss"
        return {"kind": kind, "peak_bytes": peak, "baseline_bytes": self.baseline,
                "delta_bytes": peak - self.baseline}


def available_bytes(device: torch.device) -> int:
    """Memory a new allocation can use now: free GPU memory, or MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def total_bytes(device: torch.device) -> int:
    """The device's whole memory: the GPU's, or MemTotal."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer or a memory reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
