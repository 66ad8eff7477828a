"""Data recipes: the YAML that `braid data prepare|tokenizer` reads, as dataclasses with defaults.

Every key below is optional except `output`, `inputs` and `tokenizer.path`; an unknown key anywhere is
an error that names its path (`recipe.filters.lenght`). Relative paths are relative to the working
directory. Values shown are the defaults, except where a key is required or marked as an example.

    output: data/tiny                 # (required) writes <output>/train, <output>/val, braid_data.json, stats.json
    overwrite: false                  # true: replace an output prepared with a different recipe
    corpus:                           # optional: build a bundled corpus first when it is missing
      builder: python_stdlib          #   the only builder: docs + code of this interpreter's stdlib
      path: data/corpus/python_stdlib #   folder it writes part-NNNN.jsonl.gz into (point an input at it)
      parts: 4                        #   files, so that `executor.tasks` can share them out
      documents: pieces               #   pieces: one document per top-level def/class (+ the module's rest);
                                      #   modules: one document per whole module (long documents, for
                                      #   long-context evaluation: experiments/configs/stdlib_modules.yaml)
    inputs:                           # (required) one or more sources, read in this order
      - type: jsonl                   # jsonl (plain, .gz, .zst) | parquet | hf_disk (datasets.save_to_disk)
        path: data/corpus/python_stdlib   # (required) a file, or a folder (searched recursively)
        glob: null                    # inside a folder: which files, e.g. "*.jsonl.gz" (default: all)
        text_key: text                # the field holding the document text
        id_key: id                    # the field holding its id (default: file path/line)
        compression: infer            # jsonl only: infer | gzip | zstd | null
    filters:                          # each one switchable with `enabled`
      length: {enabled: true, min_chars: 1, max_chars: null}
      patterns:                       # drop documents whose text or URL matches a regex
        enabled: false
        text_patterns: []             # Python regexes searched in the text
        url_patterns: []              # regexes searched in metadata[url_key]
        blocked_domains: []           # a domain here, or any subdomain of it, is dropped
        url_key: url
      gopher_repetition: {enabled: false, ...}   # datatrove GopherRepetitionFilter; its thresholds
      gopher_quality: {enabled: false, ...}      # datatrove GopherQualityFilter; its thresholds
    dedup:
      method: exact                   # none | exact (datatrove exact dedup) | minhash (near and exact duplicates)
      minhash: {n_grams: 5, num_buckets: 14, hashes_per_bucket: 8, seed: 1}
    validation: 0.0                   # fraction of documents held out in <output>/val (stable text hash)
    tokenizer:
      path: data/tiny/tokenizer.json  # (required) a local file, never a hub name
      eos_token: "<|endoftext|>"      # appended after every document
      pad_token: "<|pad|>"
      extra_special_tokens: []
      vocab_size: null                # `braid data tokenizer` trains this size; prepare checks it if set
      min_frequency: 2                # training only
      max_documents: null             # training only: use at most this many documents
      batch_size: 256                 # documents per encode_batch call
    shards:
      row_length: 257                 # tokens per MDS sample (training seq_len + 1)
      size_limit: 64MB                # per shard, before compression (int bytes, or "64MB", "512KB")
      compression: zstd
    executor:
      type: local                     # local | slurm
      tasks: 1                        # whole input files (hf_disk: rows) are shared out between tasks;
                                      #   shards are written per task
      workers: 1                      # local only: tasks run at once (-1: all); Slurm runs all at once
      slurm:                          # slurm only; the keys of launch.settings.SlurmSettings (as in a
                                      #   training config's launch.slurm) plus mem_per_cpu_gb
        partition: null               #   required for slurm
        time: "04:00:00"
        account: null
        qos: null
        cpus_per_task: 1
        mem_per_cpu_gb: 2
        job_name: braid-data
        setup: []                     #   shell lines before the work, e.g. ["source /path/to/venv/bin/activate"]
        env: {}                       #   exported variables, e.g. {HF_HOME: /scratch/hf}
        sbatch_args: {}               #   further #SBATCH options, e.g. {exclusive: true}
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from launch.config_io import build_dataclass, load_config
from launch.settings import SlurmSettings


# ---------------------------------------------------------------------------- sections


@dataclass
class CorpusSpec:
    builder: str = "python_stdlib"
    path: str = "data/corpus/python_stdlib"
    parts: int = 4
    documents: str = "pieces"


@dataclass
class InputSpec:
    type: str = "jsonl"
    path: str = ""
    glob: Optional[str] = None
    text_key: str = "text"
    id_key: str = "id"
    compression: Optional[str] = "infer"


@dataclass
class LengthFilterSpec:
    enabled: bool = True
    min_chars: int = 1
    max_chars: Optional[int] = None


@dataclass
class PatternFilterSpec:
    enabled: bool = False
    text_patterns: list[str] = field(default_factory=list)
    url_patterns: list[str] = field(default_factory=list)
    blocked_domains: list[str] = field(default_factory=list)
    url_key: str = "url"


@dataclass
class GopherRepetitionSpec:
    """Thresholds of datatrove's GopherRepetitionFilter (Gopher paper, table A1); null disables one."""
    enabled: bool = False
    dup_line_frac: Optional[float] = 0.3
    dup_para_frac: Optional[float] = 0.3
    dup_line_char_frac: Optional[float] = 0.2
    dup_para_char_frac: Optional[float] = 0.2
    top_n_grams: list[list[float]] = field(default_factory=lambda: [[2, 0.2], [3, 0.18], [4, 0.16]])
    dup_n_grams: list[list[float]] = field(default_factory=lambda: [[5, 0.15], [6, 0.14], [7, 0.13], [8, 0.12],
                                                                     [9, 0.11], [10, 0.10]])


