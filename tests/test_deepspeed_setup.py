"""pretrain/deepspeed_setup.py: what Braid changes in DeepSpeed, applied only when asked, each change checked."""

import json
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, env: dict[str, str], timeout: float = 240) -> dict:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                         env={k: v for k, v in {**os.environ, **env}.items() if v is not None})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_trainer_and_the_tp_layers_changes_nothing_process_wide():
    seen = run_python(
        "import json, os, warnings\n"
        "import numpy, scipy, torch\n"       # the libraries' own filters, set when they are imported
        "before = len(warnings.filters)\n"
        "import pretrain.train, pretrain.parallel, model.parallel\n"
        "print(json.dumps({'accelerator': os.environ.get('DS_ACCELERATOR'), 'new_filters': len(warnings.filters) - before}))",
        {"DS_ACCELERATOR": None})
    assert seen == {"accelerator": None, "new_filters": 0}


def test_a_stale_torch_extensions_lock_does_not_stop_a_process_group(tmp_path):
    """A rank killed while torch built DeepSpeed's shm op left its lock behind: before prepare_deepspeed,
    every later DeepSpeed process on the machine waited on it forever (the timeout fails this test)."""
    lock_dir = tmp_path / "extensions" / "deepspeed_shm_comm"          # torch's folder under TORCH_EXTENSIONS_DIR
    lock_dir.mkdir(parents=True)
    (lock_dir / "lock").write_text("")
    seen = run_python(
        "import json, os, torch, torch.distributed as dist\n"
        "from pretrain.train import init_distributed\n"
        "rank, world = init_distributed()\n"
        "import deepspeed.comm as ds_comm, deepspeed.comm.comm as ds_comm_state\n"
        "t = torch.ones(3)\n"
        "ds_comm.all_reduce(t)\n"
        "print(json.dumps({'rank': rank, 'world': world, 'sum': t.tolist(), 'accelerator': os.environ['DS_ACCELERATOR'],"
        " 'shm_op': getattr(ds_comm_state.cdb, 'shm_comm_op', 'missing')}))",
        {"TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), "DS_ACCELERATOR": None,
         "RANK": None, "WORLD_SIZE": None, "OMP_NUM_THREADS": "1"}, timeout=240)
    assert seen == {"rank": 0, "world": 1, "sum": [1.0, 1.0, 1.0],
                    "accelerator": "cpu" if not torch.cuda.is_available() else seen["accelerator"], "shm_op": None}
    assert (lock_dir / "lock").exists() and not (lock_dir / "deepspeed_shm_comm.so").exists()    # never built


def test_the_all_gather_deprecation_is_silenced_and_nothing_else():
    import warnings

    from pretrain.deepspeed_setup import prepare_deepspeed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_deepspeed()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated, use ...", FutureWarning)
        warnings.warn("another FutureWarning", FutureWarning)
    assert [str(w.message) for w in caught] == ["another FutureWarning"]
