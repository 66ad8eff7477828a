"""`braid train CONFIG.yaml [k=v ...]`: the DeepSpeed training loop.

A token's way: MDS row -> `data_pipeline.streaming` batch {input_ids, labels, doc_ids}
-> `ParallelEngine.train_step` (pretrain/parallel.py): `HybridLM(input_ids, doc_ids)` ->
cross-entropy -> DeepSpeed backward and step (clipping, AdamW and the LR schedule).

Runs as one process (`python -m pretrain.train` or `braid train`) or one per rank under
torchrun/srun: tensor, pipeline and data parallel (ZeRO) as pretrain/parallel.py lays the
ranks out; gloo on CPU, nccl on GPU. A run directory that
holds a checkpoint is resumed. SIGTERM/SIGUSR1 save at the next step boundary and exit with
REQUEUE_EXIT_CODE, which the launchers requeue on.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import signal
import socket
import time
from typing import Any

import torch
import torch.distributed as dist
import yaml

from data_pipeline.streaming import LoaderConfig, StreamSource, build_train_loader, build_val_loader
from model.kernels import report_off_gpu

from . import checkpoint
from .config import TrainConfig, train_config
from .deepspeed_setup import prepare_deepspeed
from .evals_hook import EvalHook
from .flops import device_peak_flops, mfu
from .parallel import ParallelEngine, plan_layout
from .preflight import check_data, startup_lines

REQUEUE_EXIT_CODE = 75          # EX_TEMPFAIL: preempted after a clean checkpoint; requeue me


def init_distributed() -> tuple[int, int]:
    if "RANK" not in os.environ:  # a plain single process: a one-rank group on a free local port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    prepare_deepspeed()
    import deepspeed
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def deepspeed_config(cfg: TrainConfig, grad_accum: int = 1, bf16: bool | None = None) -> dict[str, Any]:
    """The engine's config (grad_accum: from TrainConfig.batch_plan). bf16 (default: on a GPU) is torch
    autocast through DeepSpeed (`torch_autocast`), not DeepSpeed's `bf16` mode: parameters stay fp32 and only the matmuls of
    linear layers run in bf16, as mamba-ssm and fla train. DeepSpeed's `bf16` mode would cast every
    parameter to bf16 for the forward, A_log, D, the dt biases and RG-LRU's Lambda included (1-2%
    off in A and dt), while the blocks compute their recurrences in fp32 from them. ZeRO still
    reduces the linears' gradients in bf16 and skips a step whose gradient norm is not finite.
    """
    bf16 = torch.cuda.is_available() if bf16 is None else bf16
    return {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16"},
        "steps_per_print": 10 ** 9,
    }


class StopRequest:
    """SIGTERM / SIGUSR1 (preemption) set a flag; the loop saves at the next step boundary.

    `catch()` installs the handler first thing (`run`), so a signal that comes while the rank is still
    starting (imports, process group, loader) is kept for the first step boundary instead of killing it."""

    received: int | None = None

    @classmethod
    def catch(cls) -> None:
        def handle(signum, frame) -> None:
            cls.received = signum
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handle)

    def __init__(self, world: int) -> None:
        self.world = world
        # The flag is reduced on the host (gloo) so that asking costs no device sync under nccl.
        self.group = dist.new_group(backend="gloo") if world > 1 and dist.get_backend() != "gloo" else None
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):    # train() called without run()
            self.catch()

    @property
    def signal(self) -> int | None:
        return StopRequest.received

    def agreed(self) -> bool:
        """True on every rank once any rank was signalled: ranks may get the signal at different
        step boundaries, and a save that only some ranks enter would deadlock in its barrier."""
        if self.world == 1:
            return self.signal is not None
        flag = torch.tensor([0 if self.signal is None else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())


class TrainingDiverged(ValueError):
    """Too many non-finite steps in a row; reported as one line, like a config error."""


class MetricsLog:
    """metrics.jsonl (one object per logged step), TensorBoard and optionally W&B, written by rank 0.

    On resume, records past the checkpoint's step (logged before a kill, about to be redone) are
    dropped, so the file holds the curve of an unbroken run.
    """

    def __init__(self, cfg: TrainConfig, active: bool, resumed_step: int):
        self.active = active
        self.writer = self.wandb = None
        if not active:
            return
        path = os.path.join(cfg.run_dir, "metrics.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if _logged_step(line) <= resumed_step]
            with open(path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)
        self.file = open(path, "a")
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(cfg.run_dir, "tensorboard"))
        if cfg.logging.wandb.enabled:
            self.wandb = _start_wandb(cfg)

    def log(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.active:
            self.file.close()
            if self.writer is not None:
                self.writer.close()
            if self.wandb is not None:
                self.wandb.finish()


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a line a kill left half-written (dropped on resume)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _start_wandb(cfg: TrainConfig):
    """A W&B run whose id is kept in the run directory, so a resumed training continues the same run."""
    try:
        import wandb
    except ImportError:
        raise ValueError("logging.wandb.enabled=true needs the wandb package: pip install -e '.[wandb]'") from None
    id_path = os.path.join(cfg.run_dir, "wandb_id")
    if not os.path.exists(id_path):
        with open(id_path, "w") as f:
            f.write(secrets.token_hex(4))
    with open(id_path) as f:
        run_id = f.read().strip()
    w = cfg.logging.wandb
    return wandb.init(project=w.project, name=w.name or os.path.basename(os.path.abspath(cfg.run_dir)),
                      id=run_id, resume="allow", mode=w.mode, dir=cfg.run_dir, config=cfg.to_dict())


def validate(engine: ParallelEngine, cfg: TrainConfig) -> dict[str, float]:
    """Mean next-token loss (and perplexity) on the val stream at each multiple k of seq_len; the
    data-parallel ranks split the sequences and the token-weighted sums are all-reduced."""
    results = {}
    for k in cfg.train.val_lengths:
        loader = build_val_loader(cfg.data.val, cfg.data.seq_len * k, cfg.data.micro_batch,
                                  max_samples=cfg.train.val_samples, dp_rank=engine.dp_rank,
                                  dp_world_size=engine.dp_world)
        totals = engine.eval_sums(list(loader))
        if dist.get_world_size() > 1:
            dist.all_reduce(totals)
        loss = (totals[0] / totals[1].clamp_min(1)).item()
        results[f"val_loss@{k}x"] = loss
        results[f"val_ppl@{k}x"] = math.exp(min(loss, 50.0))
    return results


def train(cfg: TrainConfig) -> dict[str, Any]:
    from tqdm import tqdm

    from launch.threads import configure_threads

    # Everything that can be checked against the disk is, before any process group or model exists.
    layout = plan_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    grad_accum, global_batch = cfg.batch_plan(layout.dp)
    streams = check_data(cfg, layout.tp)
    checkpoint.resume_point(cfg.run_dir, layout.to_dict(), cfg.model.to_dict())    # same layout and model
    threads = configure_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    rank, world = init_distributed()
    os.makedirs(cfg.run_dir, exist_ok=True)
    if rank == 0:
        with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    initial = checkpoint.initial_weights(cfg.run_dir, layout.to_dict(), layout.coords(rank)["tp"],
                                         cfg.model.to_dict())
    engine = ParallelEngine(cfg, layout, rank, deepspeed_config(cfg, grad_accum), initial_state=initial)
    loader = build_train_loader(
        LoaderConfig(streams=[StreamSource(path=s.path, proportion=s.proportion) for s in cfg.data.train],
                     seq_len=cfg.data.seq_len, batch_size=cfg.data.micro_batch, seed=cfg.seed),
        dp_rank=engine.dp_rank, dp_world_size=engine.dp_world)

    step = 0
    tokens_per_step = global_batch * cfg.data.seq_len
    resumed = checkpoint.load_latest(engine.ds, cfg.run_dir, layout.to_dict())
    if resumed is not None:
        step = resumed["step"]
        loader.load_state_dict(resumed["loader"])
    # tokens read so far: a run resumed with another global batch keeps its own count
    tokens_seen = int(resumed.get("tokens_seen", step * tokens_per_step)) if resumed else 0
    if rank == 0:
        where = _last_checkpoint(cfg.run_dir) if resumed is not None else None
        for line in startup_lines(cfg, layout, streams, grad_accum, global_batch, threads,
                                  step if resumed is not None else None, where,
                                  weights=_last_checkpoint(cfg.run_dir) if initial is not None else None):
            print(f"braid: {line}", flush=True)

    if rank == 0 and cfg.model.kernels == "auto" and not torch.cuda.is_available():
        report_off_gpu(torch.device("cpu"))    # its one fallback line now, not inside the progress bar
    stop = StopRequest(world)
    metrics = MetricsLog(cfg, active=rank == 0, resumed_step=step)
    evals = EvalHook(cfg, active=rank == 0, log=metrics.log)
    evals.collect()                     # results that finished since the last invocation (slurm mode)
    evals.catch_up(step)                # the resumed checkpoint's evals, if a preemption skipped them
    peak = device_peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    batches = loader.batches()
    progress = tqdm(total=cfg.train.max_steps, initial=step, disable=rank != 0, desc="train", unit="step")
    window_start, window_tokens = time.perf_counter(), 0
    # the logged loss is the mean over the steps since the last record (the skipped ones left out), as
    # Megatron averages over its log interval: one step's loss is a noisy sample of the curve
    interval_loss, interval_steps = torch.zeros((), dtype=torch.float64), 0
    nonfinite_run = 0                   # non-finite steps in a row, each skipped by ZeRO's optimizer
    exit_code = 0
    end = min(cfg.train.max_steps, cfg.train.stop_after or cfg.train.max_steps)
    try:
        while step < end:
            step_loss = engine.train_step(batches)      # stays on the device: no host sync per step
            step += 1
            tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            progress.update(1)
            # ZeRO's optimizer all-reduces the overflow check, so every rank sees the same answer.
            skipped = not engine.step_applied()
            if not skipped and cfg.parallel.zero_stage == 3 and not math.isfinite(engine.grad_norm() or 0.0):
                raise TrainingDiverged(f"step {step}: non-finite gradients, and ZeRO-3 in fp32 cannot skip a step; "
                                       f"the last good checkpoint is {_last_checkpoint(cfg.run_dir)}")
            nonfinite_run = nonfinite_run + 1 if skipped else 0
            if not skipped:
                interval_loss = interval_loss.to(step_loss.device) + step_loss
                interval_steps += 1
            if skipped or step % cfg.train.log_every == 0 or step == end:
                # a skipped step is logged at once with its own loss; otherwise the interval's mean
                loss = step_loss if skipped else interval_loss / interval_steps
                if world > 1:      # the global batch's loss; every rank holds its data-parallel group's
                    dist.all_reduce(loss)
                    loss /= world
                loss = loss.item()
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "loss": loss, "lr": engine.lr(), "grad_norm": engine.grad_norm() or 0.0,
                          "tokens": tokens_seen, "tokens_per_s": window_tokens / elapsed}
                if peak is not None:
                    record["mfu"] = mfu(record["tokens_per_s"], cfg.model, cfg.data.seq_len, peak)
                if skipped:
                    record["skipped"] = True
                    progress.write(f"step {step}: non-finite loss or gradient (loss {loss}), step skipped "
                                   f"({nonfinite_run} in a row, stopping at {cfg.train.max_nonfinite})")
                else:
                    interval_loss, interval_steps = torch.zeros((), dtype=torch.float64), 0
                metrics.log(record)
                evals.on_log_step()
                progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.3g}")
                window_start, window_tokens = time.perf_counter(), 0
            if nonfinite_run >= cfg.train.max_nonfinite:
                raise TrainingDiverged(
                    f"steps {step - nonfinite_run + 1}..{step}: {nonfinite_run} non-finite steps in a row "
                    f"(train.max_nonfinite={cfg.train.max_nonfinite}); the last good checkpoint is "
                    f"{_last_checkpoint(cfg.run_dir)}")
            if cfg.data.val and ((cfg.train.val_every and step % cfg.train.val_every == 0) or step == cfg.train.max_steps):
                scores = validate(engine, cfg)
                metrics.log({"step": step, **scores})
                if rank == 0:
                    progress.write(f"step {step}: " + "  ".join(f"{k} {v:.3f}" for k, v in scores.items() if "loss" in k))
            preempted = stop.agreed()
            if preempted or step % cfg.checkpoint.every == 0 or step == end:
                checkpoint.save(engine.ds, cfg.run_dir, step, {"loader": loader.state_dict(), "config": cfg.to_dict(),
                                                              "layout": layout.to_dict(), "tokens_seen": tokens_seen},
                                cfg.checkpoint.keep, protect=evals.pending_tags())
                evals.after_save(step, preempted)
            if preempted:
                if rank == 0:
                    progress.write(f"preempted (signal {stop.signal or 'on another rank'}): saved step {step} to "
                                   f"{checkpoint.checkpoint_dir(cfg.run_dir)}; exiting with {REQUEUE_EXIT_CODE} for "
                                   "requeue")
                exit_code = REQUEUE_EXIT_CODE
                break
        evals.collect()
    finally:
        progress.close()
        metrics.close()
    return {"step": step, "exit_code": exit_code, "checkpoint": _last_checkpoint(cfg.run_dir)}


def _last_checkpoint(run_dir: str) -> str:
    tag = checkpoint.latest_tag(run_dir)
    return os.path.join(checkpoint.checkpoint_dir(run_dir), tag) if tag else "none (no checkpoint saved yet)"


def run(config: dict[str, Any]) -> dict[str, Any]:
    """Train from a loaded config mapping (`braid train`; launch/cli.py loads the YAML and overrides): the
    preemption signals caught first, then `train`. Returns train's result with this process's rank."""
    StopRequest.catch()
    cfg = train_config(config)
    result = train(cfg)
    if result["exit_code"] == 0:
        # A preemption notice that comes after the last step has nothing to save: ignore it, so the
        # exiting process is not killed by it (and the launcher does not requeue a finished run).
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    return {**result, "rank": dist.get_rank(), "run_dir": cfg.run_dir}
