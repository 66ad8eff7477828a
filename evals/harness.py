"""lm-evaluation-harness suite: Braid models as an lm-eval model ("braid"), plus the local tasks.

    braid eval harness RUN_DIR --tasks braid_mc,braid_gen,braid_text --limit 50
    run(load_eval_model(RUN_DIR), "out/harness", **SMOKE)          # out/harness/results.json
    # importing this module registers the lm-eval model "braid": simple_evaluate(model="braid",
    #   model_args="pretrained=RUN_DIR,max_length=2048", tasks=[...], task_manager=task_manager_for(...))

The adapter scores exactly what the model computes, with lm-eval's own conventions (context /
continuation splitting, left truncation to the maximum length, rolling windows, stop strings),
so its numbers are comparable with lm-eval's stock `hf` model on a converted HF folder
(`run_stock_hf`). The shipped tasks run offline (they read jsonl files next to their YAML, and the
model is local); the environment is left as the user set it, so a hub task such as hellaswag is
downloaded by lm-eval like anywhere else, and HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 keep it from trying.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from model.generation import generate

from .common import EvalModel, load_eval_model, write_results

log = logging.getLogger(__name__)

SUITE = "harness"
TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness_tasks")
DEFAULT_TASKS = ["braid_mc", "braid_gen", "braid_text"]
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256
SMOKE = {"tasks": DEFAULT_TASKS, "limit": 4, "batch_size": 4, "bootstrap_iters": 0}


def _batch_size(value: int | str | None) -> int:
    """lm-eval passes batch sizes as ints or strings ("8", "auto"); "auto" means the default here."""
    if value is None or value == "auto" or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size={value}: must be >= 1")
    return size


@register_model("braid")
class BraidLM(TemplateLM):
    """An EvalModel as an lm-eval `LM`: loglikelihood, loglikelihood_rolling, generate_until.

    max_length (tokens scored at once, lm-eval's window) defaults to the training length. Rolling
    loglikelihood uses lm-eval's disjoint windows by default, each window a fresh forward, exactly as
    the stock `hf` model does (so the two stay comparable); `rolling_cache=True` instead streams the
    whole text through the hybrid cache in max_length chunks, so every token conditions on the full
    prefix (the model's own full-sequence NLL), which only a recurrent/sliding-window model can do in
    constant memory.
    """

    backend = "causal"

    def __init__(self, pretrained: str | EvalModel | None = None, eval_model: EvalModel | None = None,
                 batch_size: int | str | None = DEFAULT_BATCH_SIZE, max_batch_size: int | None = None,
                 device: str | None = None, step: int | str | None = None, dtype: str = "float32",
                 max_length: int | str | None = None, max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS,
                 rolling_cache: bool | str = False) -> None:
        super().__init__()
        lm = eval_model if eval_model is not None else pretrained
        if lm is None:
            raise ValueError("braid: pass pretrained=PATH (run dir, step_* checkpoint or HF folder) or an EvalModel")
        if not isinstance(lm, EvalModel):
            lm = load_eval_model(str(lm), step=int(step) if step not in (None, "") else None,
                                 dtype=getattr(torch, str(dtype)), device=device or "cpu")
        elif device:
            lm.model.to(device)
        self.lm = lm
        self.model = lm.model
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self._max_length = int(max_length) if max_length not in (None, "") else None
        self.rolling_cache = rolling_cache if isinstance(rolling_cache, bool) else \
            str(rolling_cache).lower() in ("1", "true", "yes")
        self._eot = self._find_eot()

    def _find_eot(self) -> int:
        if self.lm.eos_id is not None:
            return int(self.lm.eos_id)
        for name in ("<|endoftext|>", "</s>", "<eos>"):
            token = self.lm.tokenizer.token_to_id(name)
            if token is not None:
                return int(token)
        raise ValueError("braid: the model has no eos id and its tokenizer no <|endoftext|>; lm-eval needs one "
                         "to condition empty contexts and to end generations")

    # ---- what lm-eval asks of a model ----------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self._max_length or self.lm.train_length or self.model.cfg.max_seq_len

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return str(self.lm.provenance.get("tokenizer", "braid"))

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.lm.encode(string)

    def tok_decode(self, tokens: list[int] | int, skip_special_tokens: bool = True) -> str:
        tokens = [tokens] if isinstance(tokens, int) else list(tokens)
        return self.lm.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def get_model_info(self) -> dict[str, Any]:
        return {"braid_provenance": dict(self.lm.provenance), "max_length": self.max_length,
                "rolling_cache": self.rolling_cache}

    @torch.no_grad()
    def _logprobs(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Right-padded batch -> each row's (len, vocab) log-probabilities. Causal sublayers never see
        the padding after a row, so each row's values are those of the row alone."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self._eot, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        logprobs = F.log_softmax(self.model(ids.to(self.device)), dim=-1)
        return [logprobs[i, :len(row)] for i, row in enumerate(rows)]

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, continuation is the greedy one) per request, batched
        longest first like lm-eval's hf model; context+continuation beyond max_length+1 tokens is cut
        from the left."""
        def sort_key(req: tuple[tuple[str, str], list[int], list[int]]) -> tuple[int, tuple[int, ...]]:
            tokens = req[1] + req[2]
            return -len(tokens), tuple(tokens)

        collator = Collator(requests, sort_fn=sort_key, group_by=None)
        results = []
        for chunk in collator.get_batched(n=self.batch_size):
            rows, conts = [], []
            for _, context_enc, continuation_enc in chunk:
                if not context_enc or not continuation_enc:
                    raise ValueError("braid: loglikelihood needs a non-empty context and continuation")
                if len(continuation_enc) > self.max_length:
                    raise ValueError(f"braid: continuation of {len(continuation_enc)} tokens exceeds "
                                     f"max_length={self.max_length}")
                rows.append((context_enc + continuation_enc)[-(self.max_length + 1):][:-1])
                conts.append(continuation_enc)
            for (request, _, _), logprobs, cont in zip(chunk, self._logprobs(rows), conts):
                cont_logprobs = logprobs[-len(cont):]
                target = torch.tensor(cont, dtype=torch.long, device=cont_logprobs.device)
                greedy = bool((cont_logprobs.argmax(-1) == target).all())
                answer = (float(cont_logprobs.gather(-1, target[:, None]).sum()), greedy)
                results.append(answer)
                if request[0] is not None:      # rolling windows are cached as whole texts
                    self.cache_hook.add_partial("loglikelihood", request, answer)
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, its first token conditioned on the eot token."""
        results = []
        for request in requests:
            (text,) = request.args
            tokens = self.tok_encode(text)
            total = self._rolling_cached(tokens) if self.rolling_cache else self._rolling_windows(tokens)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    def _rolling_windows(self, tokens: list[int]) -> float:
        """lm-eval's disjoint rolling windows of max_length, each scored independently (as hf does)."""
        windows = [((None, None), context, pred) for context, pred in map(
            lm_utils.make_disjoint_window,
            lm_utils.get_rolling_token_windows(token_list=tokens, prefix_token=self.prefix_token_id,
                                               max_seq_len=self.max_length, context_len=1))]
        return sum(ll for ll, _ in self._loglikelihood_tokens(windows)) if windows else 0.0

    @torch.no_grad()
    def _rolling_cached(self, tokens: list[int]) -> float:
        """The whole text in max_length chunks through one hybrid cache: every token sees its full prefix."""
        if not tokens:
            return 0.0
        inputs = [self.prefix_token_id] + tokens[:-1]
        cache = self.model.new_cache()
        total = 0.0
        for start in range(0, len(inputs), self.max_length):
            ids = torch.tensor([inputs[start:start + self.max_length]], dtype=torch.long, device=self.device)
            target = torch.tensor(tokens[start:start + self.max_length], dtype=torch.long, device=self.device)
            logprobs = F.log_softmax(self.model(ids, cache=cache)[0], dim=-1)
            total += float(logprobs.gather(-1, target[:, None]).sum())
        return total

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if the task asks) continuations via model.generation.generate, cut at the
        first stop string; the eot token both stops a row and counts as a stop string."""
        eos_text = self.tok_decode(self._eot, skip_special_tokens=False)

        def sort_key(req: tuple[str, dict]) -> tuple[int, str]:
            return -len(self.tok_encode(req[0])), req[0]

        collator = Collator([req.args for req in requests], sort_fn=sort_key, group_by="gen_kwargs",
                            group_fn=lambda req: req[1])
        results = []
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            # lm-eval leaves room for the generation inside max_length; a recurrent hybrid has no hard
            # limit, so when max_gen_toks alone exceeds it the context keeps max_length tokens instead.
            max_ctx = self.max_length - max_gen_toks if max_gen_toks < self.max_length else self.max_length
            prompts = []
            for context in contexts:
                ids = self.tok_encode(context)[-max_ctx:]
                prompts.append(ids or [self.prefix_token_id])
            sampled = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 0.0)) > 0
            outputs = generate(self.model, prompts, max_gen_toks, stop_tokens=[self._eot], pad_token_id=self._eot,
                               temperature=float(kwargs.get("temperature", 0.0)) if sampled else 0.0,
                               top_k=kwargs.get("top_k") if sampled else None,
                               top_p=kwargs.get("top_p") if sampled else None)
            for context, gen_kwargs, output in zip(contexts, all_kwargs, outputs):
                text = postprocess_generated_text(self.tok_decode(output), stop=until, think_end_token=None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return collator.get_original(results)


# ---- the suite ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `braid eval harness` options."""
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help=f"comma-separated lm-eval task names (default: the local tasks {','.join(DEFAULT_TASKS)})")
    parser.add_argument("--limit", type=float, default=None,
                        help="documents per task (a fraction < 1: that share of each task)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--include-path", action="append", default=[],
                        help="more lm-eval task folders (YAML) next to the shipped evals/harness_tasks")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens scored at once (default: the training length)")
    parser.add_argument("--max-gen-toks", type=int, default=DEFAULT_MAX_GEN_TOKS)
    parser.add_argument("--rolling-cache", action="store_true",
                        help="loglikelihood_rolling: carry the hybrid cache across windows instead of "
                             "lm-eval's independent windows")
    parser.add_argument("--bootstrap-iters", type=int, default=1000,
                        help="bootstrap resamples for perplexity stderr (0: none)")
    parser.add_argument("--stock-hf", action="store_true",
                        help="MODEL is a converted folder: score it with lm-eval's stock `hf` model "
                             "(transformers + the folder's remote code) instead of the braid adapter")


