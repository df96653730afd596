"""Free memory and accelerators of this machine, measured now (no new dependency: /proc, cgroups and torch)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom() -> int | None:
    """``memory.max - memory.current`` of this process's cgroup (v2) when it sets a limit, else None."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        return None


def host_available_bytes() -> int:
    """Host RAM a new allocation can get now: /proc/meminfo MemAvailable, capped by a cgroup limit; without
    /proc, free physical pages (``os.sysconf``)."""
    found = [v for v in (_meminfo_available(), _cgroup_headroom()) if v is not None]
    if not found:
        found = [os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
    return min(found)


def device_available_bytes(device: str | torch.device) -> int | None:
    """Free memory of ``device``: ``torch.cuda.mem_get_info`` on CUDA, host RAM on cpu, None where unknown (mps)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        return host_available_bytes()
    return None


def accelerator_count(accelerator: str) -> int | None:
    """Visible devices of a Lightning accelerator name (``gpu``/``cuda``/``mps``); None for cpu, auto and others."""
    if accelerator in ("gpu", "cuda"):
        return torch.cuda.device_count()
    if accelerator == "mps":
        return int(torch.backends.mps.is_available())
    return None
