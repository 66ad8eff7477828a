"""What Braid changes in DeepSpeed's process-wide behaviour, in one place, applied by `prepare_deepspeed()`
before the first process group (pretrain/train.py `init_distributed`), never at import
(tests/test_deepspeed_setup.py checks each).

- DS_ACCELERATOR=cpu without a GPU (unless set): DeepSpeed otherwise probes for accelerators and may pick
  one whose libraries are absent.
- No shared-memory all-reduce op on CPU: DeepSpeed's CPU accelerator JIT-compiles `deepspeed_shm_comm` the
  first time a process group starts, under torch's build lock in TORCH_EXTENSIONS_DIR. A process killed
  while it holds that lock (a preemption during start-up, a Ctrl-C, a test that stops ranks) leaves the
  lock file behind, and every later DeepSpeed process on the machine then waits for it forever. Braid's
  CPU runs reduce over gloo, which needs no such op; DeepSpeed then sends every collective through
  torch.distributed, as it does on GPUs (where the op does not exist).
- The FutureWarning DeepSpeed's ZeRO triggers through a collective torch 2.13 renamed
  (`all_gather_into_tensor`): two lines per rank of every data-parallel run that no user can act on.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

ALL_GATHER_DEPRECATION = r"`torch\.distributed\.all_gather_into_tensor` is deprecated"


def _no_shm_op() -> None:
    return None


def prepare_deepspeed() -> None:
    """Apply the changes above (idempotent); call before DeepSpeed starts a process group."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")       # read when deepspeed is first imported
    # by its module (`import deepspeed.comm.torch as x` gives torch itself: deepspeed.comm's namespace
    # holds `torch`, which hides the submodule of that name)
    torch_backend = importlib.import_module("deepspeed.comm.torch")
    torch_backend.build_shm_op = _no_shm_op                 # TorchBackend looks it up when it starts
    warnings.filterwarnings("ignore", message=ALL_GATHER_DEPRECATION, category=FutureWarning)
