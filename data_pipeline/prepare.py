"""`braid data prepare`: the stages as datatrove executors, rerun safety, stats, and publishing.

Stages, each a datatrove executor with its own completion log in `<output>/.work/logs/<stage>/`:

    filter     N tasks   inputs -> filters -> kept documents (.work/filtered/NNNNN.jsonl.gz) [+ dedup signatures]
    dedup      exact: find duplicates (1 task) | minhash: buckets (num_buckets tasks), clusters (1 task)
    tokenize   N tasks   kept documents -> drop duplicates -> MDS token rows (<output>/{train,val}/task_NNNNN)
    publish    merged <split>/index.json, stats.json, and braid_data.json last

Rerun safety. A rerun skips the tasks datatrove logged as complete; a task that died is redone
(its MDS folders are written under a temporary name and renamed at the end). The recipe (minus
executor settings) and the tokenizer's sha256 form a fingerprint kept in `.work/recipe.json` and in
braid_data.json: a run with a different one stops with an error when the output holds a published
dataset, unless `overwrite: true`; the unfinished work of another recipe (a run that failed, nothing
published) is discarded, so a corrected recipe simply runs. Checks
that can fail (recipe, tokenizer, inputs, an empty corpus) all come before anything under
`train/`, `val/` or braid_data.json is touched, so a failing run leaves the last good output whole.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from datatrove.pipeline.base import PipelineStep

from data_pipeline.corpus import ensure_corpus
from data_pipeline.dataset_info import DATA_INFO
from data_pipeline.pipeline import (SPLITS, MDSTokenWriter, RegexWordTokenizer, TaskFileReader, build_filters,
                                    build_readers, check_inputs, check_text_key, dedup_content)
from data_pipeline.recipe import Recipe, resolve_path
from data_pipeline.tokenizer import TokenizerInfo, tokenizer_info

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Layout:
    """Where everything lives under `<output>`."""
    output: str

    @property
    def work(self) -> str:
        return os.path.join(self.output, ".work")

    def logs(self, stage: str) -> str:
        return os.path.join(self.work, "logs", stage)

    def dedup(self, part: str) -> str:
        return os.path.join(self.work, "dedup", part)

    @property
    def filtered(self) -> str:
        return os.path.join(self.work, "filtered")

    @property
    def fingerprint_file(self) -> str:
        return os.path.join(self.work, "recipe.json")

    def split(self, name: str) -> str:
        return os.path.join(self.output, name)

    @property
    def meta(self) -> str:
        return os.path.join(self.output, DATA_INFO)

    @property
    def stats(self) -> str:
        return os.path.join(self.output, "stats.json")


@dataclass
class Stage:
    """One datatrove executor: its steps (with the labels the stats use) and its number of tasks."""
    name: str
    steps: list[tuple[str, PipelineStep]]
    tasks: int
    skip_completed: bool = True


# ---------------------------------------------------------------------------- small file helpers


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json_atomic(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- fingerprint


def fingerprint(recipe: Recipe, info: TokenizerInfo) -> dict[str, Any]:
    """Everything that decides the bytes of the output: not where it goes, how many workers, or Slurm time."""
    fp = recipe.resolved_dict()
    for key in ("output", "overwrite", "corpus"):
        fp.pop(key)
    fp["executor"] = {"tasks": recipe.executor.tasks}
    fp["tokenizer"] = {"sha256": info.sha256, "eos_token": recipe.tokenizer.eos_token,
                       "pad_token": recipe.tokenizer.pad_token}
    fp["shards"]["size_limit"] = recipe.size_limit_bytes
    return fp


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: obj}


def _changed_keys(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))


def _published_fingerprint(layout: Layout) -> dict | None:
    return (_read_json(layout.meta) or {}).get("fingerprint")


def claim_output(layout: Layout, fp: dict, overwrite: bool) -> None:
    """Refuse to replace a published dataset of another recipe (unless overwrite: then the stages start
    afresh, the published data staying until the new one is complete). The unfinished work of another
    recipe, with nothing published, is scratch (a run that failed, e.g. on a wrong text_key): it is
    discarded and the stages start afresh."""
    published, unfinished = _published_fingerprint(layout), _read_json(layout.fingerprint_file)
    if published is not None and published != fp:
        changed = ", ".join(_changed_keys(published, fp)[:8])
        if not overwrite:
            raise ValueError(f"{layout.output} holds data prepared with a different recipe (changed: {changed}); "
                             f"set recipe.output to a new folder, or overwrite=true to replace it")
        print(f"braid: overwrite: rebuilding {layout.output} (changed: {changed})", file=sys.stderr)
        shutil.rmtree(layout.work, ignore_errors=True)
    elif unfinished is not None and unfinished != fp:
        changed = ", ".join(_changed_keys(unfinished, fp)[:8])
        print(f"braid: discarding the unfinished preparation in {layout.work} (another recipe; changed: {changed})",
              file=sys.stderr)
        shutil.rmtree(layout.work, ignore_errors=True)
    _write_json_atomic(layout.fingerprint_file, fp)


# ---------------------------------------------------------------------------- stages


def build_stages(recipe: Recipe, layout: Layout, info: TokenizerInfo, progress: bool = False) -> list[Stage]:
    """The datatrove pipelines of a recipe, in order (deterministic, so stats can be read back by label)."""
    from datatrove.pipeline.writers import JsonlWriter

    tasks = recipe.executor.tasks
    method = recipe.dedup.method
    readers = [(f"input{i}", step) for i, step in enumerate(build_readers(recipe, progress))]
    kept = ("kept", JsonlWriter(layout.filtered, output_filename="${rank}.jsonl.gz", compression="gzip"))
    first = readers + build_filters(recipe) + [kept]
    dedup_stages: list[Stage] = []
    dedup_filter: list[tuple[str, PipelineStep]] = []

    if method == "exact":
        from datatrove.pipeline.dedup import ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, ExactFindDedups
        config = ExactDedupConfig(content_getter=dedup_content)
        first.append(("signature", ExactDedupSignature(layout.dedup("signatures"), config)))
        dedup_stages.append(Stage("dedup", [("find", ExactFindDedups(layout.dedup("signatures"),
                                                                    layout.dedup("duplicates"), config))], 1))
        dedup_filter.append(("dedup", ExactDedupFilter(layout.dedup("duplicates"), config)))
    elif method == "minhash":
        from datatrove.pipeline.dedup import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                              MinhashDedupFilter, MinhashDedupSignature)
        m = recipe.dedup.minhash
        config = MinhashConfig(n_grams=m.n_grams, num_buckets=m.num_buckets, hashes_per_bucket=m.hashes_per_bucket,
                               seed=m.seed)
        first.append(("signature", MinhashDedupSignature(layout.dedup("signatures"), config,
                                                         language=RegexWordTokenizer())))
        dedup_stages.append(Stage("dedup_buckets", [("buckets", MinhashDedupBuckets(
            layout.dedup("signatures"), layout.dedup("buckets"), config=config))], m.num_buckets))
        dedup_stages.append(Stage("dedup_clusters", [("clusters", MinhashDedupCluster(
            layout.dedup("buckets"), layout.dedup("remove"), config=config))], 1))
        dedup_filter.append(("dedup", MinhashDedupFilter(layout.dedup("remove"))))

    writer = MDSTokenWriter(
        output_dir=layout.output, tokenizer_path=info.path, eos_id=info.eos_id,
        row_length=recipe.shards.row_length, token_dtype=info.token_dtype, validation=recipe.validation,
        size_limit=recipe.size_limit_bytes, compression=recipe.shards.compression,
        batch_size=recipe.tokenizer.batch_size, progress=progress)
    tokenize = [("reader", TaskFileReader(layout.filtered))] + dedup_filter + [("tokenize", writer)]
    return [Stage("filter", first, tasks), *dedup_stages, Stage("tokenize", tokenize, tasks)]


def _local_executor(stage: Stage, recipe: Recipe, layout: Layout):
    from datatrove.executor import LocalPipelineExecutor
    workers = recipe.executor.workers
    workers = stage.tasks if workers == -1 else min(workers, stage.tasks)
    return LocalPipelineExecutor([step for _, step in stage.steps], tasks=stage.tasks, workers=workers,
                                 logging_dir=layout.logs(stage.name), skip_completed=stage.skip_completed)


def _slurm_executor(stage: Stage, recipe: Recipe, layout: Layout, depends=None):
    from datatrove.executor import SlurmPipelineExecutor
    s = recipe.executor.slurm
    # the options datatrove has no argument for (account, sbatch_args); it writes `--key` for an empty value
    own_arguments = ("partition", "time", "qos", "cpus-per-task", "job-name")
    sbatch_args = {name: value or "" for name, value in s.sbatch_options().items() if name not in own_arguments}
    return SlurmPipelineExecutor(
        [step for _, step in stage.steps], tasks=stage.tasks, time=s.time, partition=s.partition,
        cpus_per_task=s.cpus_per_task, mem_per_cpu_gb=s.mem_per_cpu_gb, qos=s.qos, workers=-1,
        job_name=f"{s.job_name}-{stage.name}", env_command="\n".join(s.environment_lines()) or None,
        sbatch_args=sbatch_args,
        logging_dir=layout.logs(stage.name), slurm_logs_folder=os.path.join(layout.work, "slurm_logs", stage.name),
        skip_completed=stage.skip_completed, depends=depends)


class CheckKeptStep(PipelineStep):
    """Slurm only (local runs call `check_kept` directly): stop before tokenizing an empty corpus."""
    type = "🚦 - CHECK"
    name = "Kept documents"

    def __init__(self, recipe: Recipe, layout: Layout, info: TokenizerInfo):
        super().__init__()
        self.recipe, self.layout, self.info = recipe, layout, info

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        check_kept(self.recipe, self.layout, self.info)
        _retire_published(self.layout, fingerprint(self.recipe, self.info))
        yield from ()


class PublishStep(PipelineStep):
    """Slurm only (local runs call `publish` directly): merged indexes, stats.json, braid_data.json."""
    type = "📦 - PUBLISH"
    name = "Merged index and metadata"

    def __init__(self, recipe: Recipe, layout: Layout, info: TokenizerInfo):
        super().__init__()
        self.recipe, self.layout, self.info = recipe, layout, info

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        publish(self.recipe, self.layout, self.info)
        yield from ()


def plan(recipe: Recipe, layout: Layout, info: TokenizerInfo) -> list[tuple[Stage, Any]]:
    """(stage, executor) pairs in run order; a Slurm chain is linked by `depends` and adds check/publish jobs."""
    stages = build_stages(recipe, layout, info, progress=sys.stderr.isatty())
    if recipe.executor.type == "local":
        return [(stage, _local_executor(stage, recipe, layout)) for stage in stages]
    *before, tokenize = stages
    stages = before + [Stage("check", [("check", CheckKeptStep(recipe, layout, info))], 1, skip_completed=False),
                       tokenize,
                       Stage("publish", [("publish", PublishStep(recipe, layout, info))], 1, skip_completed=False)]
    pairs: list[tuple[Stage, Any]] = []
    for stage in stages:
        pairs.append((stage, _slurm_executor(stage, recipe, layout, depends=pairs[-1][1] if pairs else None)))
    return pairs


def build_executors(recipe: Recipe) -> list:
    """The executors `prepare` would run, in order, built but not run (nothing is submitted or written)."""
    return [executor for _, executor in plan(recipe, Layout(resolve_path(recipe.output)),
                                             tokenizer_info(recipe.tokenizer))]


# ---------------------------------------------------------------------------- stats


def stage_totals(layout: Layout, stage: Stage) -> dict[str, Counter]:
    """Per step label, each stat summed over the stage's tasks (from datatrove's stats/NNNNN.json)."""
    totals = {label: Counter() for label, _ in stage.steps}
    for rank in range(stage.tasks):
        entries = _read_json(os.path.join(layout.logs(stage.name), "stats", f"{rank:05d}.json")) or []
        for (label, _), entry in zip(stage.steps, entries):
            for key, value in entry.get("stats", {}).items():
                totals[label][key] += value["total"] if isinstance(value, dict) else value
    return totals


def _filter_summary(stage: Stage, totals: dict[str, Counter]) -> dict[str, Any]:
    readers = [label for label, _ in stage.steps if label.startswith("input")]
    filters = [label for label, _ in stage.steps if label not in readers and label not in ("kept", "signature")]
    return {
        "documents_read": int(sum(totals[r]["documents"] for r in readers)),
        "malformed_lines": int(sum(totals[r]["malformed_lines"] for r in readers)),
        "documents_without_text": int(sum(totals[r]["missing_text"] for r in readers)),
        "unreadable_files": int(sum(totals[r]["unreadable_files"] for r in readers)),
        "dropped": {f: int(totals[f]["dropped"]) for f in filters},
        "drop_reasons": {f"{f}.{key[len('dropped_'):]}": int(v) for f in filters
                         for key, v in sorted(totals[f].items()) if key.startswith("dropped_")},
        "documents_after_filters": int(totals["kept"]["total"]),
    }


def check_kept(recipe: Recipe, layout: Layout, info: TokenizerInfo) -> dict[str, Any]:
    """After the filter stage: an empty corpus is an error, raised before any shard is written."""
    stage = build_stages(recipe, layout, info)[0]
    totals = stage_totals(layout, stage)
    summary = _filter_summary(stage, totals)
    if summary["documents_after_filters"] == 0:
        check_text_key(recipe, totals)          # records read, none with text: name the key and the fields
        dropped = ", ".join(f"{k} {v}" for k, v in summary["dropped"].items() if v) or "none"
        raise ValueError(f"empty corpus: no document survived ({summary['documents_read']} read, "
                         f"{summary['malformed_lines']} malformed lines, dropped by filters: {dropped})")
    return summary


def _retire_published(layout: Layout, fp: dict) -> None:
    # about to replace a dataset made by another recipe (overwrite): it stops looking complete first
    if _published_fingerprint(layout) not in (None, fp):
        for path in [layout.meta] + [os.path.join(layout.split(s), "index.json") for s in SPLITS]:
            if os.path.exists(path):
                os.remove(path)


def merge_task_indexes(split_dir: str, tasks: int) -> dict[str, int]:
    """`<split>/index.json` over task_00000 ... (what streaming's merge_index does for local folders)."""
    shards = []
    for rank in range(tasks):
        name = f"task_{rank:05d}"
        index = _read_json(os.path.join(split_dir, name, "index.json"))
        if index is None:
            raise RuntimeError(f"{split_dir}/{name}/index.json missing: that task has not completed")
        for shard in index["shards"]:
            for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                if shard.get(key):
                    shard[key]["basename"] = f"{name}/{shard[key]['basename']}"
            shards.append(shard)
    _write_json_atomic(os.path.join(split_dir, "index.json"), {"version": 2, "shards": shards})
    return {"shards": len(shards), "samples": sum(s["samples"] for s in shards)}


def _remove_stale(layout: Layout, recipe: Recipe) -> None:
    # task folders of an overwritten recipe with more tasks, or a val split it had and this one has not
    for split in SPLITS:
        folder = layout.split(split)
        if split == "val" and recipe.validation == 0:
            shutil.rmtree(folder, ignore_errors=True)
            continue
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if name.startswith("task_") and name[5:].isdigit() and int(name[5:]) >= recipe.executor.tasks:
                shutil.rmtree(os.path.join(folder, name))


def publish(recipe: Recipe, layout: Layout, info: TokenizerInfo, started: float | None = None,
            stage_times: dict[str, float] | None = None) -> dict[str, Any]:
    """After the tokenize stage: merged indexes, stats.json, then braid_data.json (the 'complete' mark)."""
    stages = build_stages(recipe, layout, info)
    filter_stage, tokenize_stage = stages[0], stages[-1]
    summary = _filter_summary(filter_stage, stage_totals(layout, filter_stage))
    tok = stage_totals(layout, tokenize_stage)
    summary["duplicates"] = int(tok["dedup"]["dropped"]) if "dedup" in tok else 0
    writer = tok["tokenize"]
    L = recipe.shards.row_length
    splits = [s for s in SPLITS if s == "train" or recipe.validation > 0]
    if writer["train_rows"] == 0:
        produced = int(writer["train_tokens"])
        raise ValueError(f"empty corpus: {produced} training tokens do not fill one row of {L} "
                         f"(lower recipe.shards.row_length, or add data)")
    _remove_stale(layout, recipe)
    summary["splits"] = {}
    for split in splits:
        merged = merge_task_indexes(layout.split(split), recipe.executor.tasks)
        summary["splits"][split] = {
            "documents": int(writer[f"{split}_documents"]), "rows": int(writer[f"{split}_rows"]),
            "tokens": int(writer[f"{split}_rows"]) * L,
            "dropped_tail_tokens": int(writer[f"{split}_dropped_tail_tokens"]), "shards": merged["shards"]}
        if merged["samples"] != summary["splits"][split]["rows"]:
            raise RuntimeError(f"{split}: merged index holds {merged['samples']} rows, the task stats "
                               f"{summary['splits'][split]['rows']}; rerun to redo the tasks")
    if recipe.validation > 0 and summary["splits"]["val"]["rows"] == 0:
        print(f"braid: warning: validation={recipe.validation} left no complete row in val/", file=sys.stderr)
    summary["tokens_written"] = sum(s["tokens"] for s in summary["splits"].values())
    summary["shards"] = sum(s["shards"] for s in summary["splits"].values())
    summary["time_s"] = round(time.perf_counter() - started, 2) if started is not None else None
    summary["stage_time_s"] = stage_times or {}

    _write_json_atomic(layout.stats, summary)
    meta = {
        "format_version": FORMAT_VERSION,
        "row_length": L,
        "vocab_size": info.vocab_size,
        "eos_id": info.eos_id,
        "pad_id": info.pad_id,
        "token_dtype": info.token_dtype,
        "splits": splits,
        "doc_starts_none": L,   # doc_starts of a row in which no document begins (MDS has no empty arrays)
        "tokenizer": {"path": info.path, "sha256": info.sha256, "vocab_size": info.vocab_size},
        "recipe": recipe.resolved_dict(),
        "fingerprint": fingerprint(recipe, info),
        "stats": summary,
    }
    _write_json_atomic(layout.meta, meta)   # last: its presence means the dataset is complete
    return summary


# ---------------------------------------------------------------------------- entry point


def prepare(recipe: Recipe) -> dict[str, Any]:
    """Run (local) or submit (slurm) the whole preparation; returns the summary (or the submitted job ids)."""
    started = time.perf_counter()
    ensure_corpus(recipe)
    info = tokenizer_info(recipe.tokenizer)
    check_inputs(recipe)
    if recipe.executor.type == "slurm" and shutil.which("sbatch") is None:
        raise FileNotFoundError("recipe.executor.type is slurm but there is no `sbatch` on this machine's PATH")
    layout = Layout(resolve_path(recipe.output))
    fp = fingerprint(recipe, info)
    claim_output(layout, fp, recipe.overwrite)

    pairs = plan(recipe, layout, info)
    if recipe.executor.type == "slurm":
        pairs[-1][1].run()   # launches the whole chain through `depends`
        return {"submitted": {ex.job_name: ex.job_id for _, ex in pairs}, "output": layout.output}

    stage_times = {}
    for stage, executor in pairs:
        if stage.name == "tokenize":
            check_kept(recipe, layout, info)
            _retire_published(layout, fp)
        print(f"braid: stage {stage.name}: {stage.tasks} task(s)", file=sys.stderr)
        t0 = time.perf_counter()
        executor.run()
        stage_times[stage.name] = round(time.perf_counter() - t0, 2)
    return publish(recipe, layout, info, started, stage_times)
