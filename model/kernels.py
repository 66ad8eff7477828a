"""The one place that decides between CUDA kernels and the PyTorch reference paths.

`model.kernels` is `auto` (kernel when it imports and the tensor is on CUDA, else the
reference with one warning), `reference` (always the reference) or `cuda` (kernel or
a clear error). Each block asks `use_kernel(mode, library, device)` once per forward.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

logger = logging.getLogger("braid.kernels")

# library key -> (module to import, pip name)
KERNEL_LIBRARIES = {
    "mamba_ssm": ("mamba_ssm", "mamba-ssm"),
    "causal_conv1d": ("causal_conv1d", "causal-conv1d"),
    "flash_attn": ("flash_attn", "flash-attn"),
    "fla": ("fla", "flash-linear-attention"),
}


class KernelUnavailable(RuntimeError):
    """model.kernels=cuda asked for a kernel that cannot run here."""


@functools.lru_cache(maxsize=None)
def kernel_importable(library: str) -> bool:
    try:
        importlib.import_module(KERNEL_LIBRARIES[library][0])
        return True
    except Exception:  # a broken CUDA build raises more than ImportError
        return False


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    """One log line per distinct message and process, on rank 0 only (every rank falls back alike): a
    Python warning would print the calling source line under it, at every forward's first call site."""
    if os.environ.get("RANK", "0") == "0":
        logger.warning(message)


def kernel(module: str, name: str):
    """`name` from an optional kernel library, imported on first use.

    Through importlib rather than an import statement: Hugging Face's remote-code loader
    requires every library named in an import statement, and the exported model must load
    without the CUDA kernels installed.
    """
    return getattr(importlib.import_module(module), name)


def use_kernel(mode: str, libraries: tuple[str, ...], device: torch.device) -> bool:
    """True when the fast path of `libraries` should run for tensors on `device`."""
    if mode == "reference":
        return False
    missing = [lib for lib in libraries if not kernel_importable(lib)]
    if device.type == "cuda" and not missing:
        return True
    if device.type != "cuda":
        reason = f"tensors are on {device.type}, the kernels need CUDA"
    else:
        reason = "not importable: " + ", ".join(
            f"{KERNEL_LIBRARIES[lib][0]} (pip install {KERNEL_LIBRARIES[lib][1]}, or braid[cuda])" for lib in missing)
    if mode == "cuda":
        raise KernelUnavailable(f"model.kernels=cuda: {'/'.join(libraries)} {reason}; "
                                "use model.kernels=auto or reference to run the PyTorch path")
    if device.type != "cuda":           # the same for every kernel family: one line says it
        _warn_once(f"model.kernels=auto: {reason}; every block runs its PyTorch reference path")
    else:
        _warn_once(f"model.kernels=auto: {'/'.join(libraries)} {reason}; using the PyTorch reference path")
    return False
