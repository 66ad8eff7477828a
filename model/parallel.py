"""Tensor parallelism with megatron-core: parallel state, the TP LinearSpec, the vocab-parallel loss.

The one module that imports megatron.core (the single-device model and the HF export
need only torch). A tensor-parallel HybridLM is the same model class built with
`tensor_parallel_spec`: column/row-parallel linears, a vocab-parallel embedding and
head (logits are this rank's vocabulary slice), and the two reductions of LinearSpec.

    torch.distributed.init_process_group("gloo")        # or deepspeed.init_distributed()
    init_model_parallel(tp=2)                          # TP ranks adjacent, as DeepSpeed's topology
    torch.manual_seed(seed)
    model = build_tensor_parallel_model(cfg)           # the TP=1 init, sharded
    loss = vocab_parallel_loss(model(ids, doc_ids=doc_ids), labels)
    with gathered_logits(model):
        tokens = generate(model, prompts, 32)          # every rank, same prompts

Layouts, the divisibility check and shard/merge of state dicts are in `model.sharding`.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import ConfigError, ModelConfig
from .hybrid import HybridLM
from .layers import LinearSpec
from .sharding import REPLICATED, check_tensor_parallel, shard_state_dict, tensor_parallel_rule

with warnings.catch_warnings():
    # megatron.core's __init__ imports its optimizer and FSDP code, which warn that Transformer
    # Engine and Apex (GPU fusions unused here) are missing, and touch deprecated torch.jit APIs.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from megatron.core import ModelParallelConfig, parallel_state
    from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                               copy_to_tensor_model_parallel_region,
                                               reduce_from_tensor_model_parallel_region,
                                               vocab_parallel_cross_entropy)


def init_model_parallel(tp: int, pp: int = 1) -> None:
    """megatron's parallel state over the initialised default process group: groups of `tp`
    adjacent ranks, `pp` stages, data parallel over the rest (DeepSpeed's
    PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp) orders ranks the same way)."""
    if not dist.is_initialized():
        raise RuntimeError("init_model_parallel: initialise torch.distributed first (init_process_group)")
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ConfigError(f"world size {world} is not divisible by parallel.tp={tp} * parallel.pp={pp}")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    # megatron's advice for CUDA streams, given on the first backward of every tensor-parallel run: not
    # ours to act on. Set here, with the parallel state, rather than when the module is imported.
    warnings.filterwarnings("ignore", message="When using async grad allreduce it is recommended")


def tp_rank_and_size() -> tuple[int, int]:
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


class _ReturnsTensor:
    """Makes megatron's (output, bias) linears what a block expects: a layer returning a tensor
    (the bias, if any, already added; after the sum for a row layer)."""
    # megatron adds an empty `_extra_state` entry (for Transformer Engine) to state dicts and a
    # load hook expecting it; without both, state dicts have the unsharded model's names
    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._load_state_dict_pre_hooks.clear()

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)[0]


class _ColumnParallelLinear(_ReturnsTensor, ColumnParallelLinear):
    pass


class _RowParallelLinear(_ReturnsTensor, RowParallelLinear):
    pass


class _VocabParallelHead(_ColumnParallelLinear):
    """The LM head: logits of this rank's vocabulary slice, or of the whole vocabulary while
    `gather` is set (gathered_logits; megatron's own gather allocates on CUDA)."""
    gather = False

    def forward(self, x: Tensor) -> Tensor:
        logits = super().forward(x)
        if not self.gather:
            return logits
        if logits.requires_grad:
            raise RuntimeError("gathered_logits: no gradient flows through the gather; run it under "
                               "torch.no_grad(), and train on vocab-parallel logits with vocab_parallel_loss")
        pieces = [torch.empty_like(logits) for _ in range(dist.get_world_size(self.tp_group))]
        dist.all_gather(pieces, logits.contiguous(), group=self.tp_group)
        return torch.cat(pieces, dim=-1)


def _all_reduce_forward_and_backward(x: Tensor) -> Tensor:
    # sum the partial results; the copy's backward sums the gradient, which each rank's
    # channels give only a part of (megatron's reduce alone passes the local gradient)
    return copy_to_tensor_model_parallel_region(reduce_from_tensor_model_parallel_region(x))


def tensor_parallel_spec(cfg: ModelConfig, initialize: bool = True) -> LinearSpec:
    """The LinearSpec of this rank's tensor-parallel group (after init_model_parallel).

    Layers are created on CPU; with `initialize` they are drawn N(0, cfg.init_std) as
    HybridLM's own init (other values than TP=1: build_tensor_parallel_model gives those).
    """
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("tensor_parallel_spec: call init_model_parallel(tp, pp) first")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    config = ModelParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 use_cpu_initialization=True, perform_initialization=initialize,
                                 params_dtype=torch.float32, pipeline_dtype=torch.float32 if pp > 1 else None)
    init = partial(nn.init.normal_, std=cfg.init_std)
    return LinearSpec(
        column=lambda i, o, bias: _ColumnParallelLinear(i, o, config=config, init_method=init, bias=bias),
        row=lambda i, o, bias: _RowParallelLinear(i, o, config=config, init_method=init, bias=bias,
                                                  input_is_parallel=True, skip_bias_add=False),
        embedding=lambda vocab, d: VocabParallelEmbedding(vocab, d, init_method=init, config=config),
        lm_head=lambda d, vocab: _VocabParallelHead(d, vocab, config=config, init_method=init, bias=False),
        tp_size=tp,
        all_reduce=_all_reduce_forward_and_backward,
        all_reduce_grad=copy_to_tensor_model_parallel_region,
    )


