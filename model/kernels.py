"""The one place that decides, per block and op, between a kernel and the PyTorch reference path.

`model.kernels` is `auto` (the first kernel of an op that can run, else the reference with one
warning naming the block, the op and the reason), `reference` (always the reference) or `cuda`
(a kernel or a `KernelUnavailable` naming the block, the op and the rule).

Each op of a block lists its kernels in order of preference (`Kernel`) with the shape rules its
call breaks (`select`); the first whose libraries import, whose runtime can run on the tensors'
device and whose rules hold is taken. A CUDA C++ library (causal-conv1d, flash-attn, mamba-ssm)
comes first where it applies; a Triton (fla-core, Braid's own) or torch-native kernel
(FlexAttention) is behind it, so a machine without the C++ builds still runs every block on a
kernel. Every choice is written to the block's `DispatchRecord` (a dict assignment per op and
forward), which `HybridLM.dispatch_record()` collects: tests and benchmarks assert on it.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger("braid.kernels")

# library key -> (module to import, pip name)
KERNEL_LIBRARIES = {
    "fla": ("fla", "fla-core"),
    "triton": ("triton", "triton"),
    "mamba_ssm": ("mamba_ssm", "mamba-ssm"),
    "causal_conv1d": ("causal_conv1d", "causal-conv1d"),
    "flash_attn": ("flash_attn", "flash-attn"),
    # Braid's own Triton kernels (a module of this package that imports triton; absent from the
    # exported remote code, where those blocks take their other kernels or the reference)
    "braid_triton": ("model.ops.triton_selective_scan", "triton"),
}

REFERENCE = "reference"

# Runtimes that may take CPU tensors. Triton kernels do under TRITON_INTERPRET=1 (Triton's CPU
# interpreter, for tests); tests with stand-ins for the CUDA C++ extensions add "cuda" and "torch".
CPU_RUNTIMES: set[str] = set()


class KernelUnavailable(RuntimeError, ValueError):
    """model.kernels=cuda asked for a kernel that cannot run here (a ValueError too: `braid`
    reports it in one line, as a configuration that does not fit the machine)."""


@dataclass(frozen=True)
class Kernel:
    name: str                       # what the dispatch record shows, e.g. "fla.chunk_gla"
    libraries: tuple[str, ...]      # keys of KERNEL_LIBRARIES
    runtime: str                    # "cuda" (a C++ extension), "triton" or "torch"


@functools.lru_cache(maxsize=None)
def kernel_importable(library: str) -> bool:
    try:
        importlib.import_module(KERNEL_LIBRARIES[library][0])
        return True
    except Exception:  # a broken CUDA build raises more than ImportError
        return False


def runs_on(runtime: str, device: torch.device) -> bool:
    """Whether kernels of `runtime` take tensors on `device`."""
    if device.type == "cuda" or runtime in CPU_RUNTIMES:
        return True
    return runtime == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


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


class DispatchRecord(dict):
    """op -> the kernel name (or "reference") it ran on in the block's last forward; `reasons`
    holds, per op, why a preferred kernel was passed over (empty when the first one ran)."""

    def __init__(self) -> None:
        super().__init__()
        self.reasons: dict[str, str] = {}


def select(mode: str, block: str, op: str, candidates: list[tuple[Kernel, str | None]], device: torch.device,
           record: DispatchRecord, continuing: bool = False) -> Kernel | None:
    """The kernel op `op` of `block` runs on, or None for the reference path.

    candidates: (kernel, broken rule or None) in order of preference. continuing: the forward
    continues a generation cache (a decode step or a chunk after a prefill), which no kernel takes.
    """
    if mode == REFERENCE:
        record[op] = REFERENCE
        record.reasons.pop(op, None)
        return None
    reasons = []
    if continuing:
        reasons.append("a cache continuation (decode step or chunked prefill) runs the reference step")
    else:
        for candidate, rule in candidates:
            # the device first: on a CPU, whether a library is installed does not change the answer
            missing = [lib for lib in candidate.libraries if not kernel_importable(lib)]
            if not runs_on(candidate.runtime, device):
                reason = f"tensors are on {device.type}, the kernel needs CUDA"
            elif missing:
                reason = "not importable: " + ", ".join(
                    f"{KERNEL_LIBRARIES[lib][0]} (pip install {KERNEL_LIBRARIES[lib][1]}, or braid[cuda])"
                    for lib in missing)
            elif rule is not None:
                reason = rule
            else:
                record[op] = candidate.name
                if reasons:
                    record.reasons[op] = "; ".join(reasons)
                    if device.type == "cuda":
                        _warn_once(f"model.kernels={mode}: {block} {op}: {record.reasons[op]}; using {candidate.name}")
                else:
                    record.reasons.pop(op, None)
                return candidate
            reasons.append(f"{candidate.name}: {reason}")
    reason = "; ".join(reasons) if reasons else "no kernel for this op"
    if mode == "cuda":
        raise KernelUnavailable(f"model.kernels=cuda: {block} {op} cannot run on a kernel ({reason}); "
                                "use model.kernels=auto or reference to run the PyTorch path")
    record[op] = REFERENCE
    record.reasons[op] = reason
    if device.type != "cuda" and not any(runs_on(c.runtime, device) for c, _ in candidates):
        report_off_gpu(device)
    else:
        _warn_once(f"model.kernels=auto: {block} {op} runs the PyTorch reference path ({reason})")
    return None


def report_off_gpu(device: torch.device) -> None:
    """The one line model.kernels=auto logs off the GPU: the same for every block and kernel family (each
    op's reason is in the dispatch record). Training calls it before its progress bar starts."""
    _warn_once(f"model.kernels=auto: tensors are on {device.type}, the kernels need CUDA; "
               "every block runs its PyTorch reference path")


# ---- shape rules, checked before a kernel is called ----------------------------------------

def causal_conv1d_rule(channels: int, width: int) -> str | None:
    """causal-conv1d's CUDA kernel with seq_idx (channel-last input; csrc/causal_conv1d.cpp):
    the channel count (and the strides, which the caller makes contiguous) a multiple of 8,
    width 2..4."""
    if channels % 8:
        return f"causal_conv1d needs channels divisible by 8 in channel-last layout, got {channels}"
    if not 2 <= width <= 4:
        return f"causal_conv1d needs a width of 2 to 4, got {width}"
    return None


def flash_attn_rule(head_dim: int) -> str | None:
    """flash-attn 2: head dimension at most 256 (a multiple of 8 avoids a padding copy)."""
    if head_dim > 256 or head_dim % 8:
        return f"flash_attn needs a head dim that is a multiple of 8 and at most 256, got {head_dim}"
    return None


def triton_state_rule(name: str, size: int, limit: int = 256) -> str | None:
    """Braid's Triton selective scan keeps a (channels, d_state) tile in registers."""
    if size > limit:
        return f"{name} is at most {limit} in Braid's Triton selective scan, got {size}"
    return None


def dispatch_record(module: torch.nn.Module) -> dict[str, dict[str, str]]:
    """{block: {op: kernel name or "reference"}} of every block under `module` (a HybridLM, a
    DeepSpeed engine's module, a pipeline stage) in its last forward."""
    return {m.block_name: dict(m.dispatch) for m in module.modules() if isinstance(getattr(m, "dispatch", None), DispatchRecord)}


def bypasses(record: dict[str, dict[str, str]]) -> dict[str, list[str]]:
    """The blocks with ops on the reference path: {block: [op, ...]} (empty: every op on a kernel)."""
    return {block: [op for op, path in ops.items() if path == REFERENCE]
            for block, ops in record.items() if REFERENCE in ops.values()}