@dataclass
class GopherQualitySpec:
    """Thresholds of datatrove's GopherQualityFilter; null disables one."""
    enabled: bool = False
    min_doc_words: Optional[int] = 50
    max_doc_words: Optional[int] = 100000
    min_avg_word_length: Optional[float] = 3
    max_avg_word_length: Optional[float] = 10
    max_symbol_word_ratio: Optional[float] = 0.1
    max_bullet_lines_ratio: Optional[float] = 0.9
    max_ellipsis_lines_ratio: Optional[float] = 0.3
    max_non_alpha_words_ratio: Optional[float] = 0.8
    min_stop_words: Optional[int] = 2
    stop_words: Optional[list[str]] = None


@dataclass
class FiltersSpec:
    length: LengthFilterSpec = field(default_factory=LengthFilterSpec)
    patterns: PatternFilterSpec = field(default_factory=PatternFilterSpec)
    gopher_repetition: GopherRepetitionSpec = field(default_factory=GopherRepetitionSpec)
    gopher_quality: GopherQualitySpec = field(default_factory=GopherQualitySpec)


@dataclass
class MinhashSpec:
    n_grams: int = 5
    num_buckets: int = 14
    hashes_per_bucket: int = 8
    seed: int = 1


@dataclass
class DedupSpec:
    method: str = "exact"
    minhash: MinhashSpec = field(default_factory=MinhashSpec)


@dataclass
class TokenizerSpec:
    path: str = ""
    eos_token: str = "<|endoftext|>"
    pad_token: str = "<|pad|>"
    extra_special_tokens: list[str] = field(default_factory=list)
    vocab_size: Optional[int] = None
    min_frequency: int = 2
    max_documents: Optional[int] = None
    batch_size: int = 256


@dataclass
class ShardsSpec:
    row_length: int = 257
    size_limit: Any = "64MB"
    compression: Optional[str] = "zstd"


@dataclass
class SlurmSpec(SlurmSettings):
    """launch.settings.SlurmSettings (the keys a training config's launch.slurm has too), data defaults, memory."""
    time: str = "04:00:00"
    cpus_per_task: int = 1
    job_name: str = "braid-data"
    mem_per_cpu_gb: int = 2


@dataclass
class ExecutorSpec:
    type: str = "local"
    tasks: int = 1
    workers: int = 1
    slurm: SlurmSpec = field(default_factory=SlurmSpec)


@dataclass
class Recipe:
    output: str = ""
    inputs: list[InputSpec] = field(default_factory=list)
    overwrite: bool = False
    corpus: Optional[CorpusSpec] = None
    filters: FiltersSpec = field(default_factory=FiltersSpec)
    dedup: DedupSpec = field(default_factory=DedupSpec)
    validation: float = 0.0
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    shards: ShardsSpec = field(default_factory=ShardsSpec)
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_dict(self) -> dict[str, Any]:
        """`to_dict` with every path made absolute (what braid_data.json records)."""
        data = self.to_dict()
        data["output"] = resolve_path(self.output)
        for spec in data["inputs"]:
            spec["path"] = resolve_path(spec["path"])
        data["tokenizer"]["path"] = resolve_path(self.tokenizer.path)
        if data["corpus"] is not None:
            data["corpus"]["path"] = resolve_path(self.corpus.path)
        return data

    @property
    def size_limit_bytes(self) -> int:
        return parse_size(self.shards.size_limit, "recipe.shards.size_limit")


# ---------------------------------------------------------------------------- parsing

