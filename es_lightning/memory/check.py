"""Refuse work that will not fit, before it starts: stage estimates against free memory, model weights against the
chosen device, and ``trainer.devices`` against the visible accelerators. :func:`announce` is the one call per stage."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from es_lightning.memory.available import accelerator_count, device_available_bytes, host_available_bytes
from es_lightning.memory.estimate import StageEstimate, gib
from es_lightning.memory.shapes import ModelShape, read_shape
from es_lightning.models.loading import dtype_name

log = logging.getLogger(__name__)


def check_fits(
    estimate: StageEstimate,
    device: str | torch.device = "cpu",
    *,
    host_free: int | None = None,
    device_free: int | None = None,
    disk_path: str | Path | None = None,
) -> None:
    """Raise ``MemoryError`` naming the options that shrink the stage when ``estimate`` exceeds the free host RAM,
    the free memory of ``device`` (measured now unless ``host_free``/``device_free`` are given) or, with
    ``disk_path``, the free disk there."""
    device = torch.device(device)
    host_free = host_available_bytes() if host_free is None else host_free
    short = []
    if disk_path is not None and estimate.disk_bytes:
        disk_free = shutil.disk_usage(_existing(Path(disk_path))).free
        if estimate.disk_bytes > disk_free:
            short.append(f"disk {gib(estimate.disk_bytes)} > {gib(disk_free)} free under {disk_path}")
    if estimate.host_bytes > host_free:
        short.append(f"host RAM {gib(estimate.host_bytes)} > {gib(host_free)} available")
    if device.type != "cpu" and estimate.device_bytes:
        device_free = device_available_bytes(device) if device_free is None else device_free
        if device_free is not None and estimate.device_bytes > device_free:
            short.append(f"{device} memory {gib(estimate.device_bytes)} > {gib(device_free)} free")
    if short:
        fixes = "; ".join(estimate.fixes) or "a smaller configuration"
        raise MemoryError(
            f"The {estimate.stage} stage will not fit: it needs {' and '.join(short)} (dominant: {estimate.dominant}). "
            f"Fix: {fixes}."
        )


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def announce(
    estimate: StageEstimate, device: str | torch.device = "cpu", disk_path: str | Path | None = None
) -> StageEstimate:
    """Log ``estimate`` at INFO, then :func:`check_fits` it on ``device`` (and the disk at ``disk_path``); call right
    before the stage starts, with the device the estimate was made for."""
    log.info("Memory estimate, %s", estimate.format())
    check_fits(estimate, device, disk_path=disk_path)
    return estimate


def _requested(devices) -> int | None:
    """How many accelerators ``trainer.devices`` needs (the highest index + 1 for a list); None for auto / -1."""
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            return None
        devices = [int(p) for p in text.split(",") if p.strip()] if "," in text else int(text)
    if isinstance(devices, (list, tuple)):
        return max(int(d) for d in devices) + 1 if devices else 0
    return None if devices is None or int(devices) < 0 else int(devices)


def check_devices(accelerator: str, devices) -> None:
    """Raise ``ValueError`` when ``trainer.devices`` asks for more GPUs (or MPS devices) than are visible."""
    if not isinstance(accelerator, str):
        return
    found = accelerator_count(accelerator)
    wanted = _requested(devices)
    if found is None or (wanted is not None and wanted <= found) or (wanted is None and found > 0):
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None and accelerator != "mps" else ""
    raise ValueError(
        f"trainer.devices={devices} asks for {wanted if wanted is not None else 'at least one'} {accelerator} "
        f"device(s), but {found} are visible{where}. Fix: --trainer.devices {max(found, 1) if found else 1} "
        f"{'(or auto)' if found else 'with --trainer.accelerator cpu'}, or run where more are available."
    )


def check_weights_fit(
    shape: ModelShape, dtype: str, device: str | torch.device, option: str, free: int | None = None
) -> None:
    """Raise ``MemoryError`` when ``shape``'s weights in ``dtype`` exceed the free memory of ``device``; the message
    names ``option`` (the config key of the dtype) and a smaller model as fixes."""
    free = device_available_bytes(device) if free is None else free
    needed = shape.weight_bytes(dtype)
    if free is None or needed <= free:
        return
    half = f"{option}: bfloat16 (half the bytes), or " if dtype == "float32" else ""
    raise MemoryError(
        f"{shape.name} has {shape.parameters / 1e9:.2f}B parameters: {gib(needed)} in {dtype}, "
        f"but {torch.device(device)} "
        f"has {gib(free)} free. Fix: {half}a smaller model, or a device with more memory."
    )


def check_model_fits(directory: str, name: str, dtype: str, device: str | torch.device, option: str) -> None:
    """:func:`check_weights_fit` for a model directory (its config only) and a config dtype (``auto`` resolved for
    ``device`` as the loader does)."""
    check_weights_fit(read_shape(directory, name), dtype_name(dtype, device), device, option)