def _task_list(tasks: str | list[str] | None) -> list[str]:
    if tasks is None:
        return list(DEFAULT_TASKS)
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError("--tasks: no task names given")
    return names


def _limit(limit: float | int | None) -> float | int | None:
    if limit is None:
        return None
    return int(limit) if float(limit) >= 1 and float(limit).is_integer() else float(limit)


def _scores(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """lm-eval's per-task results -> {task: {"acc,none": value, ...}} (no alias, "N/A" stderr -> None)."""
    scores: dict[str, dict[str, Any]] = {}
    for task, metrics in results.get("results", {}).items():
        scores[task] = {key: (None if value == "N/A" else value) for key, value in metrics.items()
                        if key != "alias" and (isinstance(value, (int, float)) or value in (None, "N/A"))}
    return scores


def task_manager_for(include_path: list[str], names: list[str]) -> Any:
    """A TaskManager over the given folders; lm-eval's built-in tasks are indexed (seconds) only when a
    requested name is not found in them."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=include_path, include_defaults=False)
    if all(name in local.all_tasks for name in names):
        return local
    return TaskManager(include_path=include_path)


def _evaluate(model: Any, tasks: str | list[str] | None, limit: float | int | None, batch_size: int,
              num_fewshot: int | None, include_path: list[str] | str | None,
              bootstrap_iters: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """simple_evaluate on the local (+ included) tasks; shared by run() and run_stock_hf() so both
    backends see the same task list and settings. Returns (lm-eval results, settings)."""
    import lm_eval
    from lm_eval.evaluator import simple_evaluate

    extra = [include_path] if isinstance(include_path, str) else list(include_path or [])
    paths = [TASKS_DIR] + [os.path.abspath(p) for p in extra]
    names = _task_list(tasks)
    task_manager = task_manager_for(paths, names)
    results = simple_evaluate(model=model, tasks=names, num_fewshot=num_fewshot, limit=_limit(limit),
                              batch_size=batch_size, task_manager=task_manager, bootstrap_iters=bootstrap_iters,
                              log_samples=False, random_seed=0, numpy_random_seed=1234, torch_random_seed=1234,
                              fewshot_random_seed=1234)
    if results is None:
        raise RuntimeError("lm-eval returned no results (not rank 0?)")
    settings = {"tasks": names, "limit": _limit(limit), "batch_size": batch_size, "num_fewshot": num_fewshot,
                "include_path": paths, "bootstrap_iters": bootstrap_iters,
                "lm_eval_version": getattr(lm_eval, "__version__", None),
                "n_shot": results.get("n-shot"), "task_versions": results.get("versions"),
                "n_samples": results.get("n-samples")}
    return results, settings


def run(lm: EvalModel, out_dir: str, tasks: str | list[str] | None = None, limit: float | int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE, num_fewshot: int | None = None,
        include_path: list[str] | str | None = None, max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, rolling_cache: bool = False,
        bootstrap_iters: int = 1000, stock_hf: bool = False) -> dict[str, Any]:
    """Evaluate `lm` with lm-eval on the tasks and write out_dir/results.json; returns the record."""
    if stock_hf:
        if not str(lm.provenance.get("kind", "")).startswith("hf-"):
            raise ValueError("--stock-hf: MODEL must be a converted Hugging Face folder (braid convert to-hf)")
        return run_stock_hf(lm.provenance["model"], out_dir, tasks, limit, batch_size, num_fewshot, include_path,
                            bootstrap_iters, max_length)
    adapter = BraidLM(eval_model=lm, batch_size=batch_size, max_length=max_length, max_gen_toks=max_gen_toks,
                      rolling_cache=rolling_cache)
    results, settings = _evaluate(adapter, tasks, limit, batch_size, num_fewshot, include_path, bootstrap_iters)
    settings.update(model="braid", max_length=adapter.max_length, max_gen_toks=max_gen_toks,
                    rolling_cache=adapter.rolling_cache)
    path = write_results(out_dir, SUITE, _scores(results), settings, lm)
    with open(path) as f:
        return json.load(f)


def run_stock_hf(hf_dir: str, out_dir: str, tasks: str | list[str] | None = None, limit: float | int | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, num_fewshot: int | None = None,
                 include_path: list[str] | str | None = None, bootstrap_iters: int = 1000,
                 max_length: int | None = None) -> dict[str, Any]:
    """The same tasks and settings as run(), scored by lm-eval's stock `hf` model on a converted HF
    folder (trust_remote_code, CPU): the cross-check that conversion and the adapter agree."""
    from lm_eval.models.huggingface import HFLM
    hf_args: dict[str, Any] = dict(pretrained=hf_dir, trust_remote_code=True, device="cpu", batch_size=batch_size)
    if max_length is not None:
        hf_args["max_length"] = max_length
    model = HFLM(**hf_args)
    results, settings = _evaluate(model, tasks, limit, batch_size, num_fewshot, include_path, bootstrap_iters)
    settings.update(model="hf", max_length=model.max_length)
    path = write_results(out_dir, SUITE, _scores(results), settings, None,
                         extra={"provenance": {"model": os.path.abspath(hf_dir), "kind": "hf-stock"}})
    with open(path) as f:
        return json.load(f)
