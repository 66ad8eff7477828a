"""`braid convert`: training checkpoints <-> Hugging Face folders.

Round trips are bitwise; the exported folder loads with transformers' AutoModelForCausalLM
(remote code, no Braid import needed) and computes Braid's logits and greedy tokens; Mamba-only
patterns export to transformers' own MambaForCausalLM; a from-hf checkpoint continues training
at another TP/PP with the same first loss.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import small_preset
from conversion.checkpoint import load_training_checkpoint
from conversion.hf import from_hf, read_hf_folder, to_hf
from model import HybridLM, ModelConfig
from model.generation import generate
from test_hf_remote import hf_model, weights_checkpoint
from test_train import ROOT, braid_train, losses, torchrun, write_config


def assert_bitwise(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


# ---- round trips ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, shards):
    """A 3-step single-process run (vocabulary 512, so the test tokenizer fits)."""
    tmp = tmp_path_factory.mktemp("trained")
    config = write_config(tmp, shards, max_steps=3)
    out = braid_train(config, "model.vocab_size=512")
    assert out.returncode == 0, out.stdout[-2000:]
    return str(tmp / "run")


@pytest.mark.slow
@pytest.mark.parametrize("layout", [(1, 1, 1), (2, 2, 4)], ids=["single", "tp2xpp2"])
def test_checkpoint_to_hf_to_checkpoint_is_bitwise(tmp_path, shards, layout):
    tp, pp, nproc = layout
    config = write_config(tmp_path, shards, max_steps=2)
    out = (torchrun(config, nproc, f"parallel.tp={tp}", f"parallel.pp={pp}") if nproc > 1 else braid_train(config))
    assert out.returncode == 0, out.stderr[-3000:]
    run = str(tmp_path / "run")
    original, cfg, _ = load_training_checkpoint(run)
    to_hf(run, str(tmp_path / "hf"), progress=False)
    assert not (tmp_path / "hf" / "model.safetensors.index.json").exists()
    stored = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert "model.lm_head.weight" not in stored                      # tied: stored once
    for back_tp, back_pp in dict.fromkeys([(tp, pp), (1, 1), (2, 1)]):
        dest = tmp_path / f"back-{back_tp}-{back_pp}"
        from_hf(str(tmp_path / "hf"), str(dest), tp=back_tp, pp=back_pp)
        state, back_cfg, info = load_training_checkpoint(str(dest))
        assert back_cfg == cfg and info["layout"] == {"tp": back_tp, "pp": back_pp} and info["weights_only"]
        assert_bitwise(state, original)
    to_hf(str(tmp_path / "back-2-1"), str(tmp_path / "hf-again"), progress=False)
    assert_bitwise(load_file(str(tmp_path / "hf-again" / "model.safetensors")), stored)


@pytest.mark.slow
def test_from_hf_continues_training_at_another_layout_with_the_same_first_loss(tmp_path, shards, trained):
    to_hf(trained, str(tmp_path / "hf"), progress=False)
    first = {}
    for tp, pp, nproc in ((1, 1, 1), (2, 2, 4)):
        run = tmp_path / f"run-{tp}x{pp}"
        from_hf(str(tmp_path / "hf"), str(run), tp=tp, pp=pp)
        (tmp_path / f"cfg-{tp}x{pp}").mkdir()
        config = write_config(tmp_path / f"cfg-{tp}x{pp}", shards, max_steps=1)
        overrides = [f"run_dir={run}", "model.vocab_size=512", f"parallel.tp={tp}", f"parallel.pp={pp}"]
        out = torchrun(config, nproc, *overrides) if nproc > 1 else braid_train(config, *overrides)
        assert out.returncode == 0, out.stderr[-3000:]
        first[(tp, pp)] = losses(str(run))[1]
    # the loss of the converted weights on the first batch, computed here
    state, cfg, _ = load_training_checkpoint(trained)
    model = HybridLM(cfg)
    model.load_state_dict(state)
    from data_pipeline.streaming import LoaderConfig, StreamSource, build_train_loader
    loader = build_train_loader(LoaderConfig(streams=[StreamSource(path=shards, proportion=None)], seq_len=32,
                                             batch_size=2, seed=0), dp_rank=0, dp_world_size=1)
    batch = next(loader.batches())
    with torch.no_grad():
        logits = model(batch["input_ids"], doc_ids=batch["doc_ids"])
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                                     ignore_index=-100).item()
    assert abs(first[(1, 1)] - expected) < 1e-5 * expected
    assert abs(first[(2, 2)] - expected) < 1e-5 * expected

    # the model in the training config must be the converted one; the TP split must be the run's
    run = tmp_path / "run-1x1"
    from_hf(str(tmp_path / "hf"), str(run), overwrite=True)
    out = braid_train(config, f"run_dir={run}", "model.vocab_size=512", "model.mlp_hidden=128")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].endswith("was converted for model.mlp_hidden=96, this run's config "
                                                        "has model.mlp_hidden=128")
    out = torchrun(config, 2, f"run_dir={run}", "model.vocab_size=512", "parallel.tp=2")
    assert out.returncode != 0 and "holds weights split for tp=1, this run has tp=2" in out.stderr


# ---- the folder: files, card, tokenizer, dtype, sharding ---------------------------------------

@pytest.mark.slow
def test_folder_contents_tokenizer_and_model_card(tmp_path, trained, eval_tokenizer_path):
    cli = [sys.executable, "-m", "launch.cli", "convert", "to-hf", trained, str(tmp_path / "hf"), "--dtype", "bf16",
           "--tokenizer", eval_tokenizer_path, "--max-shard-size", "100KB"]
    out = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout and "bfloat16" in out.stdout and "trust_remote_code=True" in out.stdout
    hf = tmp_path / "hf"
    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == "braid" and config["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_braid.BraidForCausalLM"
    assert config["sublayer_kinds"] == ModelConfig.from_dict(config["braid"]).layer_types
    assert "layer_types" not in config          # transformers 5 checks that name against its own layer kinds
    assert config["dtype"] == "bfloat16" and config["training"]["step"] == 3
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((hf / f).is_file() for f in files)
    assert all(t.dtype == torch.bfloat16 for f in files for t in load_file(str(hf / f)).values())
    card = (hf / "README.md").read_text()
    assert "M-G-S-R-*-" in card and "parameters" in card and "tokens seen" in card and "max_steps: 3" in card

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(hf), trust_remote_code=True)
    text = "the quick brown fox 123"
    assert tok(text)["input_ids"] == __import__("tokenizers").Tokenizer.from_file(eval_tokenizer_path).encode(
        text).ids
    model = hf_model(hf, dtype=torch.float32)  # the default dtype is each version's (test_hf_remote.py)
    state, _, _ = load_training_checkpoint(trained)
    assert torch.equal(model.model.embed.weight, state["embed.weight"].bfloat16().float())


def test_release_folder_is_portable_cites_what_it_ships_and_checks_the_tokenizer(tmp_path, eval_tokenizer_path,
                                                                                    capsys):
    """No local paths or launch settings, normal file modes, evals shipped beside the card that cites them,
    a licence, no length cap on the tokenizer; a tokenizer file changed since the data was made is refused."""
    import shutil

    import yaml

    from data_pipeline.tokenizer import file_sha256, train_bpe
    cfg = small_preset("tiny", vocab_size=512)
    run = tmp_path / "run"
    weights_checkpoint(run, cfg)
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    shutil.copy(eval_tokenizer_path, data / "tokenizer.json")
    (data / "braid_data.json").write_text(json.dumps({
        "row_length": 33, "vocab_size": 512, "eos_id": 0, "pad_id": 1,
        "tokenizer": {"path": str(data / "tokenizer.json"), "sha256": file_sha256(str(data / "tokenizer.json")),
                      "vocab_size": 512},
        "stats": {"splits": {"train": {"documents": 10, "tokens": 3300}}}}))
    (run / "config.yaml").write_text(yaml.safe_dump({
        "run_dir": str(run), "seed": 0, "model": cfg.to_dict(),
        "launch": {"slurm": {"account": "secret-account", "setup": ["source /home/me/venv/bin/activate"],
                             "env": {"WANDB_API_KEY": "abc123"}}},
        "data": {"train": [{"path": str(data / "train"), "proportion": None}], "val": None, "seq_len": 32,
                 "micro_batch": 2, "global_batch": None},
        "optim": {"lr": 0.003}, "train": {"max_steps": 7, "grad_accum": None},
        "logging": {"wandb": {"project": "private"}}, "evals": {"tokenizer": str(data / "tokenizer.json")}}))
    suite = run / "evals" / "passkey"
    suite.mkdir(parents=True)
    (suite / "passkey.png").write_bytes(b"\x89PNG not really")
    (suite / "samples.jsonl").write_text("{}\n")
    (suite / "results.json").write_text(json.dumps({
        "suite": "passkey", "scores": {"accuracy": 0.5, "grid": {"64": {"0": 0.5}}}, "settings": {"lengths": [64]},
        "provenance": {"model": str(run), "checkpoint": str(run / "checkpoints" / "step_00000000"), "step": 0,
                       "tokenizer": str(data / "tokenizer.json")}, "figure": "passkey.png",
        "samples_file": "samples.jsonl"}))

    old_umask = os.umask(0o022)
    try:
        to_hf(str(run), str(tmp_path / "hf"), progress=False, license="apache-2.0")
    finally:
        os.umask(old_umask)
    hf = tmp_path / "hf"
    for root, dirs, files in os.walk(hf):
        assert os.stat(root).st_mode & 0o777 == 0o755, root
        for name in files:
            path = os.path.join(root, name)
            assert os.stat(path).st_mode & 0o777 == 0o644, path      # safetensors writes 0600 by itself
            if name.endswith((".json", ".md")):
                text = open(path).read()
                assert str(tmp_path) not in text and "/home/me" not in text, (path, text)
    card = (hf / "README.md").read_text()
    assert "license: apache-2.0" in card.split("---")[1]
    for secret in ("secret-account", "abc123", "WANDB", "launch:", "slurm", "private", "run_dir"):
        assert secret not in card, secret
    assert "`data` (prepared by `braid data prepare`): 10 documents, 3,300 tokens" in card
    assert "name: data/train" in card and "max_steps: 7" in card
    assert "- passkey (step 0): accuracy 0.5; [evals/passkey/results.json](evals/passkey/results.json)" in card
    shipped = json.loads((hf / "evals" / "passkey" / "results.json").read_text())
    assert shipped["provenance"]["model"] == "run" and shipped["provenance"]["checkpoint"] == "step_00000000"
    assert "samples_file" not in shipped and (hf / "evals" / "passkey" / "passkey.png").is_file()
    assert json.loads((hf / "tokenizer_config.json").read_text())["model_max_length"] > 10 ** 12
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(hf), trust_remote_code=True)        # no cap: a prompt past 32 tokens draws no warning
    assert tok.model_max_length > 10 ** 12 and len(tok("word " * 2000)["input_ids"]) > 2000

    # the tokenizer retrained in place after the data was made: refused, naming the files and hashes
    train_bpe(["other text entirely"] * 50, 300, ["<|endoftext|>", "<|pad|>"]).save(str(data / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer .*data/tokenizer.json has sha256 \w+\.\.\., but "
                                         r".*data/braid_data.json records \w+\.\.\. for the tokenizer the shards were "
                                         r"made with"):
        to_hf(str(run), str(tmp_path / "hf2"), progress=False)
    assert not (tmp_path / "hf2").exists()
    from evals.common import load_eval_model                       # evals read it through the same check
    with pytest.raises(ValueError, match=r"data/tokenizer.json has sha256 .* records"):
        load_eval_model(str(run))
    # given explicitly, a file is shipped as asked, with the mismatch named
    capsys.readouterr()
    to_hf(str(run), str(tmp_path / "hf3"), progress=False, tokenizer=str(data / "tokenizer.json"))
    warning = capsys.readouterr().err
    assert f"braid: warning: --tokenizer {data / 'tokenizer.json'} has sha256 " in warning and "shipping it" in warning
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 5; the checkpoints there are of steps 0"):
        to_hf(str(run), str(tmp_path / "hf4"), step=5, progress=False)


# ---- native transformers classes ---------------------------------------------------------------

# pattern and options -> the class `--format native` must pick; each represents its pattern exactly
NATIVE_CASES = {
    "mamba": (dict(preset="tiny", pattern="MMM", d_model=32), "MambaForCausalLM"),
    "mamba2": (dict(preset="mamba2-hybrid", pattern="MMM"), "Mamba2ForCausalLM"),
    "llama": (dict(preset="tiny", pattern="*-*-"), "LlamaForCausalLM"),
    "llama-fillers": (dict(preset="tiny", pattern="**--*", tie_embeddings=False), "LlamaForCausalLM"),
    "mistral": (dict(preset="tiny", pattern="S-S-"), "MistralForCausalLM"),
    "qwen2": (dict(preset="tiny", pattern="S-*-", attn=dict(n_kv_heads=4)), "Qwen2ForCausalLM"),
    "nemotron-h": (dict(preset="nemotron-h"), "NemotronHForCausalLM"),
    "nemotron-h-tied": (dict(preset="nemotron-h", pattern="M-*|-M", tie_embeddings=True), "NemotronHForCausalLM"),
    "granite": (dict(preset="mamba2-hybrid"), "GraniteMoeHybridForCausalLM"),
    "granite-no-rope-fillers": (dict(preset="mamba2-hybrid", pattern="MM*--M*", attn=dict(rope=False)),
                                "GraniteMoeHybridForCausalLM"),
}


def native_case(name: str) -> ModelConfig:
    changes = dict(NATIVE_CASES[name][0])
    return small_preset(changes.pop("preset"), vocab_size=64, **changes)


@pytest.mark.parametrize("case", sorted(NATIVE_CASES))
def test_native_format_equals_braid_and_comes_back(tmp_path, case):
    """--format native: transformers' own class, no remote code; logits within 1e-5 of Braid's in fp32,
    greedy tokens equal (prompts of two lengths, left-padded), and from-hf gives back the same
    weights and config (stage marks and initialisation settings included)."""
    from transformers import AutoModelForCausalLM
    cfg = native_case(case)
    original = weights_checkpoint(tmp_path / "run", cfg)
    summary = to_hf(str(tmp_path / "run"), str(tmp_path / "hf"), fmt="native", progress=False)
    assert summary["format"] == NATIVE_CASES[case][1]
    assert not any(name.endswith(".py") for name in os.listdir(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [NATIVE_CASES[case][1]] and "auto_map" not in config
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(theirs).__name__ == NATIVE_CASES[case][1] and theirs.dtype == torch.float32
    ours = HybridLM(cfg).eval()
    ours.load_state_dict(original)
    tokens = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        assert (theirs(tokens).logits - ours(tokens)).abs().max().item() < 1e-5

    prompts = [torch.randint(2, 64, (12,)).tolist(), torch.randint(2, 64, (5,)).tolist()]
    ids = torch.tensor([prompts[0], [1] * 7 + prompts[1]])
    mask = torch.tensor([[1] * 12, [0] * 7 + [1] * 5])
    out = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=1,
                          eos_token_id=None)
    expected = generate(ours, prompts, 24)
    assert out[:, 12:].tolist() == expected

    from_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    state, back_cfg, _ = load_training_checkpoint(str(tmp_path / "back"))
    assert back_cfg == cfg.replace(kernels="auto")
    assert_bitwise(state, original)


def test_format_by_class_name_and_cli(tmp_path):
    """--format NAME asks for one class (mamba keeps its meaning); the CLI says what it wrote and what a
    server does differently."""
    cfg = small_preset("tiny", vocab_size=64, pattern="S-*-", attn=dict(n_kv_heads=4))
    original = weights_checkpoint(tmp_path / "run", cfg)
    to_hf(str(tmp_path / "run"), str(tmp_path / "qwen2"), fmt="qwen2", progress=False)
    state, back, _ = read_hf_folder(str(tmp_path / "qwen2"))
    assert back == cfg.replace(kernels="auto") and torch.equal(state["layers.2.mixer.q_proj.weight"],
                                                               original["layers.2.mixer.q_proj.weight"])
    weights_checkpoint(tmp_path / "mamba", small_preset("tiny", vocab_size=64, pattern="MM", d_model=32))
    assert to_hf(str(tmp_path / "mamba"), str(tmp_path / "m"), fmt="mamba", progress=False)["format"] == \
        "MambaForCausalLM"

    cli = [sys.executable, "-m", "launch.cli", "convert", "to-hf", str(tmp_path / "run"), str(tmp_path / "cli"),
           "--format", "native"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "Qwen2ForCausalLM" in out.stdout and "AutoModelForCausalLM.from_pretrained(OUT_DIR)" in out.stdout
    assert "note: llama.cpp: Qwen2ForCausalLM runs without the sliding window there" in out.stdout
    weights_checkpoint(tmp_path / "gla", small_preset("tiny", vocab_size=64, pattern="G-"))
    cli[5:7] = [str(tmp_path / "gla"), str(tmp_path / "gla-hf")]
    out = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, env=env)
    assert out.returncode == 2 and not (tmp_path / "gla-hf").exists()
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("braid: error: --format native: ") and "'G' (gated linear attention)" in last \
        and "--format braid" in last


def test_native_folder_saved_again_by_transformers_reads_back(tmp_path):
    """A native folder re-saved by transformers (its own names for layer kinds, no `braid` section to
    trust) reads back from the class's fields alone: the same weights and the same function."""
    from transformers import AutoModelForCausalLM
    cfg = native_case("granite-no-rope-fillers")
    original = weights_checkpoint(tmp_path / "run", cfg)
    to_hf(str(tmp_path / "run"), str(tmp_path / "hf"), fmt="native", progress=False)
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).save_pretrained(str(tmp_path / "saved"))
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    config.pop("braid", None)
    (tmp_path / "saved" / "config.json").write_text(json.dumps(config))
    state, back_cfg, _ = read_hf_folder(str(tmp_path / "saved"))
    assert back_cfg.pattern == cfg.pattern and not back_cfg.attn.rope
    ours, back = HybridLM(cfg).eval(), HybridLM(back_cfg).eval()
    ours.load_state_dict(original)
    back.load_state_dict(state)
    tokens = torch.randint(0, 64, (2, 30))
    with torch.no_grad():
        assert torch.equal(ours(tokens), back(tokens))


