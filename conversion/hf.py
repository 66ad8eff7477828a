"""Training checkpoints <-> Hugging Face folders.

    to_hf("runs/tiny", "runs/tiny/hf")              # config.json, safetensors, remote code, tokenizer, card
    to_hf("runs/tiny", "out", fmt="native")          # transformers' own class for the pattern (conversion/native.py)
    from_hf("runs/tiny/hf", "runs/continued", tp=2, pp=2)   # a run directory `braid train` starts from

A `braid` folder ships the model's own source as remote code: the torch-only files of
`model/` flattened to `braid_*.py` (transformers loads remote code from one folder, without
subpackages) beside `configuration_braid.py` and `modeling_braid.py` (conversion/remote/). Its
tensors keep HybridLM's names under `model.`; a tied head is stored once, as the embedding.

`fmt="native"` (or a class's family name: mamba, mamba2, llama, mistral, qwen2, nemotron_h,
granitemoehybrid) writes transformers' own architecture instead (conversion/native.py), which
vLLM and llama.cpp serve.

Every output is written to a temporary folder beside OUT_DIR and renamed into place at the end,
so a failed conversion leaves nothing half-written. Inputs are read with safetensors or
torch.load(weights_only=True), and every tensor's shape is checked against the model config.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from typing import Any

import torch
import yaml
from torch import Tensor

from conversion.native import BY_MODEL_TYPE, FAMILIES, Family, native_family, read_native, serving_notes
from data_pipeline.tokenizer import check_recorded_tokenizer, file_sha256
from model import ConfigError, HybridLM, ModelConfig

MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model")
REMOTE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote")
# model/ files that import only torch: the rest (sharding, parallel) need megatron or are package glue
REMOTE_SOURCES = ["config.py", "cache.py", "sequence.py", "kernels.py", "hybrid.py", "layers/__init__.py",
                  *(f"layers/{n}" for n in ("common.py", "attention.py", "gla.py", "mamba.py", "mamba2.py",
                                           "mlp.py", "rglru.py")),
                  *(f"ops/{n}" for n in ("attention.py", "conv.py", "linear_attention.py", "precision.py",
                                        "scan.py", "selective_scan.py"))]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PREFIX = "model."                    # BraidForCausalLM.model is the HybridLM


# ---- remote code: model/ flattened into one folder ---------------------------------------------

def _flat_name(module: str) -> str:
    """model.layers.attention -> braid_layers_attention; model.layers -> braid_layers."""
    return "braid_" + module.removeprefix("model.").replace(".", "_")


def remote_code() -> dict[str, str]:
    """File name -> source of every file an exported folder needs besides its weights."""
    files: dict[str, str] = {}
    known = {"model." + p.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for p in REMOTE_SOURCES}
    for rel in REMOTE_SOURCES:
        package = "model." + os.path.dirname(rel).replace("/", ".") if "/" in rel else "model"
        if rel.endswith("__init__.py"):
            module = package
        else:
            module = package + "." + os.path.basename(rel).removesuffix(".py")

        def rewrite(match: re.Match) -> str:
            indent, dots, name = match.group(1), match.group(2), match.group(3)
            base = package.split(".")
            base = base[:len(base) - (len(dots) - 1)]
            target = ".".join(base + ([name] if name else []))
            if target not in known:
                raise ValueError(f"model/{rel} imports {target}, which the remote code does not ship "
                                 "(add it to conversion.hf.REMOTE_SOURCES)")
            return f"{indent}from .{_flat_name(target)} import"

        with open(os.path.join(MODEL_DIR, rel)) as f:
            source = f.read()
        source = re.sub(r"^(\s*)from (\.+)([\w.]*) import", rewrite, source, flags=re.MULTILINE)
        header = f"# Braid remote code: a copy of model/{rel} with its imports flattened (conversion/hf.py).\n"
        files[_flat_name(module) + ".py"] = header + source
    for name in ("configuration_braid.py", "modeling_braid.py"):
        with open(os.path.join(REMOTE_DIR, name)) as f:
            files[name] = f.read()
    # transformers copies into its module cache only the files the model file imports itself
    # (not their imports in turn), so the model file names every flattened module
    files["modeling_braid.py"] += (
        "\n\n# Every flattened module, named so that transformers copies it (added by conversion/hf.py).\n"
        + "".join(f"from .{name.removesuffix('.py')} import __name__ as _{name.removesuffix('.py')}  # noqa: F401\n"
                  for name in sorted(files) if name.startswith("braid_")))
    return files


# ---- writing -------------------------------------------------------------------------------------

def check_output(out_dir: str, overwrite: bool) -> str:
    """The absolute OUT_DIR, refused early (before any work) when it holds something and overwrite is off."""
    out_dir = os.path.abspath(out_dir.rstrip("/"))
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) and not overwrite:
        raise FileExistsError(f"{out_dir}: exists and is not empty; remove it, pick another folder, "
                              "or pass --overwrite")
    return out_dir


@contextlib.contextmanager
def staged_output(out_dir: str, overwrite: bool = False) -> Iterator[str]:
    """A temporary folder beside `out_dir`, renamed to it when the block succeeds and removed when it fails."""
    out_dir = check_output(out_dir, overwrite)
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
        normal_modes(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = os.path.join(parent, f".{name}.old-{os.getpid()}")
    if os.path.exists(out_dir):
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def normal_modes(folder: str) -> None:
    """Every file and folder under `folder` with the modes `open`/`mkdir` give under this umask (0644 and 0755
    under the usual 022): some writers (safetensors) create their files 0600, unreadable to a group that
    shares the release."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def parse_size(text: str | int) -> int:
    """'5GB', '200MB', '10KB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"--max-shard-size={text!r}: expected a size such as 5GB, 500MB or a byte count")
    unit = (match.group(2) or "B").upper().replace("I", "")
    return int(float(match.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[unit])


def write_safetensors(tensors: dict[str, Tensor], folder: str, max_shard_bytes: int,
                      progress: bool = True) -> tuple[list[str], int]:
    """model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json above
    `max_shard_bytes`. Returns (file names, total bytes)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    names = [SAFE_WEIGHTS] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    with tqdm(total=total, unit="B", unit_scale=True, desc="write safetensors", disable=not progress) as bar:
        for file_name, shard in zip(names, shards):
            save_file(shard, os.path.join(folder, file_name), metadata={"format": "pt"})
            bar.update(sum(t.numel() * t.element_size() for t in shard.values()))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {name: file_name for file_name, shard in zip(names, shards) for name in shard}}
        with open(os.path.join(folder, SAFE_INDEX), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    return names, total


def _write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _run_facts(tag: str, info: dict[str, Any]) -> dict[str, Any]:
    """What the run directory around a checkpoint says: its config, tokens seen, tokenizer, data, evals."""
    from conversion.checkpoint import run_tokenizer
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(tag)))
    facts: dict[str, Any] = {"run_dir": run_dir, "step": info.get("step")}
    config_path = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            facts["train_config"] = yaml.safe_load(f) or {}
        data = facts["train_config"].get("data", {})
        train = facts["train_config"].get("train", {})
        dp = (info.get("layout") or {}).get("dp", 1)
        if info.get("tokens_seen") is not None:
            facts["tokens_seen"] = info["tokens_seen"]
        elif info.get("step") is not None and data.get("micro_batch") and data.get("seq_len"):
            facts["tokens_seen"] = (info["step"] * data["micro_batch"] * data["seq_len"]
                                    * (train.get("grad_accum") or 1) * dp)
    facts["tokenizer"], data_facts = run_tokenizer(run_dir)
    facts.update(data_facts)
    if data_facts.get("data_info"):
        with open(data_facts["data_info"]) as f:
            data_info = json.load(f)
        split = ((data_info.get("stats") or {}).get("splits") or {}).get("train") or {}
        facts["dataset"] = {"name": os.path.basename(os.path.dirname(data_facts["data_info"])),
                            "documents": split.get("documents"), "tokens": split.get("tokens"),
                            "vocab_size": data_facts.get("tokenizer_vocab_size")}
    facts["evals"] = _run_evals(run_dir, info.get("step"))
    return facts


