"""Running GPU kernels on CPU for tests: Triton's interpreter (TRITON_INTERPRET=1) and its workarounds.

Imported by the `kernels`-marked tests (`make test-kernels`), which must start with
TRITON_INTERPRET=1 in the environment: Triton reads it when a kernel is decorated. Each
workaround below is for a thing the interpreter or a CPU-only torch cannot do, not for a bug
in the kernels:
- the autotuner benchmarks its configs through a GPU driver: keep the first config;
- `torch.cuda.device(None)` (fla's and mamba-ssm's device guards) raises on a CPU-only torch;
- mamba-ssm's backward asks `torch.cuda.get_device_properties` for the SM count;
- loop variables of `for i in range(...)` are Python ints in the interpreter, and some kernels
  call `i.to(tl.int64)` on them (a no-op on a GPU): ints get that method;
- the interpreter's bf16 `tl.dot` is wrong, so the tests run fp32 (and fp16 where they check half).
"""
from __future__ import annotations

import builtins
import contextlib
import os
import sys

import torch

ENABLED = os.environ.get("TRITON_INTERPRET") == "1"


class _LoopInt(int):
    """A loop counter that, like a Triton scalar, answers `.to(dtype)`."""

    def to(self, *args, **kwargs) -> "_LoopInt":
        return self


def _loop_range(*args) -> list[_LoopInt]:
    return [_LoopInt(i) for i in builtins.range(*args)]


def apply_workarounds() -> None:
    """Patch once, process-wide (the test processes of `make test-kernels` run nothing else)."""
    from triton.runtime import autotuner

    if getattr(autotuner.Autotuner, "_braid_first_config", False):
        return
    prune = autotuner.Autotuner.prune_configs
    autotuner.Autotuner.prune_configs = lambda self, kwargs: prune(self, kwargs)[:1]
    autotuner.Autotuner._braid_first_config = True

    cuda_device = torch.cuda.device

    class _Device(contextlib.nullcontext):
        def __new__(cls, device):
            if device is None or (isinstance(device, torch.device) and device.type == "cpu"):
                return contextlib.nullcontext()
            return cuda_device(device)
    torch.cuda.device = _Device

    class _Properties:
        multi_processor_count = 8
    torch.cuda.get_device_properties = lambda *args, **kwargs: _Properties()

    # fla's kernel modules: `range` in them (kernels and host code alike) yields _LoopInt
    import fla.modules.causal_conv1d  # noqa: F401
    import fla.ops.gla  # noqa: F401
    import fla.ops.hgrn  # noqa: F401
    import fla.ops.simple_gla  # noqa: F401
    for name, module in list(sys.modules.items()):
        if module is not None and (name == "fla" or name.startswith("fla.")):
            module.range = _loop_range