def mark_tensor_parallel_parameters(model: HybridLM) -> None:
    """Set megatron's `tensor_model_parallel` / `partition_dim` on every parameter from its rule:
    DeepSpeed's gradient norm (and `grad_norm`) counts marked parameters on every TP rank and
    unmarked ones on TP rank 0 only. megatron marks its own layers; this covers the rest (convs,
    A_log, D, RG-LRU gates ...), which are split too."""
    for name, param in model.named_parameters():
        rule = tensor_parallel_rule(name, model.cfg)
        param.tensor_model_parallel = rule is not REPLICATED
        param.partition_dim = -1 if rule is REPLICATED else rule.dim
        param.partition_stride = 1


def build_tensor_parallel_model(cfg: ModelConfig, full_state_dict: dict[str, Tensor] | None = None,
                                spec: LinearSpec | None = None) -> HybridLM:
    """This rank's shard of an unsharded HybridLM: of `full_state_dict`, or else of HybridLM(cfg)
    drawn from the current RNG state, so a seed gives the TP=1 model's weights and leaves the
    RNG where TP=1 leaves it. `spec` defaults to tensor_parallel_spec(cfg) (tests pass broken ones).

    The unsharded model is materialised once on CPU per rank; past that size, load shards instead.
    """
    tp_rank, tp_size = tp_rank_and_size()
    check_tensor_parallel(cfg, tp_size)
    if full_state_dict is None:
        full_state_dict = HybridLM(cfg).state_dict()
    with torch.random.fork_rng(devices=[]):
        model = HybridLM(cfg, spec or tensor_parallel_spec(cfg, initialize=False))
    model.load_state_dict(shard_state_dict(full_state_dict, cfg, tp_rank, tp_size))
    mark_tensor_parallel_parameters(model)
    return model


def vocab_parallel_loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy of vocab-parallel logits (B, L, vocab/tp) against labels (B, L),
    labels -100 ignored: F.cross_entropy(ignore_index=-100) of the gathered logits.

    Overwrites `logits` (megatron computes the softmax in place to save memory).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r}: must be mean, sum or none")
    keep = labels != -100
    per_token = vocab_parallel_cross_entropy(logits, labels.masked_fill(~keep, 0)) * keep
    if reduction == "none":
        return per_token
    return per_token.sum() if reduction == "sum" else per_token.sum() / keep.sum()


@contextmanager
def gathered_logits(model: HybridLM) -> Iterator[HybridLM]:
    """Inside, the model returns the whole vocabulary's logits on every rank (all-gathered), as
    generation and evaluation need. A model whose head is not vocab-parallel is left as it is."""
    head = model.lm_head
    if not isinstance(head, _VocabParallelHead):
        yield model
        return
    head.gather = True
    try:
        yield model
    finally:
        head.gather = False


def grad_norm(model: nn.Module) -> Tensor:
    """L2 norm of all gradients of a tensor-parallel model, every element counted once: squares
    of split parameters are summed over the TP group, replicated ones taken once."""
    split = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for param in model.parameters():
        if param.grad is None:
            continue
        squares = param.grad.detach().double().pow(2).sum().cpu()
        if getattr(param, "tensor_model_parallel", False):
            split += squares
        else:
            replicated += squares
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(split, group=parallel_state.get_tensor_model_parallel_group())
    return (split + replicated).sqrt()


class DeepSpeedMPU:
    """megatron's parallel state under the names DeepSpeed's `mpu` argument reads (its "model
    parallel" group is the tensor-parallel one), for deepspeed.initialize(..., mpu=DeepSpeedMPU)
    without pipeline parallelism."""
    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_src_rank = staticmethod(parallel_state.get_tensor_model_parallel_src_rank)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)

    @staticmethod
    def get_data_parallel_group_ranks() -> list[int]:
        return dist.get_process_group_ranks(parallel_state.get_data_parallel_group())