def _run_evals(run_dir: str, step: int | None) -> dict[str, tuple[str, dict[str, Any]]]:
    """suite -> (its folder, results.json) of the run's evals, those of the exported step first
    (RUN_DIR/evals/step_N/SUITE, written by training's eval hooks), else RUN_DIR/evals/SUITE."""
    evals: dict[str, tuple[str, dict[str, Any]]] = {}
    root = os.path.join(run_dir, "evals")
    for folder in ([os.path.join(root, f"step_{step:08d}")] if step is not None else []) + [root]:
        for suite in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            path = os.path.join(folder, suite, "results.json")
            if suite not in evals and os.path.isfile(path):
                with open(path) as f:
                    evals[suite] = (os.path.join(folder, suite), json.load(f))
    return evals


def _portable(value: Any) -> Any:
    """A results.json value with every absolute local path cut to its last component."""
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value) and "\n" not in value:
        return os.path.basename(value.rstrip("/")) or value
    return value


def _ship_evals(evals: dict[str, tuple[str, dict[str, Any]]], folder: str) -> dict[str, str]:
    """Copy each suite's results.json (local paths cut) and figure into folder/evals/SUITE/, so that what the
    model card cites travels with the model; returns suite -> its results.json, relative to `folder`."""
    shipped = {}
    for suite, (source, record) in evals.items():
        dest = os.path.join(folder, "evals", suite)
        os.makedirs(dest, exist_ok=True)
        record = _portable({k: v for k, v in record.items() if k != "samples_file"})
        figure = record.get("figure")
        if figure and os.path.isfile(os.path.join(source, figure)):
            shutil.copyfile(os.path.join(source, figure), os.path.join(dest, figure))
        else:
            record.pop("figure", None)
        _write_json(os.path.join(dest, "results.json"), record)
        shipped[suite] = f"evals/{suite}/results.json"
    return shipped


