"""The hybrids' headline behaviours at small scale, end to end, with one command.

    python -m experiments.hybrids                       # the CPU preset: 4 models x 2 seeds (hours: RESULTS.md)
    python -m experiments.hybrids --preset smoke        # minutes: every stage at toy size (the test runs it)
    python -m experiments.hybrids --preset gpu --device cuda     # wider, longer, on a GPU

Four models at equal parameter counts (+-10%, asserted; the MLP width of each is solved to match the
Samba-style model) and equal training tokens, all through Braid itself:

    samba        M-S- ...   Mamba-1 + sliding-window attention (window well below the training length)
    transformer  *-   ...   full attention (the Samba paper's Llama baseline)
    mamba        M-   ...   pure Mamba-1
    griffin      R-R-S- ... RG-LRU x2 + sliding-window attention

Stages (each skipped when its output exists, so a rerun resumes; `braid train` resumes by itself):
  1. data:     `braid data tokenizer|prepare experiments/configs/stdlib_modules.yaml` (whole stdlib modules,
               10% of them held out whole: the long-document split for perplexity), rows of seq_len + 1.
  2. pretrain: `braid train` per model and seed, the same data order and token count.
  3. finetune: a short retrieval fine-tune at the training length from each pretrained checkpoint
               (`braid train` on a weights-only start): passkey prompts (Samba's passkey fine-tune) and
               phonebook prompts, plain and JRT-style, in 90% of the rows, pretraining text in the rest.
               The documents are the eval generators' own, with other seeds, prepared by `braid data prepare`.
  4. evals:    ppl by position to >= 16x the training length on held-out documents that long (document-
               bounded windows), on the pretrained models; passkey from 1x to 16x and phonebook vs entries
               with and without JRT-Prompt (`repeat_context=2`) on the fine-tuned ones; decode speed and
               memory vs context of the four (seed 0) measured round-robin in one process.
  5. summary:  OUT/summary.json (every number, mean and spread over seeds), OUT/summary.md (tables) and
               PNGs; each suite's results.json stays in the run folders.

Runs go to runs/experiments/PRESET/ (--runs), the summary to experiments/results/PRESET/ (--out).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "experiments", "configs", "stdlib_modules.yaml")

# name -> (pattern unit, what it stands for)
MODELS = {
    "samba": ("M-S-", "Samba: Mamba + sliding-window attention"),
    "transformer": ("*-", "full-attention Transformer (Llama-style)"),
    "mamba": ("M-", "pure Mamba-1"),
    "griffin": ("R-R-S-", "Griffin: RG-LRU x2 + sliding-window attention"),
}
REFERENCE = "samba"           # the others' MLP width is solved to match its parameter count
PARAM_TOLERANCE = 0.10
THREADS: int | None = None    # --threads: torch threads of every process (None: torch's default)


@dataclass
class Preset:
    d_model: int
    sublayers: int                    # every model has this many (mixers and MLPs alternate)
    seq_len: int                      # training length
    window: int                       # sliding window of `S`
    steps: int                        # pretraining steps (equal tokens: steps x micro_batch x seq_len)
    micro_batch: int
    lr: float
    ft_steps: int                     # retrieval fine-tune steps
    ft_lr: float
    ft_documents: int                 # fine-tune documents generated (the loader cycles over them)
    ft_proportion: float              # share of retrieval rows in the fine-tune (the rest: pretraining text)
    ppl_length: int                   # tokens per ppl window (a multiple of the training length)
    ppl_samples: int
    passkey_lengths: list[int]
    passkey_depths: list[float]
    passkey_samples: int
    phonebook_entries: list[int]
    phonebook_samples: int
    speed_lengths: list[int]
    seeds: list[int]
    n_heads: int = 4
    mlp_ratio: int = 3                # the reference model's mlp_hidden / d_model
    corpus_files: str = "*.jsonl.gz"  # which of the corpus's 4 parts are read
    corpus_overrides: list[str] = field(default_factory=list)   # `braid data prepare` key=value extras
    eval_batch: int = 8
    speed_decode_tokens: int = 16
    speed_repeats: int = 3


PRESETS: dict[str, Preset] = {
    # every stage at toy size, a few minutes on 2 CPU cores (tests/test_experiments.py)
    "smoke": Preset(d_model=32, sublayers=12, seq_len=128, window=32, steps=6, micro_batch=2, lr=3e-3,
                    ft_steps=4, ft_lr=1e-3, ft_documents=40, ft_proportion=0.9, ppl_length=512, ppl_samples=2,
                    passkey_lengths=[128, 256], passkey_depths=[0.0, 1.0], passkey_samples=1,
                    phonebook_entries=[2, 4], phonebook_samples=2, speed_lengths=[64, 256], seeds=[0],
                    n_heads=2, corpus_files="part-0000.jsonl.gz",
                    corpus_overrides=["executor.tasks=1", "executor.workers=1"],
                    eval_batch=4, speed_decode_tokens=2, speed_repeats=1),
    # the CPU experiment (2 cores): about 1.6M parameters a model, 614K training tokens each
    "cpu": Preset(d_model=128, sublayers=12, seq_len=256, window=64, steps=600, micro_batch=4, lr=2e-3,
                  ft_steps=400, ft_lr=2e-3, ft_documents=6000, ft_proportion=0.9, ppl_length=8192, ppl_samples=8,
                  passkey_lengths=[256, 512, 1024, 2048, 4096], passkey_depths=[0.0, 0.25, 0.5, 0.75, 1.0],
                  passkey_samples=2, phonebook_entries=[4, 8, 16, 32, 64], phonebook_samples=10,
                  speed_lengths=[256, 1024, 4096, 16384], seeds=[0, 1]),
    # the same experiment wider and longer, for a GPU (--device cuda)
    "gpu": Preset(d_model=512, sublayers=24, seq_len=1024, window=256, steps=4000, micro_batch=16, lr=1e-3,
                  ft_steps=1000, ft_lr=5e-4, ft_documents=40000, ft_proportion=0.9, ppl_length=16384, ppl_samples=8,
                  passkey_lengths=[1024, 2048, 4096, 8192, 16384], passkey_depths=[0.0, 0.25, 0.5, 0.75, 1.0],
                  passkey_samples=4, phonebook_entries=[16, 32, 64, 128, 256], phonebook_samples=20,
                  speed_lengths=[1024, 4096, 16384, 65536], seeds=[0, 1, 2], n_heads=8, eval_batch=16),
}


def log(message: str) -> None:
    print(f"[experiments {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- models -------------------------------------------------------------------------------------

def model_config(name: str, preset: Preset, vocab_size: int, mlp_hidden: int):
    """The ModelConfig of one of MODELS at the preset's width and depth, initialised as Samba trains."""
    from model import ModelConfig
    from model.config import AttentionConfig, MambaConfig, RGLRUConfig

    unit = MODELS[name][0]
    if preset.sublayers % len(unit):
        raise ValueError(f"preset sublayers={preset.sublayers} is not a multiple of {name}'s unit {unit!r}")
    return ModelConfig(vocab_size=vocab_size, d_model=preset.d_model, pattern=unit * (preset.sublayers // len(unit)),
                       mlp_hidden=mlp_hidden, max_seq_len=preset.seq_len, init="samba",
                       mamba=MambaConfig(version=1, d_state=16, d_conv=4, expand=2),
                       attn=AttentionConfig(n_heads=preset.n_heads, window=preset.window),
                       rglru=RGLRUConfig(n_heads=preset.n_heads))


def count_parameters(cfg) -> tuple[int, int]:
    """(total, without the embedding) of a config (the head is tied)."""
    import torch

    from model import HybridLM
    with torch.device("meta"):
        lm = HybridLM(cfg)
    return lm.num_parameters(), lm.num_parameters(exclude_embeddings=True)


def solve_models(preset: Preset, vocab_size: int, names: list[str]) -> dict[str, Any]:
    """Each model's config with its MLP width solved so that its parameters (without the embedding, which
    is the same for all) match the reference's; asserts every count within PARAM_TOLERANCE."""
    target_cfg = model_config(REFERENCE, preset, vocab_size, preset.mlp_ratio * preset.d_model)
    target_total, target = count_parameters(target_cfg)
    out = {}
    for name in names:
        if name == REFERENCE:
            cfg = target_cfg
        else:       # parameters are linear in mlp_hidden: two counts give the slope
            base = model_config(name, preset, vocab_size, 16)
            slope = (count_parameters(model_config(name, preset, vocab_size, 32))[1] - count_parameters(base)[1]) / 16
            hidden = max(16, int(round((target - count_parameters(base)[1]) / slope / 16 + 1)) * 16)
            cfg = model_config(name, preset, vocab_size, hidden)
        total, body = count_parameters(cfg)
        for what, mine, ref in (("non-embedding", body, target), ("total", total, target_total)):
            if abs(mine / ref - 1) > PARAM_TOLERANCE:
                raise AssertionError(f"{name}: {what} parameters {mine} differ from {REFERENCE}'s {ref} by more "
                                     f"than {PARAM_TOLERANCE:.0%} (pattern {cfg.pattern}, mlp_hidden {cfg.mlp_hidden})")
        out[name] = {"config": cfg, "parameters": total, "non_embedding_parameters": body,
                     "ratio_to_reference": body / target}
    return out


# ---- running Braid --------------------------------------------------------------------------------

def braid(args: list[str], log_path: str, device: str) -> None:
    """`braid ARGS` in a subprocess, its output in log_path; a failure stops the experiment naming the log."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    if THREADS:
        env["OMP_NUM_THREADS"] = str(THREADS)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as out:
        out.write(f"$ braid {' '.join(args)}\n")
        out.flush()
        code = subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=REPO, stdout=out,
                              stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"braid {args[0]} {args[1] if len(args) > 1 else ''} failed (exit {code}); "
                           f"see {log_path}\n{tail}")


def prepare_corpus(preset: Preset, data_root: str, logs: str, device: str) -> str:
    """The long-document corpus as MDS rows of seq_len + 1 (tokenizer trained once); returns its folder."""
    out = os.path.join(data_root, f"stdlib_modules_L{preset.seq_len}")
    tokenizer = os.path.join(data_root, "tokenizer.json")
    corpus = os.path.join(data_root, "corpus")
    overrides = [f"output={out}", f"tokenizer.path={tokenizer}", f"shards.row_length={preset.seq_len + 1}",
                 f"corpus.path={corpus}", f"inputs=[{{type: jsonl, path: {corpus}, glob: '{preset.corpus_files}'}}]",
                 *preset.corpus_overrides]
    if not os.path.isfile(tokenizer):
        log(f"data: training the tokenizer -> {tokenizer}")
        braid(["data", "tokenizer", RECIPE, *overrides], os.path.join(logs, "data.log"), device)
    if not os.path.isfile(os.path.join(out, "braid_data.json")):
        log(f"data: preparing {out}")
        braid(["data", "prepare", RECIPE, *overrides], os.path.join(logs, "data.log"), device)
    return out


PAD = " ."          # one token per copy after a newline (checked): fills a document to exactly one row


def finetune_documents(tokenizer_path: str, preset: Preset, count: int, seed: int = 12345) -> list[dict[str, str]]:
    """Retrieval documents of exactly seq_len tokens (seq_len + 1 with the EOS the pipeline appends: one MDS row
    each, so no document is split between rows and no answer loses the context it needs):

    - even i: a passkey prompt at the training length, key at a uniform depth, and its answer (Samba's passkey
      fine-tune at the training length);
    - odd i: a phonebook of 2.. entries (every other one as JRT-Prompt, the phonebook twice) and its question
      with the answer, then further questions about other listed people with theirs while they fit (several
      lookups per row: a denser signal than one answer per document).

    The rest of the row is PAD after the last answer's newline (generation stops at the newline). The
    generators are the eval suites' own, with other seeds."""
    import random
    import re

    from data_pipeline.tokenizer import load_tokenizer
    from evals.tasks import derive_seed
    from evals.tasks import passkey as passkey_task
    from evals.tasks import phonebook as phonebook_task

    tokenizer = load_tokenizer(tokenizer_path)

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    target = preset.seq_len
    shortest = count_tokens(passkey_task.build_prompt("12345", 1, 0.5)[0] + " 12345.\n")
    if shortest + 8 > target:
        raise ValueError(f"seq_len={preset.seq_len}: too short for a passkey prompt ({shortest} tokens)")
    rng = random.Random(seed)

    def padded(text: str) -> str | None:
        missing = target - count_tokens(text)
        if missing < 0:
            return None
        text += PAD * missing
        return text if count_tokens(text) == target else None

    def phonebook_row(i: int) -> str | None:
        copies = 1 + (i // 2) % 2
        entries = rng.randint(2, 12 if copies == 1 else 6)
        sample = phonebook_task.make_sample(count_tokens, entries, derive_seed(seed, "ft", i), copies)
        book = dict(re.findall(r"^(.+): (\d{3}-\d{4}-\d{4})$", sample.prompt, re.M))
        text = f"{sample.prompt} {sample.answers[0]}.\n"
        for name in rng.sample(sorted(book), len(book)):
            more = f"{phonebook_task.question(name)} {book[name]}.\n"
            if count_tokens(text + more) > target:
                break
            text += more
        return padded(text)

    docs: list[dict[str, str]] = []
    i = 0
    while len(docs) < count:
        if i % 2 == 0:
            sample = passkey_task.make_sample(count_tokens, target, rng.random(), derive_seed(seed, "ft", i), 8)
            text = padded(f"{sample.prompt} {sample.answers[0]}.\n")
        else:
            text = phonebook_row(i)
        if text is not None:
            docs.append({"id": f"retrieval-{i}", "text": text})
        i += 1
    return docs


def prepare_finetune_data(preset: Preset, data_root: str, tokenizer: str, logs: str, device: str) -> str:
    out = os.path.join(data_root, f"retrieval_rows_L{preset.seq_len}_n{preset.ft_documents}")
    if os.path.isfile(os.path.join(out, "braid_data.json")):
        return out
    log(f"data: retrieval fine-tune documents -> {out}")
    corpus = out + ".corpus"
    os.makedirs(corpus, exist_ok=True)
    with open(os.path.join(corpus, "retrieval.jsonl"), "w") as f:
        for doc in finetune_documents(tokenizer, preset, preset.ft_documents):
            f.write(json.dumps(doc) + "\n")
    recipe = {"output": out, "overwrite": True, "inputs": [{"type": "jsonl", "path": corpus}],
              "dedup": {"method": "none"}, "tokenizer": {"path": tokenizer},
              "shards": {"row_length": preset.seq_len + 1, "size_limit": "16MB"}}
    recipe_path = os.path.join(corpus, "recipe.yaml")
    with open(recipe_path, "w") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
    braid(["data", "prepare", recipe_path], os.path.join(logs, "data.log"), device)
    return out


def train_config(run_dir: str, seed: int, cfg, streams: list[dict[str, Any]], val: str | None, preset: Preset,
                 steps: int, lr: float) -> dict[str, Any]:
    return {
        "run_dir": run_dir, "seed": seed, "model": cfg.to_dict(),
        "data": {"train": streams, "val": val, "seq_len": preset.seq_len, "micro_batch": preset.micro_batch},
        "optim": {"lr": lr, "weight_decay": 0.1, "betas": [0.9, 0.95], "grad_clip": 1.0},
        "schedule": {"name": "cosine", "warmup_fraction": 0.05, "min_lr_ratio": 0.1},
        "train": {"max_steps": steps, "log_every": max(1, min(10, steps // 4)), "val_every": 0,
                  "val_samples": 16, "val_lengths": [1, 2, 4]},
        "checkpoint": {"every": max(steps // 4, min(steps, 50)), "keep": 1},     # an interrupted run resumes
        "logging": {"tensorboard": False},
    }


def finished(run_dir: str, steps: int) -> bool:
    from pretrain.checkpoint import latest_tag
    tag = latest_tag(run_dir) if os.path.isdir(run_dir) else None
    return tag == f"step_{steps:08d}"


def run_training(config: dict[str, Any], logs: str, device: str) -> None:
    os.makedirs(config["run_dir"], exist_ok=True)
    path = os.path.join(config["run_dir"], "experiment.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    braid(["train", path], logs, device)


def start_finetune(pretrain_dir: str, finetune_dir: str) -> None:
    """A weights-only step 0 in the fine-tune run: `braid train` starts from the pretrained weights."""
    from conversion.checkpoint import load_training_checkpoint
    from pretrain.checkpoint import latest_tag, save_weights_only
    if latest_tag(finetune_dir) if os.path.isdir(finetune_dir) else None:
        return
    state, cfg, info = load_training_checkpoint(pretrain_dir)
    save_weights_only(finetune_dir, [state], cfg.to_dict(), {"tp": 1, "pp": 1},
                      source=os.path.abspath(pretrain_dir))


# ---- evals ----------------------------------------------------------------------------------------

def run_eval(what: str, suite: str, model_dir: str, out_dir: str, device: str, **options: Any) -> dict[str, Any]:
    """One `braid eval` suite in this process (evals.<suite>.run, as the command line calls it); skipped
    when out_dir already holds its results."""
    import importlib

    import torch

    from evals.common import load_eval_model
    path = os.path.join(out_dir, "results.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    log(f"eval {what}")
    lm = load_eval_model(model_dir, device=device, dtype=torch.float32)
    record = importlib.import_module(f"evals.{suite}").run(lm, out_dir, **options)
    del lm
    return record


def evaluate_pretrained(name: str, seed: int, run_dir: str, preset: Preset, val: str, device: str) -> dict[str, Any]:
    return {"ppl": run_eval(f"{name} seed {seed}: ppl by position to {preset.ppl_length} tokens", "ppl",
                            run_dir, os.path.join(run_dir, "evals", "ppl"), device, data=val,
                            length=preset.ppl_length, chunk=min(1024, preset.ppl_length),
                            samples=preset.ppl_samples, batch_size=min(4, preset.ppl_samples), seed=0,
                            progress=False)}


def evaluate_finetuned(name: str, seed: int, run_dir: str, preset: Preset, device: str) -> dict[str, Any]:
    evals = os.path.join(run_dir, "evals")
    out = {"passkey": run_eval(f"{name} seed {seed}: passkey at {preset.passkey_lengths}", "passkey",
                               run_dir, os.path.join(evals, "passkey"), device,
                               lengths=preset.passkey_lengths, depths=preset.passkey_depths,
                               samples=preset.passkey_samples, batch_size=preset.eval_batch, seed=0,
                               progress=False)}
    for copies in (1, 2):
        out[f"phonebook_x{copies}"] = run_eval(
            f"{name} seed {seed}: phonebook of {preset.phonebook_entries} entries, context x{copies}", "phonebook",
            run_dir, os.path.join(evals, f"phonebook_x{copies}"), device,
            entries=preset.phonebook_entries, samples=preset.phonebook_samples, batch_size=preset.eval_batch,
            seed=0, progress=False, repeat_context=copies)
    return out


def speed_side_by_side(model_dirs: dict[str, str], preset: Preset, device: str, out_dir: str) -> dict[str, Any]:
    """Prefill and decode speed and decode memory of every model at each context length, measured round-robin
    (each model in turn at a length, `speed_repeats` rounds, the median kept, min and max beside it) so that
    the load of a shared machine drifts over all models alike; the speed suite's own measurements
    (evals.speed.time_side_by_side, memory_point, summarize_point).
    Writes out_dir/results.json (suite "speed", one series per model) and speed.png."""
    import torch

    from evals.common import load_eval_model, write_results
    from evals.speed import MEMORY_MEASURE, memory_point, plot, summarize_point, time_side_by_side
    path = os.path.join(out_dir, "results.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    log(f"speed: {', '.join(model_dirs)} at {preset.speed_lengths}, {preset.speed_repeats} rounds")
    models = {name: load_eval_model(d, device=device, dtype=torch.float32).model for name, d in model_dirs.items()}
    chunk = min(1024, max(preset.speed_lengths))
    points: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
    for length in preset.speed_lengths:
        # the speed suite's own measurements: every model in turn within each round, the median kept
        times = time_side_by_side(models, length, preset.speed_decode_tokens, preset.speed_repeats, 1, chunk)
        for name, model in models.items():
            memory = memory_point(model, length, preset.speed_decode_tokens, 1, chunk, 0)
            points[name].append(summarize_point(length, times[name], preset.speed_decode_tokens, 1, memory))
    settings = {"lengths": preset.speed_lengths, "decode_tokens": preset.speed_decode_tokens,
                "rounds": preset.speed_repeats, "batch_size": 1, "prefill_chunk": chunk, "device": device,
                "threads": torch.get_num_threads(), "models": model_dirs,
                "patterns": {name: m.cfg.pattern for name, m in models.items()},
                "memory_measure": MEMORY_MEASURE["cuda" if device.startswith("cuda") else "cpu"],
                "timing": "each model in turn at each length (order alternating), `rounds` times; per round one "
                          "timed prefill of `length` tokens (in prefill_chunk pieces through the cache) and "
                          "decode_tokens greedy single-token steps continuing one cache; the median over rounds"}
    write_results(out_dir, "speed", {"points": points}, settings)
    plot(points, os.path.join(out_dir, "speed.png"), "decode/prefill speed and memory vs context")
    with open(path) as f:
        return json.load(f)


# ---- summary --------------------------------------------------------------------------------------

def spread(values: list[float]) -> dict[str, Any]:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


def summarise(results: dict[str, dict[int, dict[str, Any]]], speed: dict[str, Any], models: dict[str, Any],
              meta: dict[str, Any]) -> dict[str, Any]:
    """Per model: ppl per position bucket, passkey accuracy per length, phonebook per entries (x1, x2),
    speed per length; each as mean/min/max over seeds."""
    summary: dict[str, Any] = {"meta": meta, "models": {}}
    for name, per_seed in results.items():
        seeds = sorted(per_seed)
        first = per_seed[seeds[0]]
        entry: dict[str, Any] = {
            "pattern": models[name]["config"].pattern, "mlp_hidden": models[name]["config"].mlp_hidden,
            "parameters": models[name]["parameters"],
            "non_embedding_parameters": models[name]["non_embedding_parameters"], "seeds": seeds,
            "train_loss_end": spread([r["train"]["loss"] for r in per_seed.values()]),
            "val_loss": {k: spread([r["train"].get(f"val_loss@{k}x") for r in per_seed.values()]) for k in (1, 2, 4)},
        }
        buckets = first["ppl"]["scores"]["buckets"]
        entry["ppl_by_position"] = [
            {"start": b["start"], "end": b["end"],
             "ppl": spread([r["ppl"]["scores"]["buckets"][i]["ppl"] for r in per_seed.values()])}
            for i, b in enumerate(buckets)]
        entry["ppl_nll_at_train_length"] = spread([r["ppl"]["scores"]["nll_at_train_length"] for r in per_seed.values()])
        entry["ppl_nll_beyond"] = spread([r["ppl"]["scores"]["nll_beyond"] for r in per_seed.values()])
        done = [r for r in per_seed.values() if "passkey" in r]          # fine-tuned and evaluated
        if done:
            entry["retrieval_seeds"] = [seed for seed, r in per_seed.items() if "passkey" in r]
            entry["passkey_by_length"] = {
                length: spread([statistics.fmean(r["passkey"]["scores"]["grid"][length].values()) for r in done])
                for length in done[0]["passkey"]["scores"]["grid"]}
            entry["passkey_grid_first_seed"] = done[0]["passkey"]["scores"]["grid"]
            for copies in (1, 2):
                key = f"phonebook_x{copies}"
                entry[key] = {n: spread([r[key]["scores"]["accuracy_by_entries"][n] for r in done])
                              for n in done[0][key]["scores"]["accuracy_by_entries"]}
                entry[f"{key}_prompt_tokens"] = done[0][key]["settings"]["prompt_tokens"]
        entry["speed"] = speed["scores"]["points"][name]
        summary["models"][name] = entry
    if "transformer" in summary["models"]:
        base = {p["length"]: p for p in summary["models"]["transformer"].get("speed", [])}
        for entry in summary["models"].values():
            for point in entry.get("speed", []):
                ref = base.get(point["length"])
                if ref:
                    point["decode_speedup_vs_transformer"] = point["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
                    point["memory_ratio_transformer_over_model"] = ref["decode_memory_bytes"] / point["decode_memory_bytes"]
    return summary


def fmt(s: dict[str, Any], digits: int = 2, pct: bool = False) -> str:
    if s is None or s.get("mean") is None:
        return "–"
    scale = 100 if pct else 1
    mean = f"{s['mean'] * scale:.{digits}f}"
    if s["n"] > 1:
        return f"{mean} ({s['min'] * scale:.{digits}f}–{s['max'] * scale:.{digits}f})"
    return mean


def markdown(summary: dict[str, Any]) -> str:
    meta, models = summary["meta"], summary["models"]
    names = list(models)
    lines = [f"# Experiment results: preset `{meta['preset']}`", "",
             f"Seeds {meta['seeds']}; training length {meta['seq_len']}; {meta['train_tokens']:,} training tokens per "
             f"model; cells are the mean over seeds with (min–max) when there are several.", "",
             "## Models", "", "| model | pattern | mlp_hidden | parameters | non-embedding | vs samba | final train loss "
             "| val loss @1x / @4x |", "|---|---|---|---|---|---|---|---|"]
    for n in names:
        m = models[n]
        lines.append(f"| {n} | `{m['pattern']}` | {m['mlp_hidden']} | {m['parameters']:,} | "
                     f"{m['non_embedding_parameters']:,} | {m['non_embedding_parameters'] / models[names[0]]['non_embedding_parameters']:.3f} | "
                     f"{fmt(m['train_loss_end'], 3)} | {fmt(m['val_loss'][1], 3)} / {fmt(m['val_loss'][4], 3)} |")
    buckets = models[names[0]]["ppl_by_position"]
    lines += ["", "## Perplexity by position (held-out whole modules, document-bounded windows)", "",
              "| model | " + " | ".join(f"{b['start']}–{b['end'] - 1}" for b in buckets) + " |",
              "|---|" + "---|" * len(buckets)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(fmt(b["ppl"], 1) for b in models[n]["ppl_by_position"]) + " |")
    tuned = [n for n in names if "passkey_by_length" in models[n]]
    if tuned:
        lines += retrieval_tables(models, tuned, meta)
    lines += speed_table(models, names, meta)
    return "\n".join(lines)


def retrieval_tables(models: dict[str, Any], names: list[str], meta: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    lengths = list(models[names[0]]["passkey_by_length"])
    lines += ["", "## Passkey accuracy (%) after the retrieval fine-tune at the training length", "",
              "| model | " + " | ".join(f"{int(x) // meta['seq_len']}x ({x})" for x in lengths) + " |",
              "|---|" + "---|" * len(lengths)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(fmt(models[n]["passkey_by_length"][x], 0, pct=True) for x in lengths) + " |")
    entries = list(models[names[0]]["phonebook_x1"])
    lines += ["", "## Phonebook lookup accuracy (%): context once / JRT-Prompt (context twice)", "",
              "| model | " + " | ".join(f"{e} entries" for e in entries) + " |", "|---|" + "---|" * len(entries)]
    for n in names:
        m = models[n]
        lines.append(f"| {n} | " + " | ".join(f"{fmt(m['phonebook_x1'][e], 0, pct=True)} / "
                                              f"{fmt(m['phonebook_x2'][e], 0, pct=True)}" for e in entries) + " |")
    tokens = models[names[0]]
    lines.append("")
    lines.append("Prompt tokens (context once / twice): " + ", ".join(
        f"{e}: {tokens['phonebook_x1_prompt_tokens'][e]:.0f} / {tokens['phonebook_x2_prompt_tokens'][e]:.0f}"
        for e in entries))
    return lines


def speed_table(models: dict[str, Any], names: list[str], meta: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if all("speed" in models[n] for n in names):
        speed_lengths = [p["length"] for p in models[names[0]]["speed"]]
        lines += ["", f"## Decode speed (tokens/s, batch 1) and decode memory (MiB) vs context ({meta['device']}, "
                      f"{meta['threads']} threads)", "",
                  "| model | " + " | ".join(f"{x} tok/s | {x} MiB" for x in speed_lengths) + " |",
                  "|---|" + "---|---|" * len(speed_lengths)]
        for n in names:
            cells = []
            for p in models[n]["speed"]:
                ratio = p.get("decode_speedup_vs_transformer")
                cells.append(f"{p['decode_tokens_per_s']:.0f}" + (f" ({ratio:.2f}x)" if ratio and n != "transformer" else ""))
                cells.append(f"{p['decode_memory_bytes'] / 2 ** 20:.1f}")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("(x): decode tokens/s relative to the transformer at the same context, measured in the same run.")
    lines.append("")
    return lines


def band(ax, xs: list[float], stats: list[dict[str, Any]], label: str, color: str) -> None:
    """The mean over seeds as a line, min..max as a shaded band."""
    ax.plot(xs, [s["mean"] for s in stats], marker="o", label=label, color=color)
    if any(s["n"] > 1 for s in stats):
        ax.fill_between(xs, [s["min"] for s in stats], [s["max"] for s in stats], alpha=0.2, color=color)


def plots(summary: dict[str, Any], out: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, meta = summary["models"], summary["meta"]
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, m) in enumerate(models.items()):
        xs = [math.sqrt(b["start"] * max(b["end"] - 1, b["start"])) for b in m["ppl_by_position"]]
        band(ax, xs, [b["ppl"] for b in m["ppl_by_position"]], f"{name} ({m['pattern'][:6]}...)", f"C{i}")
    ax.axvline(meta["seq_len"], color="k", linestyle="--", label=f"training length {meta['seq_len']}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("position (tokens of context in the document)")
    ax.set_ylabel("perplexity (bucket mean)")
    ax.set_title("Perplexity by position, held-out whole modules")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(os.path.join(out, "ppl_by_position.png"))
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    tuned = {name: m for name, m in models.items() if "passkey_by_length" in m}
    if tuned:
        written += retrieval_plots(tuned, meta, out)
    written += speed_plot(models, meta, out)
    return written


def retrieval_plots(models: dict[str, Any], meta: dict[str, Any], out: str) -> list[str]:
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, m) in enumerate(models.items()):
        lengths = list(m["passkey_by_length"])
        band(ax, [int(x) for x in lengths], [m["passkey_by_length"][x] for x in lengths], name, f"C{i}")
    ax.axvline(meta["seq_len"], color="k", linestyle="--", label="training length")
    written.append(save_accuracy_plot(fig, ax, "context length (tokens)", "passkey accuracy (all depths)",
                                      "Passkey after a retrieval fine-tune at the training length",
                                      os.path.join(out, "passkey.png")))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, m) in enumerate(models.items()):
        for copies, style in ((1, "-"), (2, "--")):
            key = f"phonebook_x{copies}"
            entries = list(m[key])
            stats = [m[key][e] for e in entries]
            ax.plot([int(e) for e in entries], [s["mean"] for s in stats], marker="o", linestyle=style,
                    color=f"C{i}", label=f"{name}" + (" JRT (x2)" if copies == 2 else ""))
    written.append(save_accuracy_plot(fig, ax, "phonebook entries", "lookup accuracy",
                                      "Phonebook lookup: context once (solid) / JRT-Prompt (dashed)",
                                      os.path.join(out, "phonebook.png"), legend_columns=2))
    return written


def save_accuracy_plot(fig, ax, xlabel: str, ylabel: str, title: str, path: str, legend_columns: int = 1) -> str:
    """An accuracy (0..1) against a log2 x axis, labelled, saved to `path` and closed; returns path."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8 if legend_columns == 1 else 7, ncol=legend_columns)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def speed_plot(models: dict[str, Any], meta: dict[str, Any], out: str) -> list[str]:
    """The speed suite's own figure of the four models side by side."""
    from evals.speed import plot
    if not all("speed" in m for m in models.values()):
        return []
    path = os.path.join(out, "speed.png")
    plot({name: m["speed"] for name, m in models.items()}, path,
         f"Prefill/decode speed and decode memory vs context ({meta['device']}, batch 1)")
    return [path]


# ---- the command ----------------------------------------------------------------------------------

def last_metrics(run_dir: str) -> dict[str, Any]:
    """The last training-loss record and the final validation losses of a run's metrics.jsonl."""
    out: dict[str, Any] = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:
                out["loss"] = record["loss"]
            out.update({k: v for k, v in record.items() if k.startswith("val_loss@")})
    return out


def write_summary(results: dict[str, dict[int, dict[str, Any]]], speed: dict[str, Any], models: dict[str, Any],
                  meta: dict[str, Any], runs: str, out: str) -> list[str]:
    """OUT/summary.json, summary.md, the PNGs, and raw/: a copy of every suite's results.json."""
    summary = summarise(results, speed, models, meta)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(markdown(summary))
    figures = plots(summary, out)
    raw = os.path.join(out, "raw")
    os.makedirs(os.path.join(raw, "speed"), exist_ok=True)
    shutil.copyfile(os.path.join(runs, "speed", "results.json"), os.path.join(raw, "speed", "results.json"))
    for name, per_seed in results.items():
        for seed in per_seed:
            for stage in ("pretrain", "finetune"):
                src = os.path.join(runs, f"{name}-s{seed}", stage, "evals")
                if os.path.isdir(src):
                    for suite in os.listdir(src):
                        path = os.path.join(src, suite, "results.json")
                        if os.path.isfile(path):
                            dst = os.path.join(raw, f"{name}-s{seed}", suite)
                            os.makedirs(dst, exist_ok=True)
                            shutil.copyfile(path, os.path.join(dst, "results.json"))
    log(f"summary: {os.path.join(out, 'summary.md')}")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: the preset's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (training and evals)")
    parser.add_argument("--runs", help="run folders (default runs/experiments/PRESET)")
    parser.add_argument("--data", default=os.path.join(REPO, "data", "experiments"), help="prepared data folder")
    parser.add_argument("--out", help="summary folder (default experiments/results/PRESET)")
    parser.add_argument("--threads", type=int, help="torch threads per process (default: torch's; on a CPU "
                                                     "shared with other jobs, 1 avoids oversubscription)")
    args = parser.parse_args(argv)
    global THREADS
    THREADS = args.threads
    if THREADS:
        import torch
        torch.set_num_threads(THREADS)

    preset = dataclasses.replace(PRESETS[args.preset], seeds=args.seeds or PRESETS[args.preset].seeds)
    runs = os.path.abspath(args.runs or os.path.join(REPO, "runs", "experiments", args.preset))
    out = os.path.abspath(args.out or os.path.join(REPO, "experiments", "results", args.preset))
    logs = os.path.join(runs, "logs")
    os.makedirs(out, exist_ok=True)
    started = time.time()

    corpus = prepare_corpus(preset, os.path.abspath(args.data), logs, args.device)
    tokenizer = os.path.join(os.path.abspath(args.data), "tokenizer.json")
    from data_pipeline.tokenizer import load_tokenizer
    vocab_size = load_tokenizer(tokenizer).get_vocab_size()
    models = solve_models(preset, vocab_size, args.models)
    for name, m in models.items():
        log(f"model {name}: {m['config'].pattern} mlp_hidden {m['config'].mlp_hidden}, {m['parameters']:,} parameters "
            f"({m['non_embedding_parameters']:,} without the embedding, {m['ratio_to_reference']:.3f}x {REFERENCE})")
    finetune_data = prepare_finetune_data(preset, os.path.abspath(args.data), tokenizer, logs, args.device)
    train_split, val_split = os.path.join(corpus, "train"), os.path.join(corpus, "val")

    import torch
    meta = {"preset": args.preset, "preset_settings": dataclasses.asdict(preset), "seeds": preset.seeds,
            "seq_len": preset.seq_len, "train_tokens": preset.steps * preset.micro_batch * preset.seq_len,
            "finetune_tokens": preset.ft_steps * preset.micro_batch * preset.seq_len, "device": args.device,
            "threads": torch.get_num_threads(), "runs": runs, "data": corpus, "finetune_data": finetune_data,
            "python": sys.version.split()[0], "torch": torch.__version__}

    def run_dirs(name: str, seed: int) -> dict[str, str]:
        return {stage: os.path.join(runs, f"{name}-s{seed}", stage) for stage in ("pretrain", "finetune")}

    # phase 1: pretraining and perplexity, every seed (the claims about length extrapolation)
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for seed in preset.seeds:
        for name in args.models:
            dirs = run_dirs(name, seed)
            if not finished(dirs["pretrain"], preset.steps):
                log(f"train {name} seed {seed}: {preset.steps} steps x {preset.micro_batch} x {preset.seq_len} tokens")
                run_training(train_config(dirs["pretrain"], seed, models[name]["config"], [{"path": train_split}],
                                          val_split, preset, preset.steps, preset.lr),
                             os.path.join(logs, f"{name}-s{seed}-pretrain.log"), args.device)
            record = evaluate_pretrained(name, seed, dirs["pretrain"], preset, val_split, args.device)
            record["train"] = last_metrics(dirs["pretrain"])
            results.setdefault(name, {})[seed] = record
    # phase 2: decode speed and memory, the seed-0 models side by side
    speed = speed_side_by_side({name: run_dirs(name, preset.seeds[0])["pretrain"] for name in args.models},
                               preset, args.device, os.path.join(runs, "speed"))
    write_summary(results, speed, models, {**meta, "wall_s": round(time.time() - started, 1)}, runs, out)
    # phase 3: the retrieval fine-tune and the retrieval suites, every seed
    for seed in preset.seeds:
        for name in args.models:
            dirs = run_dirs(name, seed)
            if not finished(dirs["finetune"], preset.ft_steps):
                log(f"fine-tune {name} seed {seed}: {preset.ft_steps} steps, {preset.ft_proportion:.0%} retrieval rows")
                start_finetune(dirs["pretrain"], dirs["finetune"])
                streams = [{"path": os.path.join(finetune_data, "train"), "proportion": preset.ft_proportion},
                           {"path": train_split, "proportion": round(1 - preset.ft_proportion, 6)}]
                run_training(train_config(dirs["finetune"], seed, models[name]["config"], streams, None, preset,
                                          preset.ft_steps, preset.ft_lr),
                             os.path.join(logs, f"{name}-s{seed}-finetune.log"), args.device)
            results[name][seed].update(evaluate_finetuned(name, seed, dirs["finetune"], preset, args.device))
    figures = write_summary(results, speed, models, {**meta, "wall_s": round(time.time() - started, 1)}, runs, out)
    log(f"done in {time.time() - started:.0f}s: {os.path.join(out, 'summary.md')}, {len(figures)} plots, raw/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
