"""Checkpoints: DeepSpeed tags plus what DeepSpeed does not know (loader position, RNG, config).

    RUN_DIR/checkpoints/step_00000200/   one tag per save (DeepSpeed model/optimizer/scheduler shards,
                                         one set per rank) and braid.json: step, rank layout, model config
    RUN_DIR/checkpoints/latest           the newest *complete* tag, replaced atomically after a save

`latest` moves only when every rank has finished writing, so a kill during a save leaves the
previous checkpoint as the one a restart resumes from. The last `keep` tags are kept.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"
INFO = "braid.json"          # beside DeepSpeed's files: what a reader needs before loading them


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain values, so checkpoints load with torch.load(weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def latest_tag(run_dir: str) -> str | None:
    path = os.path.join(checkpoint_dir(run_dir), LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def save(engine, run_dir: str, step: int, client_state: dict[str, Any], keep: int) -> str:
    """Save tag step_N on every rank, then (rank 0) point `latest` at it and prune old tags."""
    root = checkpoint_dir(run_dir)
    tag = f"step_{step:08d}"
    engine.save_checkpoint(root, tag=tag, client_state={"step": step, "rng": rng_state(), **client_state},
                           save_latest=False)
    if dist.is_initialized():
        dist.barrier()                          # every shard is on disk before `latest` moves
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(os.path.join(root, tag, INFO), "w") as f:
            json.dump({"step": step, "layout": client_state.get("layout"),
                       "model": client_state.get("config", {}).get("model")}, f)
        pointer = os.path.join(root, LATEST)
        with open(pointer + ".tmp", "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer + ".tmp", pointer)
        tags = sorted(t for t in os.listdir(root) if t.startswith("step_") and os.path.isdir(os.path.join(root, t)))
        for old in tags[:-keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return tag


def load_latest(engine, run_dir: str, layout: dict[str, int]) -> dict[str, Any] | None:
    """Restore model, optimizer and scheduler from `latest`; returns its client state (None: fresh run).
    The checkpoint must have been saved with the same rank `layout` (tp, pp, dp)."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    root = checkpoint_dir(run_dir)
    if not os.path.isdir(os.path.join(root, tag)):
        raise FileNotFoundError(f"{os.path.join(root, LATEST)} names {tag}, which is missing; "
                                "point it at a complete step_* folder or remove it to start fresh")
    info_path = os.path.join(root, tag, INFO)
    if not os.path.isfile(info_path):
        raise ValueError(f"checkpoint {os.path.join(root, tag)} cannot be loaded ({INFO} is missing)")
    with open(info_path) as f:
        saved = json.load(f).get("layout")
    if saved is not None and saved != layout:
        def show(d: dict[str, int]) -> str:
            return " ".join(f"{k}={d[k]}" for k in ("tp", "pp", "dp"))
        raise ValueError(f"checkpoint {os.path.join(root, tag)} was saved with {show(saved)}, this run has "
                         f"{show(layout)}: resume with the same parallel.tp/pp and number of ranks")
    try:
        path, client = engine.load_checkpoint(root, tag=tag)
    except Exception as err:                   # a truncated or foreign file: say which checkpoint
        raise ValueError(f"checkpoint {os.path.join(root, tag)} cannot be loaded ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if path is None or client is None:
        raise ValueError(f"checkpoint {os.path.join(root, tag)} cannot be loaded (no model states found)")
    set_rng_state(client["rng"])
    return client