def check_tokenizer_vocab(tokenizer_path: str, vocab_size: int, where: str) -> None:
    """A tokenizer whose ids reach past the model's vocabulary belongs to other weights: one line."""
    from tokenizers import Tokenizer
    try:
        size = Tokenizer.from_file(tokenizer_path).get_vocab_size(with_added_tokens=True)
    except Exception as err:
        raise ValueError(f"{tokenizer_path} cannot be read as a tokenizer ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if size > vocab_size:
        raise ValueError(f"{where}: tokenizer {tokenizer_path} has {size} tokens, the weights' vocabulary "
                         f"{vocab_size}: they do not belong together")


def _tokenizer_files(tokenizer_path: str, folder: str, facts: dict[str, Any], vocab_size: int) -> dict:
    """tokenizer.json plus the config files AutoTokenizer reads; returns the special token ids. No
    model_max_length: the recurrent and window layers have no hard length limit (the training length is in
    config.json's `training`), and a cap would make every longer prompt warn about indexing errors."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from data_pipeline.recipe import TokenizerSpec
    check_tokenizer_vocab(tokenizer_path, vocab_size, "--tokenizer")
    tok = Tokenizer.from_file(tokenizer_path)
    # the run's data says which ids separate and pad documents; a tokenizer given by hand: the recipe defaults
    eos_id, pad_id = facts.get("eos_id"), facts.get("pad_id")
    eos_id = tok.token_to_id(TokenizerSpec.eos_token) if eos_id is None else eos_id
    pad_id = tok.token_to_id(TokenizerSpec.pad_token) if pad_id is None else pad_id
    specials = {}
    if eos_id is not None:
        specials["eos_token"] = tok.id_to_token(eos_id)
        specials["bos_token"] = tok.id_to_token(eos_id)   # documents were separated by EOS only
    if pad_id is not None:
        specials["pad_token"] = tok.id_to_token(pad_id)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok,
                                   model_input_names=["input_ids", "attention_mask"],
                                   clean_up_tokenization_spaces=False, **specials)
    fast.save_pretrained(folder)
    # transformers 5 names its fast tokenizer class TokenizersBackend, which 4.x cannot load; both load
    # PreTrainedTokenizerFast (so do llama.cpp's converter, pinned to 4.57, and vLLM)
    config_path = os.path.join(folder, "tokenizer_config.json")
    with open(config_path) as f:
        tokenizer_config = json.load(f)
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    _write_json(config_path, tokenizer_config)
    return {"eos_token_id": eos_id, "bos_token_id": eos_id, "pad_token_id": pad_id}


# Training-config sections a model card shows (paths, launch, logging and eval-hook settings stay local:
# Slurm accounts, setup lines and environment variables are where people put site details and secrets).
CARD_CONFIG_SECTIONS = ("seed", "data", "optim", "schedule", "train", "parallel")
CARD_DATA_KEYS = ("seq_len", "micro_batch", "global_batch")


def _card_training_config(config: dict[str, Any]) -> dict[str, Any]:
    """The training config as a model card shows it: CARD_CONFIG_SECTIONS, data streams by name, no local paths."""
    shown = {k: config[k] for k in CARD_CONFIG_SECTIONS if k in config}
    if isinstance(shown.get("data"), dict):
        data = config["data"]
        streams = [s if isinstance(s, dict) else {"path": s} for s in data.get("train") or []]
        shown["data"] = {"train": [{"name": _data_name(s.get("path")), **({"proportion": s["proportion"]}
                                    if s.get("proportion") is not None else {})} for s in streams],
                         **({"val": _data_name(data["val"])} if data.get("val") else {}),
                         **{k: data[k] for k in CARD_DATA_KEYS if k in data}}
    return _portable(shown)


def _data_name(path: str | None) -> str | None:
    """data/tiny/train -> tiny/train: a prepared folder and its split, without where they lie."""
    if not path:
        return path
    parts = os.path.normpath(path).split(os.sep)
    return "/".join(parts[-2:])


def _model_card(cfg: ModelConfig, facts: dict[str, Any], n_params: int, n_embedding: int, fmt: str,
                dtype: torch.dtype, license: str = "other", evals: dict[str, str] | None = None) -> str:
    """README.md: architecture, data, training, evals shipped beside it and how to load it; no local paths.
    `fmt`: braid, or the native class's name."""
    kinds = {kind: cfg.layer_types.count(kind) for kind in dict.fromkeys(cfg.layer_types)}
    front = ["---", "library_name: transformers", f"license: {license}", "pipeline_tag: text-generation",
             "tags: [braid, hybrid, " + ", ".join(kinds) + "]", "---"]
    lines = [*front, "", f"# Braid hybrid language model ({fmt} format)", "",
             "Exported by `braid convert to-hf` from a Braid training checkpoint.", "", "## Architecture", "",
             f"- pattern: `{cfg.pattern}` ({cfg.n_sublayers} pre-norm residual sublayers: "
             + ", ".join(f"{n} {k}" for k, n in kinds.items()) + ")",
             f"- d_model {cfg.d_model}, vocabulary {cfg.vocab_size}, MLP hidden {cfg.mlp_hidden}, "
             f"tied embeddings: {cfg.tie_embeddings}",
             f"- attention: {cfg.attn.n_heads} heads ({cfg.n_kv_heads} KV heads), sliding window {cfg.attn.window}",
             f"- parameters: {n_params:,} ({n_params - n_embedding:,} without the embedding); weights in "
             f"{_dtype_name(dtype)}",
             "- context: no hard limit (recurrent state and a sliding window"
             + (", plus full attention over every token" if "attention" in kinds else "") + "); "
             + (f"trained on sequences of {facts['seq_len']} tokens" if facts.get("seq_len")
                else "training length unknown"),
             "", "## Data", ""]
    dataset = facts.get("dataset") or {}
    if dataset:
        counts = ", ".join(f"{dataset[k]:,} {k}" for k in ("documents", "tokens") if dataset.get(k) is not None)
        lines.append(f"- `{dataset['name']}` (prepared by `braid data prepare`)" + (f": {counts} in its training split"
                                                                                 if counts else ""))
    tokenizer = "byte-level BPE" + (f", {facts['tokenizer_vocab_size']:,} tokens" if facts.get("tokenizer_vocab_size")
                                    else "")
    if facts.get("tokenizer_sha256"):
        tokenizer += f", sha256 `{facts['tokenizer_sha256'][:16]}`"
    lines.append(f"- tokenizer: {tokenizer}" if facts.get("tokenizer") else "- tokenizer: none shipped")
    lines += ["", "## Training", ""]
    if facts.get("step") is not None:
        lines.append(f"- step {facts['step']}" + (f", {facts['tokens_seen']:,} tokens seen"
                                                   if facts.get("tokens_seen") else ""))
    if facts.get("train_config"):
        lines += ["", "Training config (local paths, launch and logging settings left out):", "", "```yaml",
                  yaml.safe_dump(_card_training_config(facts["train_config"]), sort_keys=False).rstrip(), "```"]
    if evals:
        lines += ["", "## Evaluations", "", "Each suite's full results (settings, seeds, provenance) are in the file "
                  "named, beside this card.", ""]
        for suite, path in evals.items():
            record = facts["evals"][suite][1]
            flat = {k: v for k, v in (record.get("scores") or {}).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
            step = (record.get("provenance") or {}).get("step")
            lines.append(f"- {suite}" + (f" (step {step})" if step is not None else "") + ": "
                         + (", ".join(f"{k} {v:.4g}" for k, v in flat.items()) or "per-length scores")
                         + f"; [{path}]({path})")
            if record.get("figure"):
                lines.append(f"  ![{suite}](evals/{suite}/{record['figure']})")
    unset = " (not given at export: `braid convert to-hf ... --license ID`). The weights are trained on the data " \
            "above; its terms apply."
    lines += ["", "## Licence", "", f"`license: {license}`" + (unset if license == "other" else ".")]
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              # transformers 5 reads config.json for the tokenizer too: remote code asks there as well
              "tok = AutoTokenizer.from_pretrained(PATH" + (", trust_remote_code=True)" if fmt == "braid" else ")"),
              "model = AutoModelForCausalLM.from_pretrained(PATH"
              + (", trust_remote_code=True)" if fmt == "braid" else ")"),
              "out = model.generate(**tok('def main():', return_tensors='pt'), max_new_tokens=64)", "```", ""]
    return "\n".join(lines)


def hf_config(cfg: ModelConfig, family: Family | None, dtype: torch.dtype, facts: dict[str, Any],
              token_ids: dict) -> dict:
    """config.json: the names Hugging Face tools read (a native class's own fields for `family`), plus
    the whole Braid config under `braid` and the checkpoint's step, tokens seen and length under `training`."""
    import transformers
    common = {"dtype": _dtype_name(dtype), "torch_dtype": _dtype_name(dtype), "use_cache": True,
              **{k: v for k, v in token_ids.items() if v is not None},
              "transformers_version": transformers.__version__}
    provenance = {"braid": cfg.replace(kernels="auto").to_dict(),
                  "training": {k: facts.get(k) for k in ("step", "tokens_seen", "seq_len") if facts.get(k) is not None}}
    if family is not None:
        return {**family.config(cfg), **common, **provenance}
    return {"architectures": ["BraidForCausalLM"], "model_type": "braid",
            "auto_map": {"AutoConfig": "configuration_braid.BraidConfig",
                         "AutoModelForCausalLM": "modeling_braid.BraidForCausalLM"},
            **common, "tie_word_embeddings": cfg.tie_embeddings, "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_sublayers, "sublayer_kinds": cfg.layer_types,
            "pattern": cfg.pattern, "intermediate_size": cfg.mlp_hidden, "rms_norm_eps": cfg.norm_eps,
            "num_attention_heads": cfg.attn.n_heads, "num_key_value_heads": cfg.n_kv_heads,
            "sliding_window": cfg.attn.window if "swa" in cfg.layer_types else None, **provenance}


# ---- export ------------------------------------------------------------------------------------

def to_hf(source: str, out_dir: str, step: int | None = None, dtype: str = "auto", fmt: str = "braid",
          tokenizer: str | None = None, max_shard_size: str | int = "5GB", overwrite: bool = False,
          progress: bool = True, license: str = "other") -> dict[str, Any]:
    """Export a run directory or step_* checkpoint (any TP/PP/ZeRO layout) as a Hugging Face folder.

    The run's own tokenizer must be the file its data was made with (the sha256 braid_data.json records);
    `tokenizer` replaces it (a different file is shipped with a warning naming both hashes)."""
    from transformers import GenerationConfig

    from conversion.checkpoint import load_training_checkpoint, resolve_tag
    if fmt not in ("braid", "native", *FAMILIES):
        raise ValueError(f"--format={fmt!r}: expected braid, native or one of {', '.join(FAMILIES)}")
    if dtype not in ("auto", *DTYPES):
        raise ValueError(f"--dtype={dtype!r}: expected auto, bf16 or fp32")
    max_shard_bytes = parse_size(max_shard_size)
    check_output(out_dir, overwrite)
    tag = resolve_tag(source, step)
    state, cfg, info = load_training_checkpoint(tag, progress=progress)
    family = None if fmt == "braid" else native_family(cfg, fmt)       # before any work: one line if none fits
    facts = _run_facts(tag, info)
    if tokenizer is not None:
        if not os.path.isfile(tokenizer):
            raise FileNotFoundError(f"--tokenizer {tokenizer}: no such file")
        facts["tokenizer"] = tokenizer
        recorded = facts.get("tokenizer_sha256")
        if recorded and file_sha256(tokenizer) != recorded:
            print(f"braid: warning: --tokenizer {tokenizer} has sha256 {file_sha256(tokenizer)[:16]}..., the run's "
                  f"data was made with {recorded[:16]}... ({facts.get('data_info')}); shipping it as asked",
                  file=sys.stderr)
        facts["tokenizer_sha256"] = file_sha256(tokenizer)
    elif facts.get("tokenizer"):
        check_recorded_tokenizer(facts["tokenizer"], facts.get("tokenizer_sha256"), facts.get("data_info"))
    target = DTYPES.get(dtype)
    state = {k: (v.to(target) if target is not None and v.is_floating_point() else v) for k, v in state.items()}
    out_dtype = target or next(v.dtype for v in state.values() if v.is_floating_point())
    n_embedding = state["embed.weight"].numel()
    n_params = sum(v.numel() for k, v in state.items() if k != "lm_head.weight" or not cfg.tie_embeddings)
    if family is not None:
        tensors = family.export(state, cfg)
    else:                                               # a tied head is the embedding, stored once
        tensors = {PREFIX + k: v for k, v in state.items() if k != "lm_head.weight" or not cfg.tie_embeddings}
    name = family.architecture if family is not None else "braid"

    with staged_output(out_dir, overwrite) as staging:
        files, total = write_safetensors(tensors, staging, max_shard_bytes, progress)
        token_ids = {}
        if facts.get("tokenizer"):
            token_ids = _tokenizer_files(facts["tokenizer"], staging, facts, cfg.vocab_size)
        _write_json(os.path.join(staging, "config.json"), hf_config(cfg, family, out_dtype, facts, token_ids))
        GenerationConfig(**{k: v for k, v in token_ids.items() if v is not None}).save_pretrained(staging)
        if family is None:
            for file_name, text in remote_code().items():
                with open(os.path.join(staging, file_name), "w") as f:
                    f.write(text)
        shipped = _ship_evals(facts["evals"], staging)
        with open(os.path.join(staging, "README.md"), "w") as f:
            f.write(_model_card(cfg, facts, n_params, n_embedding, name, out_dtype, license, shipped))
        written = sorted(os.listdir(staging))
    notes = serving_notes(family, cfg) if family is not None else []
    return {"out_dir": os.path.abspath(out_dir), "checkpoint": os.path.abspath(tag), "step": info.get("step"), "notes": notes,
            "format": name, "dtype": _dtype_name(out_dtype), "tensors": len(tensors), "parameters": n_params,
            "bytes": total, "weight_files": files, "files": written,
            "tokenizer": facts.get("tokenizer")}


# ---- import ------------------------------------------------------------------------------------

def read_hf_folder(path: str, progress: bool = False) -> tuple[dict[str, Tensor], ModelConfig, dict[str, Any]]:
    """(state dict with HybridLM names, ModelConfig, config.json) of a Braid folder or of any native class
    conversion/native.py writes; every other folder, and a tokenizer that does not fit the weights, is a
    one-line ValueError."""
    from safetensors.torch import load_file
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path}: not a Hugging Face folder (no config.json)")
    with open(config_path) as f:
        config = json.load(f)
    model_type = config.get("model_type")
    if model_type == "braid":
        if not isinstance(config.get("braid"), dict):
            raise ValueError(f"{config_path}: no `braid` model config (not exported by Braid)")
        try:
            cfg = ModelConfig.from_dict(config["braid"])
        except ConfigError as err:
            raise ValueError(f"{config_path}: {err}") from None
    elif model_type not in BY_MODEL_TYPE:
        architecture = (config.get("architectures") or ["?"])[0]
        raise ValueError(f"{config_path}: model_type {model_type!r} ({architecture}) is not an architecture Braid "
                         f"reads (braid, {', '.join(BY_MODEL_TYPE)})")
    index_path = os.path.join(path, SAFE_INDEX)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, SAFE_WEIGHTS)):
        files = [SAFE_WEIGHTS]
    else:
        raise FileNotFoundError(f"{path}: no {SAFE_WEIGHTS} or {SAFE_INDEX} (only safetensors weights are read)")
    tensors: dict[str, Tensor] = {}
    for name in files:
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            raise FileNotFoundError(f"{file_path}: missing (named by {SAFE_INDEX})")
        try:
            tensors.update(load_file(file_path))
        except Exception as err:
            raise ValueError(f"{file_path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if model_type == "braid":
        state = {k.removeprefix(PREFIX): v for k, v in tensors.items()}
        if cfg.tie_embeddings and "embed.weight" in state:
            state["lm_head.weight"] = state["embed.weight"]
    else:
        cfg, state = read_native(config, tensors, config_path)
    from conversion.checkpoint import check_state_dict
    check_state_dict(state, cfg, path)
    tokenizer = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tokenizer):
        check_tokenizer_vocab(tokenizer, cfg.vocab_size, path)
    return state, cfg, config