INPUT_TYPES = ("jsonl", "parquet", "hf_disk")
DEDUP_METHODS = ("none", "exact", "minhash")
EXECUTORS = ("local", "slurm")
CORPUS_BUILDERS = ("python_stdlib",)
CORPUS_DOCUMENTS = ("pieces", "modules")
_SIZE_UNITS = {"": 1, "b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30}


def parse_size(value: Any, where: str) -> int:
    """64 * 2**20, "64MB", "512kb" -> bytes (binary units, as mosaicml-streaming reads them)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+)\s*([kmg]?b?)\s*", str(value).lower())
        if not match:
            raise ValueError(f"{where}: {value!r} is not a size (use bytes or e.g. '64MB')")
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if not 0 < size < 2 ** 32:   # MDS stores sample offsets as uint32
        raise ValueError(f"{where}: {value!r} must be between 1 byte and 4GB")
    return size


def _check(recipe: Recipe) -> None:
    """Value checks that the types alone do not express."""
    if not recipe.output:
        raise ValueError("recipe.output: required (the folder that receives train/, val/ and braid_data.json)")
    if not recipe.inputs:
        raise ValueError("recipe.inputs: required (at least one input source)")
    for i, spec in enumerate(recipe.inputs):
        if spec.type not in INPUT_TYPES:
            raise ValueError(f"recipe.inputs[{i}].type: {spec.type!r} is not one of {', '.join(INPUT_TYPES)}")
        if not spec.path:
            raise ValueError(f"recipe.inputs[{i}].path: required")
        if spec.compression not in ("infer", "gzip", "zstd", None):
            raise ValueError(f"recipe.inputs[{i}].compression: {spec.compression!r} is not infer, gzip, zstd or null")
    if recipe.corpus is not None and recipe.corpus.builder not in CORPUS_BUILDERS:
        raise ValueError(f"recipe.corpus.builder: {recipe.corpus.builder!r} is not one of {', '.join(CORPUS_BUILDERS)}")
    if recipe.corpus is not None and recipe.corpus.documents not in CORPUS_DOCUMENTS:
        raise ValueError(f"recipe.corpus.documents: {recipe.corpus.documents!r} is not one of "
                         f"{', '.join(CORPUS_DOCUMENTS)}")
    if recipe.dedup.method not in DEDUP_METHODS:
        raise ValueError(f"recipe.dedup.method: {recipe.dedup.method!r} is not one of {', '.join(DEDUP_METHODS)}")
    if not 0.0 <= recipe.validation < 1.0:
        raise ValueError(f"recipe.validation: {recipe.validation} must be in [0, 1)")
    if not recipe.tokenizer.path:
        raise ValueError("recipe.tokenizer.path: required (a local tokenizer.json)")
    if recipe.tokenizer.batch_size < 1:
        raise ValueError("recipe.tokenizer.batch_size: must be >= 1")
    if recipe.shards.row_length < 2:
        raise ValueError(f"recipe.shards.row_length: {recipe.shards.row_length} must be >= 2 (seq_len + 1)")
    if recipe.shards.compression not in (None, "zstd"):
        # the loader contract names zstd; no compression stays possible for debugging
        raise ValueError(f"recipe.shards.compression: {recipe.shards.compression!r} is not zstd or null")
    recipe.size_limit_bytes  # noqa: B018  (validates)
    ex = recipe.executor
    if ex.type not in EXECUTORS:
        raise ValueError(f"recipe.executor.type: {ex.type!r} is not one of {', '.join(EXECUTORS)}")
    if ex.tasks < 1:
        raise ValueError("recipe.executor.tasks: must be >= 1")
    if ex.workers == 0 or ex.workers < -1:
        raise ValueError("recipe.executor.workers: must be >= 1, or -1 for all tasks at once")
    if ex.type == "slurm" and not ex.slurm.partition:
        raise ValueError("recipe.executor.slurm.partition: required for the slurm executor")
    # datatrove sets these itself for its array jobs
    ex.slurm.check("recipe.executor.slurm", reserved={name: "datatrove's SlurmPipelineExecutor" for name in
                                                      ("array", "output", "error", "nodes", "mem-per-cpu")})
    mh = recipe.dedup.minhash
    if recipe.dedup.method == "minhash" and min(mh.n_grams, mh.num_buckets, mh.hashes_per_bucket) < 1:
        raise ValueError("recipe.dedup.minhash: n_grams, num_buckets and hashes_per_bucket must be >= 1")
    for name in ("text_patterns", "url_patterns"):
        for i, pattern in enumerate(getattr(recipe.filters.patterns, name)):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"recipe.filters.patterns.{name}[{i}]: {pattern!r} is not a regex ({err})") from None


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Validate a recipe mapping (unknown keys, types, values); errors name the key path."""
    recipe = build_dataclass(Recipe, data, "recipe")
    _check(recipe)
    return recipe


def load_recipe(path: str, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML with `key.sub=value` overrides (launch.config_io) and validate it."""
    data = load_config(path, overrides)
    try:
        return recipe_from_dict(data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def resolve_path(path: str) -> str:
    """Recipe paths are relative to the working directory; keep them absolute from here on."""
    return os.path.abspath(os.path.expanduser(path))