@pytest.mark.parametrize("changes, fmt, message", [
    (dict(pattern="M-G-"), "native", r"sublayer 'G' \(gated linear attention\) has no native transformers class"),
    (dict(pattern="R-S-"), "native", r"sublayer 'R' \(RG-LRU recurrent block\)"),
    (dict(pattern="M-S-"), "native", r"Mamba-1 \('M' with model\.mamba\.version=1\) is native only alone"),
    (dict(pattern="M-S-", mamba=dict(version=2, head_dim=16)), "native", r"sliding-window attention 'S' beside Mamba-2"),
    (dict(pattern="*-", mlp_activation="relu2"), "native", r"model\.attn\.rope=true: NemotronH's attention has no RoPE"),
    (dict(pattern="S-", mlp_activation="relu2"), "native", r"model\.mlp_activation=relu2: qwen2's MLP is SwiGLU"),
    (dict(pattern="M-M-", mamba=dict(version=2, head_dim=16)), "native",
     r"a Mamba-2 stack with MLPs and no attention: GraniteMoeHybrid needs an attention layer"),
    (dict(pattern="M*-", mamba=dict(version=2, head_dim=16), mlp_activation="relu2"), "native",
     r"model\.attn\.rope=true: NemotronH's attention has no RoPE"),
    (dict(pattern="M-S-"), "mamba", r"--format mamba: MambaForCausalLM holds Mamba-1 mixers only .* 'M-S-'"),
    (dict(pattern="*-*-"), "mistral", r"--format mistral: sublayer '\*' \(full attention\) is not in mistral's layers"),
])
def test_no_native_class_is_one_line_naming_what_is_in_the_way(tmp_path, changes, fmt, message):
    weights_checkpoint(tmp_path / "run", small_preset("tiny", vocab_size=64, **changes))
    with pytest.raises(ValueError, match=message) as err:
        to_hf(str(tmp_path / "run"), str(tmp_path / "out"), fmt=fmt, progress=False)
    assert "\n" not in str(err.value) and "--format" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_bad_folders_and_tokenizers_are_one_line(tmp_path, eval_tokenizer_path):
    cfg = native_case("nemotron-h")
    weights_checkpoint(tmp_path / "run", cfg)
    to_hf(str(tmp_path / "run"), str(tmp_path / "hf"), fmt="native", progress=False)
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())

    def read_with(**changes):
        config_path.write_text(json.dumps({**config, **changes}))
        with pytest.raises(ValueError) as err:
            read_hf_folder(str(tmp_path / "hf"))
        assert "\n" not in str(err.value) and str(config_path) in str(err.value)
        return str(err.value)

    assert "model_type 'gpt2' (GPT2LMHeadModel) is not an architecture Braid reads" in read_with(
        model_type="gpt2", architectures=["GPT2LMHeadModel"])
    kinds = config["layers_block_type"][:2] + ["moe"] + config["layers_block_type"][3:]
    assert "layers_block_type[2]='moe' is not a layer kind Braid has" in read_with(layers_block_type=kinds)
    assert "mlp_hidden_act='silu'" in read_with(mlp_hidden_act="silu")
    assert "time_step_min=0.001" in read_with(time_step_min=0.001)
    config_path.write_text(json.dumps(config))

    # a Braid folder whose config names a sublayer Braid does not have
    to_hf(str(tmp_path / "run"), str(tmp_path / "braid"), progress=False)
    braid_config = json.loads((tmp_path / "braid" / "config.json").read_text())
    braid_config["braid"]["pattern"] = "M-X-"
    (tmp_path / "braid" / "config.json").write_text(json.dumps(braid_config))
    with pytest.raises(ValueError, match=r"config\.json: model\.pattern='M-X-': unknown symbol 'X'"):
        read_hf_folder(str(tmp_path / "braid"))

    # a tokenizer of 512 tokens beside weights of 64: at export, and in a folder
    with pytest.raises(ValueError, match=r"--tokenizer: tokenizer .* has 512 tokens, the weights' vocabulary 64"):
        to_hf(str(tmp_path / "run"), str(tmp_path / "tok"), fmt="native", tokenizer=eval_tokenizer_path,
              progress=False)
    assert not (tmp_path / "tok").exists()
    import shutil
    shutil.copy(eval_tokenizer_path, tmp_path / "hf" / "tokenizer.json")
    with pytest.raises(ValueError, match=r"has 512 tokens, the weights' vocabulary 64: they do not belong together"):
        from_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    assert not (tmp_path / "back").exists()