def load_hf_folder(path: str) -> tuple[HybridLM, dict[str, Any]]:
    """A converted folder as Braid's own HybridLM (no remote code runs), plus what evals need to know:
    tokenizer path, eos id, training length, provenance."""
    state, cfg, config = read_hf_folder(path)
    model = HybridLM(cfg)
    model.load_state_dict(state)
    tokenizer = os.path.join(path, "tokenizer.json")
    training = config.get("training") or {}
    return model, {"tokenizer": tokenizer if os.path.isfile(tokenizer) else None,
                   "eos_id": config.get("eos_token_id"), "train_length": training.get("seq_len"),
                   "provenance": {"model": os.path.abspath(path), "kind": f"hf-{config.get('model_type')}",
                                  "step": training.get("step")}}


def from_hf(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1, overwrite: bool = False) -> dict[str, Any]:
    """A Braid (or native) folder -> a run directory whose step_00000000 holds the weights split
    for `tp` tensor-parallel ranks; `braid train` with run_dir=OUT_DIR and parallel.tp/pp continues from it."""
    from model.sharding import check_tensor_parallel, shard_state_dict
    from pretrain.checkpoint import save_weights_only
    from pretrain.parallel import check_pipeline_stages

    if tp < 1 or pp < 1:
        raise ValueError(f"--tp {tp} --pp {pp}: both must be at least 1")
    check_output(out_dir, overwrite)
    state, cfg, _ = read_hf_folder(hf_dir)
    check_tensor_parallel(cfg, tp)
    check_pipeline_stages(cfg, pp)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}   # training keeps fp32
    with staged_output(out_dir, overwrite) as staging:
        shards = [shard_state_dict(state, cfg, r, tp) if tp > 1 else state for r in range(tp)]
        tag = save_weights_only(staging, shards, cfg.to_dict(), {"tp": tp, "pp": pp},
                                source=os.path.abspath(hf_dir))
        rel = os.path.relpath(tag, staging)
    n_params = sum(v.numel() for k, v in state.items() if k != "lm_head.weight" or not cfg.tie_embeddings)
    return {"out_dir": os.path.abspath(out_dir), "checkpoint": os.path.join(os.path.abspath(out_dir), rel),
            "tp": tp, "pp": pp, "pattern": cfg.pattern, "parameters": n_params}
