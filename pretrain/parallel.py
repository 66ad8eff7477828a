"""Parallelism, decided in one place: the rank layout, the model's sharding and stages, the engine.

    rank = tp_rank + tp * (dp_rank + dp * pp_rank)        # tensor-parallel ranks adjacent

which is both DeepSpeed's PipeModelDataParallelTopology(num_pp, num_mp, num_dp) order and
megatron-core's default. `plan_layout` checks every divisibility before any process group
exists; `ParallelEngine` builds the model (tensor-parallel through megatron-core layers when
tp > 1, cut into a DeepSpeed PipelineModule when pp > 1, data parallel through ZeRO) and gives
the training loop one interface whatever the mix:

    engine.train_step(batches) -> this data-parallel group's mean loss (a device tensor)
    engine.eval_sums(batches)  -> (summed loss, tokens) of this rank's share, for all-reduce
    engine.step_applied(), engine.grad_norm(), engine.lr(); engine.ds is the DeepSpeed engine

Every rank builds the unsharded model from the seed first, so any layout starts from the
weights a single process would (for models past CPU memory, load a converted checkpoint).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model import HybridLM, ModelConfig, pattern_stages
from model.config import ConfigError
from model.sequence import sequence_info

from .config import TrainConfig


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def coords(self, rank: int) -> dict[str, int]:
        return {"tp": rank % self.tp, "dp": rank // self.tp % self.dp, "pp": rank // (self.tp * self.dp)}

    def to_dict(self) -> dict[str, int]:
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp}


def check_pipeline_stages(model: ModelConfig, pp: int) -> None:
    """The model splits into `pp` pipeline stages: '|' marks (if any) make exactly pp, one sublayer at least each."""
    stages = pattern_stages(model.pattern)
    if pp > 1 and len(stages) > 1 and len(stages) != pp:
        raise ConfigError(f"model.pattern={model.pattern!r} marks {len(stages)} stages with '|', but parallel.pp={pp}")
    if model.n_sublayers < pp:
        raise ConfigError(f"parallel.pp={pp}: more stages than the model's {model.n_sublayers} sublayers")


def plan_layout(cfg: TrainConfig, world: int) -> Layout:
    """The layout of `world` ranks for cfg.parallel, or a ConfigError naming the numbers."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if tp > 1:
        from model.sharding import check_tensor_parallel
        check_tensor_parallel(cfg.model, tp)
    if pp > 1:
        check_pipeline_stages(cfg.model, pp)
        if cfg.parallel.zero_stage != 1:
            raise ConfigError(f"parallel.zero_stage={cfg.parallel.zero_stage} with parallel.pp={pp}: "
                              "DeepSpeed's pipeline engine takes ZeRO stage 1 only")
    if world % (tp * pp):
        raise ConfigError(f"parallel.tp={tp} x parallel.pp={pp} = {tp * pp} does not divide the {world} ranks")
    return Layout(tp=tp, pp=pp, dp=world // (tp * pp))


def loss_fn(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy over (B, L, vocab) logits; labels -100 are ignored."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction=reduction)


def tensor_parallel_loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    from model.parallel import vocab_parallel_loss
    return vocab_parallel_loss(logits, labels, reduction)


class ParallelEngine:
    def __init__(self, cfg: TrainConfig, layout: Layout, rank: int, ds_config: dict[str, Any],
                 initial_state: dict[str, Tensor] | None = None):
        """initial_state: this TP rank's starting weights (HybridLM names), loaded before DeepSpeed
        copies them into its optimizer; None: the seed's initialisation."""
        import deepspeed

        from .optim import param_groups
        from .schedule import build_scheduler
        self.cfg, self.layout = cfg, layout
        coords = layout.coords(rank)
        self.dp_rank, self.dp_world = coords["dp"], layout.dp
        self.loss = tensor_parallel_loss if layout.tp > 1 else loss_fn

        torch.manual_seed(cfg.seed)
        mpu = None
        if layout.tp > 1:
            from model.parallel import DeepSpeedMPU, build_tensor_parallel_model, init_model_parallel
            init_model_parallel(layout.tp, layout.pp)
            model = build_tensor_parallel_model(cfg.model)
            mpu = DeepSpeedMPU if layout.pp == 1 else None     # the pipeline engine has its own grid
        else:
            model = HybridLM(cfg.model)
        if initial_state is not None:
            model.load_state_dict(initial_state)
        model.checkpointed_kinds = cfg.train.checkpointed_kinds(cfg.model.pattern)
        self.pipelined = layout.pp > 1
        if self.pipelined:
            model = pipeline_module(model, layout, self.loss)
        optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                      betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        self.scheduler = build_scheduler(optimizer, cfg.schedule, cfg.train.max_steps)
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=self.scheduler,
                                                config=ds_config, mpu=mpu)

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    def train_step(self, batches: Iterator[dict[str, Tensor]]) -> Tensor:
        """One optimizer step over grad_accum micro-batches; the mean loss, left on the device."""
        accum = self.cfg.train.grad_accum
        if self.pipelined:
            # Only the first and last stage read data; the others draw theirs too, so that every
            # rank's loader (saved in its checkpoint) is at the same place.
            micro = [next(batches) for _ in range(accum)]
            return self.ds.train_batch(iter([_pipe_inputs(b) for b in micro])).detach().double()
        step_loss = torch.zeros((), dtype=torch.float64)
        for _ in range(accum):
            batch = self.on_device(next(batches))
            loss = self.loss(self.ds(batch["input_ids"], doc_ids=batch["doc_ids"]), batch["labels"])
            self.ds.backward(loss)
            self.ds.step()
            step_loss = step_loss.to(loss.device) + loss.detach().double() / accum
        return step_loss

    @torch.no_grad()
    def eval_sums(self, batches: list[dict[str, Tensor]]) -> Tensor:
        """(summed token loss, tokens) over this rank's validation batches, float64 on the host.
        Under pipeline parallelism only last-stage ranks count, so an all-reduce over every rank
        divides out to the same mean as over the data-parallel ranks alone."""
        totals = torch.zeros(2, dtype=torch.float64)
        if not batches:
            return totals
        if self.pipelined:
            module = self.ds.module
            module.loss_fn = lambda logits, labels: self.loss(logits, labels, reduction="sum")
            try:
                sums = self.ds.eval_batch(iter([_pipe_inputs(b) for b in batches]), reduce_output=None,
                                          bcast_loss=False, num_micro_batches=len(batches))
            finally:
                module.loss_fn = self.loss
            self.ds.module.train()
            if self.ds.is_last_stage():
                totals[0] = sum(s.double().item() for s in sums)
                totals[1] = sum((b["labels"] != -100).sum().item() for b in batches)
            return totals
        self.module.eval()
        for batch in map(self.on_device, batches):
            logits = self.module(batch["input_ids"], doc_ids=batch["doc_ids"])
            totals[0] += self.loss(logits, batch["labels"], reduction="sum").double().cpu()
            totals[1] += (batch["labels"] != -100).sum().item()
        self.module.train()
        return totals

    def on_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The loader's host tensors on the engine's device (the pipeline engine moves its own)."""
        return {k: v.to(self.ds.device, non_blocking=True) for k, v in batch.items()}

    def step_applied(self) -> bool:
        return self.ds.was_step_applied()

    def grad_norm(self) -> float | None:
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


def _pipe_inputs(batch: dict[str, Tensor]) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """A batch as the pipeline engine reads it: ((first stage inputs), last stage labels)."""
    return (batch["input_ids"], batch["doc_ids"]), batch["labels"]


# --- pipeline stages ----------------------------------------------------------------------
# Activations travel between stages as (hidden, doc_ids): the integer doc_ids need no gradient,
# and each stage derives positions and document resets from them.

class _EmbeddingPipe(nn.Module):
    """Stage 0's embedding; with tied embeddings the same module is the last stage's head."""

    def __init__(self, parts: dict[str, Any]):
        super().__init__()
        self.embed = parts["embed"]
        if parts["tied"]:
            self.lm_head = parts["lm_head"]

    def forward(self, inputs: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        input_ids, doc_ids = inputs
        return self.embed(input_ids), doc_ids


def _tied_head(module: _EmbeddingPipe, hidden: Tensor) -> Tensor:
    return module.lm_head(hidden).float()


class _SublayerPipe(nn.Module):
    def __init__(self, parts: dict[str, Any], index: int):
        super().__init__()
        self.layer = parts["layers"][index]
        self.recompute = self.layer.kind in parts["checkpointed_kinds"]

    def forward(self, inputs: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, doc_ids = inputs
        seq = sequence_info(tuple(x.shape[:2]), x.device, doc_ids)
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self.layer, x, seq, use_reentrant=False), doc_ids
        return self.layer(x, seq), doc_ids


class _FinalNormPipe(nn.Module):
    def __init__(self, parts: dict[str, Any]):
        super().__init__()
        self.norm = parts["norm"]

    def forward(self, inputs: tuple[Tensor, Tensor]) -> Tensor:
        return self.norm(inputs[0])


class _HeadPipe(nn.Module):
    def __init__(self, parts: dict[str, Any]):
        super().__init__()
        self.lm_head = parts["lm_head"]

    def forward(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden).float()


def stage_bounds(cfg: ModelConfig) -> list[int] | None:
    """Pipeline-layer indices where stages start (embedding, sublayers..., norm, head), from the
    pattern's '|' marks; None: no marks, balance by parameter count."""
    stages = pattern_stages(cfg.pattern)
    if len(stages) == 1:
        return None
    bounds = [0]
    for stage in stages[:-1]:
        bounds.append(1 + stage[-1] + 1)           # after the embedding and this stage's sublayers
    return bounds + [1 + cfg.n_sublayers + 2]


def pipeline_module(model: HybridLM, layout: Layout, loss) -> nn.Module:
    """`model` as a DeepSpeed PipelineModule: embedding, each sublayer, final norm, head, tied
    embedding and head through TiedLayerSpec; only this rank's stage stays allocated."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    class HybridPipeline(PipelineModule):
        def _partition_layers(self, method: str = "parameters") -> None:
            if bounds is None:
                return super()._partition_layers("parameters")
            self.parts = bounds
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=bounds[stage], stop=bounds[stage + 1])

    cfg = model.cfg
    parts = {"embed": model.embed, "lm_head": model.lm_head, "layers": list(model.layers), "norm": model.norm,
             "tied": cfg.tie_embeddings, "checkpointed_kinds": model.checkpointed_kinds}
    bounds = stage_bounds(cfg)
    if cfg.tie_embeddings:
        first = TiedLayerSpec("embed", _EmbeddingPipe, parts, tied_weight_attr="embed.weight")
        last = TiedLayerSpec("embed", _EmbeddingPipe, parts, forward_fn=_tied_head, tied_weight_attr="embed.weight")
    else:
        first, last = LayerSpec(_EmbeddingPipe, parts), LayerSpec(_HeadPipe, parts)
    specs = [first, *(LayerSpec(_SublayerPipe, parts, i) for i in range(cfg.n_sublayers)),
             LayerSpec(_FinalNormPipe, parts), last]
    topology = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)
    pipe = HybridPipeline(layers=specs, topology=topology, loss_fn=loss)
    parts.clear()                      # the other stages' modules are freed with the full model
    return pipe
