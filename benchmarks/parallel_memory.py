"""Per-rank parameter and activation memory under tensor and pipeline parallelism, counted (not timed).

One process builds one rank's shapes with `model.sharding.rank_local_spec(tp)` (no process
group): parameters on the meta device; activations as the bytes autograd saves for backward
in a real fp32 forward of each sublayer kind (its pre-norm included) at the training length,
distinct storages counted once, parameters excluded, divided by the tokens. The head row is
the final norm, the vocab-parallel head and the loss (F.cross_entropy over the rank's logits
stands in for megatron's vocab-parallel loss, which saves the same V/tp softmax per token).

Pipeline stages are the ones `braid train` makes (pretrain/parallel.py: cuts at '|', else
DeepSpeed's balance by parameters over embedding, sublayers, final norm, head; a tied
embedding counted on both end stages). Under DeepSpeed's 1F1B schedule stage s of p keeps
the activations of up to p - s micro-batches, so the first stage's row is the peak.

    python benchmarks/parallel_memory.py [--preset samba-421m] [--tp 1 2] [--pp 1 2] [--length 4096]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import HybridLM, get_preset  # noqa: E402
from model.sequence import sequence_info  # noqa: E402
from model.sharding import rank_local_spec  # noqa: E402


def saved_bytes(run, parameters) -> int:
    """Bytes of the distinct non-parameter storages autograd saves while `run()` builds its graph."""
    owned = {p.untyped_storage().data_ptr() for p in parameters}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


def count(preset: str, tp: int, length: int) -> dict:
    cfg = get_preset(preset).replace(kernels="reference")
    with torch.device("meta"):
        meta = HybridLM(cfg, rank_local_spec(tp))
    kinds = cfg.layer_types
    params = {"embedding": meta.embed.weight.numel(), "final norm": meta.norm.weight.numel()}
    for kind in dict.fromkeys(kinds):
        params[f"{kind} sublayer (x{kinds.count(kind)})"] = sum(
            p.numel() for layer in meta.layers if layer.kind == kind for p in layer.parameters())
    params["total"] = meta.num_parameters()

    # activations: one real sublayer of each kind (rank-local shapes), then the head and loss
    model = HybridLM(cfg.replace(pattern="".join(dict.fromkeys(cfg.pattern.replace("|", "")))), rank_local_spec(tp))
    seq = sequence_info((1, length), torch.device("cpu"))
    x = torch.randn(1, length, cfg.d_model, requires_grad=True)
    activations = {}
    for layer in model.layers:
        activations[layer.kind] = saved_bytes(lambda: layer(x, seq), layer.parameters()) / length
    labels = torch.randint(0, cfg.vocab_size // tp, (1, length))
    activations["head + loss"] = saved_bytes(
        lambda: F.cross_entropy(model.lm_head(model.norm(x)).float().flatten(0, 1), labels.flatten()),
        model.parameters()) / length
    per_token = sum(activations[kind] for kind in kinds) + activations["head + loss"]
    return {"tp": tp, "parameters": params, "activation_bytes_per_token": activations,
            "activation_bytes_per_token_model": per_token,
            "layers": {"parameters": [params["embedding"], *(sum(p.numel() for p in layer.parameters())
                                                             for layer in meta.layers), params["final norm"],
                                      params["embedding"] if cfg.tie_embeddings else meta.lm_head.weight.numel()],
                       "activations": [0.0, *(activations[kind] for kind in kinds), 0.0, activations["head + loss"]]}}


def stages(row: dict, cfg, pp: int) -> list[dict]:
    """Per-stage parameters and activations (bytes per token of one micro-batch) at `pp` stages."""
    from deepspeed.runtime.utils import partition_balanced
    from pretrain.parallel import stage_bounds
    layers = row["layers"]
    bounds = (stage_bounds(cfg) if pp > 1 else None) or (
        partition_balanced(weights=layers["parameters"], num_parts=pp) if pp > 1 else [0, len(layers["parameters"])])
    shared = layers["parameters"][0] if cfg.tie_embeddings and pp == 1 else 0    # one stage: one tied matrix
    return [{"stage": s, "layers": bounds[s + 1] - bounds[s],
             "parameters": sum(layers["parameters"][bounds[s]:bounds[s + 1]]) - shared,
             "activation_bytes_per_token": sum(layers["activations"][bounds[s]:bounds[s + 1]]),
             "micro_batches_in_flight": pp - s} for s in range(pp)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="samba-421m")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--pp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--length", type=int, default=4096, help="tokens per sequence (the training length)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/parallel_memory.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [count(args.preset, tp, args.length) for tp in args.tp]
    cfg = get_preset(args.preset)
    for row in rows:
        row["pipeline"] = {pp: stages(row, cfg, pp) for pp in args.pp}
    for row in rows:
        print(f"TP={row['tp']}: {row['parameters']['total'] / 1e6:.1f}M parameters per rank")
        for name, value in row["parameters"].items():
            print(f"  {name:28s} {value / 1e6:9.2f}M")
        for name, value in row["activation_bytes_per_token"].items():
            print(f"  activations {name:16s} {value / 1024:9.1f} KiB/token")
        print(f"  activations, whole model    {row['activation_bytes_per_token_model'] / 2 ** 20:9.2f} MiB/token")
        for pp, parts in row["pipeline"].items():
            for st in parts:
                print(f"  PP={pp} stage {st['stage']}: {st['layers']} layers, {st['parameters'] / 1e6:.1f}M parameters, "
                      f"{st['activation_bytes_per_token'] / 2 ** 20:.2f} MiB/token x {st['micro_batches_in_flight']} "
                      "micro-batches in flight")
    meta = {"preset": args.preset, "length": args.length, "batch": 1, "dtype": "float32",
            "torch": torch.__version__, "python": platform.python_version()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