# ---- safety ----------------------------------------------------------------------------------

def test_failures_leave_nothing_and_errors_name_the_tensor(tmp_path, monkeypatch):
    cfg = small_preset("tiny", vocab_size=64)
    weights_checkpoint(tmp_path / "run", cfg)
    import conversion.hf as hf

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(hf, "_model_card", broken)
    with pytest.raises(OSError, match="disk full"):
        to_hf(str(tmp_path / "run"), str(tmp_path / "out"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["run"]                      # no OUT_DIR, no staging folder
    monkeypatch.undo()

    to_hf(str(tmp_path / "run"), str(tmp_path / "out"), progress=False)
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        to_hf(str(tmp_path / "run"), str(tmp_path / "out"), progress=False)

    weights = tmp_path / "out" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.layers.2.mixer.q_proj.weight"] = torch.zeros(3, 5)
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=r"tensor layers\.2\.mixer\.q_proj\.weight has shape \(3, 5\), "
                                         r"the model config expects \(\d+, \d+\)"):
        read_hf_folder(str(tmp_path / "out"))
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"model\.safetensors cannot be read"):
        from_hf(str(tmp_path / "out"), str(tmp_path / "back"))
    assert not (tmp_path / "back").exists()
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        read_hf_folder(str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        to_hf(str(tmp_path / "nothing"), str(tmp_path / "x"), progress=False)
    with pytest.raises(ValueError, match=r"model.vocab_size=64 is not divisible by tensor-parallel size"):
        to_hf(str(tmp_path / "run"), str(tmp_path / "out2"), progress=False)
        from_hf(str(tmp_path / "out2"), str(tmp_path / "back"), tp=3)


def test_cli_errors_are_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "launch.cli", "convert", "to-hf", str(tmp_path / "missing"),
                          str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("braid: error: ") and "neither a checkpoint" in out.stderr
