"""Checkpoints: DeepSpeed tags plus what DeepSpeed does not know (loader position, RNG, config).

    RUN_DIR/checkpoints/step_00000200/   one tag per save (DeepSpeed model/optimizer/scheduler shards,
                                         one set per rank) and braid.json: step, rank layout, model config,
                                         tokens seen
    RUN_DIR/checkpoints/latest           the newest *complete* tag, replaced atomically after a save

A run can also start from weights alone (`braid convert from-hf`): step_00000000 then holds
one safetensors file per tensor-parallel rank and braid.json says `"weights_only": true`;
training loads them into the model before DeepSpeed wraps it, with a fresh optimizer at step 0.

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
WEIGHTS_FILE = "weights-tp{tp_rank:02d}.safetensors"     # a weights-only checkpoint, per TP rank
TIED_HEAD = "lm_head.weight"       # the embedding itself when tied: stored once


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


def save(engine, run_dir: str, step: int, client_state: dict[str, Any], keep: int,
         protect: set[str] = frozenset()) -> str:
    """Save tag step_N on every rank, then (rank 0) point `latest` at it and prune old tags
    (all but the last `keep`, and those in `protect`: tags a submitted eval job has yet to read)."""
    root = checkpoint_dir(run_dir)
    tag = f"step_{step:08d}"
    engine.save_checkpoint(root, tag=tag, client_state={"step": step, "rng": rng_state(), **client_state},
                           save_latest=False)
    if dist.is_initialized():
        dist.barrier()                          # every shard is on disk before `latest` moves
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(os.path.join(root, tag, INFO), "w") as f:
            json.dump({"step": step, "layout": client_state.get("layout"),
                       "model": client_state.get("config", {}).get("model"),
                       "tokens_seen": client_state.get("tokens_seen")}, f)
        _point_latest(root, tag)
        tags = sorted(t for t in os.listdir(root) if t.startswith("step_") and os.path.isdir(os.path.join(root, t)))
        for old in [t for t in tags[:-keep] if t not in protect]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return tag


def _point_latest(root: str, tag: str) -> None:
    pointer = os.path.join(root, LATEST)
    with open(pointer + ".tmp", "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer + ".tmp", pointer)


def _read_info(tag_dir: str) -> dict[str, Any]:
    path = os.path.join(tag_dir, INFO)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {tag_dir} cannot be loaded ({INFO} is missing)")
    with open(path) as f:
        return json.load(f)


def _show(layout: dict[str, int], keys: tuple[str, ...] = ("tp", "pp", "dp")) -> str:
    return " ".join(f"{k}={layout[k]}" for k in keys)


def save_weights_only(run_dir: str, tp_shards: list[dict[str, torch.Tensor]], model: dict[str, Any],
                      layout: dict[str, int], source: str) -> str:
    """Write step_00000000 of a new run from weights alone: TP rank r's tensors (HybridLM's names)
    in weights-tp{r}.safetensors, then `latest`. Returns the tag folder."""
    from safetensors.torch import save_file
    root = checkpoint_dir(run_dir)
    tag_dir = os.path.join(root, "step_00000000")
    os.makedirs(tag_dir, exist_ok=True)
    tied = model.get("tie_embeddings", True)
    for tp_rank, shard in enumerate(tp_shards):
        save_file({k: v.contiguous() for k, v in shard.items() if not (tied and k == TIED_HEAD)},
                  os.path.join(tag_dir, WEIGHTS_FILE.format(tp_rank=tp_rank)), metadata={"format": "pt"})
    with open(os.path.join(tag_dir, INFO), "w") as f:
        json.dump({"step": 0, "layout": layout, "model": model, "weights_only": True, "source": source}, f, indent=1)
    _point_latest(root, "step_00000000")
    return tag_dir


def load_weights_only(tag_dir: str, tp_rank: int) -> dict[str, torch.Tensor]:
    """TP rank `tp_rank`'s tensors of a weights-only checkpoint."""
    from safetensors.torch import load_file
    path = os.path.join(tag_dir, WEIGHTS_FILE.format(tp_rank=tp_rank))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (the checkpoint is partial)")
    try:
        state = load_file(path)
    except Exception as err:
        raise ValueError(f"{path} cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if _read_info(tag_dir)["model"].get("tie_embeddings", True) and "embed.weight" in state:
        state[TIED_HEAD] = state["embed.weight"]
    return state


# Model fields a resumed run may change: how the same weights run, and the informational training length.
# Any other field would train another model from the saved weights (or fail to load them).
RESUMABLE_MODEL_FIELDS = ("kernels", "max_seq_len")


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def model_changes(saved: dict[str, Any], ours: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, saved value, this config's value) for every model field that differs, nested fields by
    their dotted name (attn.window), RESUMABLE_MODEL_FIELDS left out."""
    a, b = _flat(saved), _flat(ours)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in RESUMABLE_MODEL_FIELDS and a.get(k) != b.get(k)]


def resume_point(run_dir: str, layout: dict[str, int], model: dict[str, Any] | None) -> dict[str, Any] | None:
    """braid.json of the checkpoint a run would resume from (None: a fresh start or weights only), checked
    before anything is built: the same rank layout, and (unless `model` is None) the same model config
    except RESUMABLE_MODEL_FIELDS."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    tag_dir = os.path.join(checkpoint_dir(run_dir), tag)
    if not os.path.isdir(tag_dir):
        raise FileNotFoundError(f"{os.path.join(checkpoint_dir(run_dir), LATEST)} names {tag}, which is missing; "
                                "point it at a complete step_* folder or remove it to start fresh")
    info = _read_info(tag_dir)
    if info.get("weights_only"):
        return None
    saved = info.get("layout")
    if saved is not None and saved != layout:
        raise ValueError(f"checkpoint {tag_dir} was saved with {_show(saved)}, this run has "
                         f"{_show(layout)}: resume with the same parallel.tp/pp and number of ranks")
    changed = model_changes(info["model"], model) if info.get("model") and model is not None else []
    if changed:
        key, theirs, ours = changed[0]
        more = f" (and {len(changed) - 1} more field{'s' if len(changed) > 2 else ''})" if len(changed) > 1 else ""
        raise ValueError(f"checkpoint {tag_dir} was saved with model.{key}={theirs!r}, this run's config has "
                         f"model.{key}={ours!r}{more}: a resumed run keeps its model (only model."
                         f"{' and model.'.join(RESUMABLE_MODEL_FIELDS)} may change); set it back, or train in a "
                         "new run_dir (from these weights: braid convert to-hf, then from-hf)")
    return info


def initial_weights(run_dir: str, layout: dict[str, int], tp_rank: int, model: dict[str, Any]) -> dict | None:
    """This rank's starting weights when `latest` is a weights-only checkpoint, else None.

    Its tensor-parallel size must be this run's; pipeline and data-parallel sizes are free, since
    every rank builds its TP rank's whole model before the pipeline keeps its stage."""
    tag = latest_tag(run_dir)
    tag_dir = os.path.join(checkpoint_dir(run_dir), tag) if tag else None
    if tag_dir is None or not os.path.isdir(tag_dir):
        return None
    info = _read_info(tag_dir)
    if not info.get("weights_only"):
        return None
    if info["layout"]["tp"] != layout["tp"]:
        raise ValueError(f"checkpoint {tag_dir} holds weights split for tp={info['layout']['tp']}, this run has "
                         f"tp={layout['tp']}: convert again with `braid convert from-hf ... --tp {layout['tp']}`")
    changed = model_changes(info["model"], model)
    if changed:
        key, theirs, ours = changed[0]
        raise ValueError(f"checkpoint {tag_dir} was converted for model.{key}={theirs!r}, this run's config "
                         f"has model.{key}={ours!r}")
    return load_weights_only(tag_dir, tp_rank)


def load_latest(engine, run_dir: str, layout: dict[str, int]) -> dict[str, Any] | None:
    """Restore model, optimizer and scheduler from `latest`; returns its client state (None: fresh run).
    Call `resume_point` first: it checks the rank layout and the model config against the checkpoint's."""
    if resume_point(run_dir, layout, None) is None:
        return None                      # a fresh run, or weights only (loaded by initial_weights)
    root, tag = checkpoint_dir(run_dir), latest_tag(run_dir)
    try:
        path, client = engine.load_checkpoint(root, tag=tag)
    except Exception as err:                   # a truncated or foreign file: say which checkpoint
        raise ValueError(f"checkpoint {os.path.join(root, tag)} cannot be loaded ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if path is None or client is None:
        raise ValueError(f"checkpoint {os.path.join(root, tag)} cannot be loaded (no model states found)")
    set_rng_state(client["rng"])
    return client
