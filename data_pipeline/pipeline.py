"""datatrove steps of `braid data prepare`: readers, filters, and the step that writes MDS token rows.

The shard format (the contract with `data_pipeline.streaming`):
  * `<output>/<split>/task_NNNNN/` is one MDS dataset per task and split (zstd), and
    `<output>/<split>/index.json` merges them (as `streaming.base.util.merge_index` does);
  * a sample is one training row: `tokens` (`ndarray:uint16`, or `uint32` above 65535 tokens), exactly
    `row_length` ids, and `doc_starts` (`ndarray:int32`), the sorted positions in the row where a
    document begins. A row that starts in the middle of a document does not list 0. MDS cannot store
    an empty array, so a row in which no document begins holds `[row_length]`, a position past its
    end: readers drop values >= row_length;
  * each task's documents are concatenated in order with EOS after each one and cut into rows, so a
    document may span rows and a task's consecutive rows are one continuous stream; the last partial
    row is dropped (counted as `<split>_dropped_tail_tokens`).
"""
from __future__ import annotations

import glob as globlib
import hashlib
import os
import re
import shutil
import sys
from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers import HuggingFaceDatasetReader, JsonlReader, ParquetReader
from datatrove.utils.batching import batched
from datatrove.utils.logging import logger
from datatrove.utils.word_tokenizers import WordTokenizer

from data_pipeline.recipe import InputSpec, Recipe, resolve_path

SPLITS = ("train", "val")


# ---------------------------------------------------------------------------- readers


MISSING_TEXT_FIELDS = "missing_text_fields:"     # stat label prefix: the fields of a record without text


class CountsMissingText:
    """Reader mixin: a record without text (a wrong `text_key`) is counted (`missing_text`), and the fields of
    the first one each task meets are kept as a stat label (`missing_text_fields:a,b,c`), so that an empty
    corpus can be explained by the key and the fields there are, whichever executor ran the task."""

    _fields_noted = False

    def get_document_from_dict(self, data: dict, source_file: str, id_in_file):
        fields = None if self._fields_noted else list(data)           # the adapter pops keys out of `data`
        document = super().get_document_from_dict(data, source_file, id_in_file)
        if document is None:
            self.stat_update("missing_text")
            if fields is not None:
                self._fields_noted = True
                self.stat_update(MISSING_TEXT_FIELDS + ",".join(sorted(map(str, fields))))
        return document


def fields_without_text(stats: dict[str, float]) -> list[str]:
    """The fields found in records without text, from a reader's summed stats."""
    return sorted({field for key in stats if key.startswith(MISSING_TEXT_FIELDS)
                   for field in key[len(MISSING_TEXT_FIELDS):].split(",") if field})


def check_text_key(recipe: Recipe, totals: dict[str, Any]) -> None:
    """Inputs from which nothing was read, though records were: a ValueError naming the input's text_key and
    the fields its records have. `totals` maps each reader label (input0, ...) to its summed stats."""
    for i, spec in enumerate(recipe.inputs):
        stats = totals.get(f"input{i}") or {}
        missing = int(stats.get("missing_text", 0))
        if missing and not stats.get("documents"):
            fields = ", ".join(fields_without_text(stats)) or "none"
            raise ValueError(f"recipe.inputs[{i}].text_key={spec.text_key!r}: none of the {missing:,} records read from "
                             f"{resolve_path(spec.path)} has that field (fields found: {fields}); set "
                             f"recipe.inputs[{i}].text_key to the field that holds the text")


class BraidJsonlReader(CountsMissingText, JsonlReader):
    """datatrove's JsonlReader, but a malformed line is counted (`malformed_lines`) and reported by file and line."""

    name = "🐿 Jsonl (braid)"

    def read_file(self, filepath: str) -> DocumentsPipeline:
        import orjson

        where = self.data_folder.resolve_paths(filepath)
        with self.data_folder.open(filepath, "r", compression=self.compression) as f:
            line_no = 0
            try:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue   # blank lines separate nothing; not an error
                    with self.track_time():
                        try:
                            record = orjson.loads(line)
                        except orjson.JSONDecodeError as err:
                            self._malformed(where, line_no, f"not valid JSON: {err}")
                            continue
                        if not isinstance(record, dict):
                            self._malformed(where, line_no, f"a JSON {type(record).__name__}, not an object")
                            continue
                        document = self.get_document_from_dict(record, filepath, line_no - 1)
                    if document is None:           # no text under text_key: counted by CountsMissingText
                        continue
                    yield document
            except (UnicodeDecodeError, EOFError, OSError) as err:   # truncated or corrupt (compressed) file
                self.stat_update("unreadable_files")
                logger.warning(f"{where}: unreadable after line {line_no}, rest of the file skipped ({err})")

    def _malformed(self, where: str, line_no: int, why: str) -> None:
        self.stat_update("malformed_lines")
        logger.warning(f"{where}:{line_no}: malformed line skipped ({why})")


class TaskFileReader(BraidJsonlReader):
    """Reads back what stage 1 of the same task kept (`NNNNN.jsonl.gz`), in order: dedup indexes refer to it."""

    name = "🐿 Filtered documents"

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        name = f"{rank:05d}.jsonl.gz"
        # a task that kept nothing wrote no file (datatrove opens output files lazily)
        files = [name] if self.data_folder.isfile(name) else []
        yield from self.read_files_shard(files)


class BraidParquetReader(CountsMissingText, ParquetReader):
    """datatrove's ParquetReader, counting records without text."""


class BraidSavedDatasetReader(CountsMissingText, HuggingFaceDatasetReader):
    """datatrove's reader of a `datasets.save_to_disk` folder, counting records without text."""


def _exact_glob(name: str) -> str:
    # datatrove prefixes a glob without wildcards with "*" (so "a.jsonl" would also match "ba.jsonl");
    # a one-character class keeps the match exact
    if name[0] in "!^]":
        return globlib.escape(name)
    return f"[{name[0]}]{globlib.escape(name[1:])}"


def _folder_and_glob(spec: InputSpec) -> tuple[str, str | None, bool]:
    path = resolve_path(spec.path)
    if os.path.isfile(path):
        return os.path.dirname(path), _exact_glob(os.path.basename(path)), False
    return path, spec.glob, True


def check_inputs(recipe: Recipe) -> None:
    """Fail early, with the recipe key, when an input is missing or matches no file."""
    for i, spec in enumerate(recipe.inputs):
        path = resolve_path(spec.path)
        where = f"recipe.inputs[{i}].path"
        if not os.path.exists(path):
            raise FileNotFoundError(f"{where}: {path} not found")
        if spec.type == "hf_disk":
            if os.path.isfile(os.path.join(path, "dataset_dict.json")):
                raise ValueError(f"{where}: {path} is a DatasetDict; point the input at one split's folder")
            if not os.path.isfile(os.path.join(path, "state.json")):
                raise FileNotFoundError(f"{where}: {path} is not a dataset saved with datasets' save_to_disk")
            continue
        if os.path.isdir(path):
            folder, pattern, recursive = _folder_and_glob(spec)
            if not get_datafolder(folder).list_files(recursive=recursive, glob_pattern=pattern):
                raise FileNotFoundError(f"{where}: no files in {path}" + (f" matching {spec.glob!r}" if spec.glob else ""))


def build_reader(spec: InputSpec, progress: bool) -> PipelineStep:
    """The datatrove reader for one recipe input (files are shared out between tasks)."""
    if spec.type == "hf_disk":
        return BraidSavedDatasetReader(resolve_path(spec.path), load_from_disk=True, text_key=spec.text_key,
                                  id_key=spec.id_key, doc_progress=progress)
    folder, pattern, recursive = _folder_and_glob(spec)
    common = dict(glob_pattern=pattern, recursive=recursive, text_key=spec.text_key, id_key=spec.id_key,
                  doc_progress=progress)
    if spec.type == "parquet":
        return BraidParquetReader(folder, **common)
    return BraidJsonlReader(folder, compression=spec.compression, **common)


def build_readers(recipe: Recipe, progress: bool) -> list[PipelineStep]:
    return [build_reader(spec, progress) for spec in recipe.inputs]


# ---------------------------------------------------------------------------- filters


class RegexWordTokenizer(WordTokenizer):
    """Words and punctuation runs by regex, for the Gopher filters and MinHash shingles.

    datatrove's English word tokenizer is spaCy's, a large dependency the pipeline does not need
    for these heuristics; the filters accept any WordTokenizer in place of a language code.
    """

    _words = re.compile(r"\w+|[^\w\s]+")
    _sentences = re.compile(r"[^.!?\n]+(?:[.!?]+|\n|$)")

    def __init__(self) -> None:
        super().__init__("regex")

    def word_tokenize(self, text: str) -> list[str]:
        return self._words.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [s.strip() for s in self._sentences.findall(text) if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in self._sentences.finditer(text) if m.group().strip()]


class LengthFilter(BaseFilter):
    """Drops documents shorter than `min_chars` or longer than `max_chars` characters."""

    name = "📏 Length"

    def __init__(self, min_chars: int = 1, max_chars: int | None = None):
        super().__init__()
        self.min_chars, self.max_chars = min_chars, max_chars

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if len(doc.text) < self.min_chars:
            return False, "too_short"
        if self.max_chars is not None and len(doc.text) > self.max_chars:
            return False, "too_long"
        return True


class PatternFilter(BaseFilter):
    """Drops documents whose text matches a regex, or whose URL (metadata[url_key]) matches one or is blocked.

    datatrove's URLFilter needs tldextract, which downloads the public-suffix list on first use;
    this one works offline from the recipe's own lists.
    """

    name = "🕵 Patterns"

    def __init__(self, text_patterns: Sequence[str] = (), url_patterns: Sequence[str] = (),
                 blocked_domains: Sequence[str] = (), url_key: str = "url"):
        super().__init__()
        self.text_res = [re.compile(p) for p in text_patterns]
        self.url_res = [re.compile(p) for p in url_patterns]
        self.blocked = {d.lower().strip(".") for d in blocked_domains}
        self.url_key = url_key

    def _domain_blocked(self, url: str) -> bool:
        host = re.sub(r"^[a-z][a-z0-9+.-]*://", "", url.lower()).split("/", 1)[0].split(":", 1)[0]
        parts = host.split(".")
        return any(".".join(parts[i:]) in self.blocked for i in range(len(parts)))

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        url = doc.metadata.get(self.url_key)
        if isinstance(url, str) and url:
            if self.blocked and self._domain_blocked(url):
                return False, "blocked_domain"
            if any(r.search(url) for r in self.url_res):
                return False, "url_pattern"
        if any(r.search(doc.text) for r in self.text_res):
            return False, "text_pattern"
        return True


def build_filters(recipe: Recipe) -> list[tuple[str, PipelineStep]]:
    """(label, step) for each enabled filter, cheapest first."""
    f = recipe.filters
    steps: list[tuple[str, PipelineStep]] = []
    if f.length.enabled:
        steps.append(("length", LengthFilter(f.length.min_chars, f.length.max_chars)))
    if f.patterns.enabled:
        p = f.patterns
        steps.append(("patterns", PatternFilter(p.text_patterns, p.url_patterns, p.blocked_domains, p.url_key)))
    if f.gopher_repetition.enabled:
        from datatrove.pipeline.filters import GopherRepetitionFilter
        g = f.gopher_repetition
        steps.append(("gopher_repetition", GopherRepetitionFilter(
            dup_line_frac=g.dup_line_frac, dup_para_frac=g.dup_para_frac, dup_line_char_frac=g.dup_line_char_frac,
            dup_para_char_frac=g.dup_para_char_frac,
            top_n_grams=tuple((int(n), float(frac)) for n, frac in g.top_n_grams),
            dup_n_grams=tuple((int(n), float(frac)) for n, frac in g.dup_n_grams),
            language=RegexWordTokenizer())))
    if f.gopher_quality.enabled:
        from datatrove.pipeline.filters import GopherQualityFilter
        g = f.gopher_quality
        steps.append(("gopher_quality", GopherQualityFilter(
            min_doc_words=g.min_doc_words, max_doc_words=g.max_doc_words,
            min_avg_word_length=g.min_avg_word_length, max_avg_word_length=g.max_avg_word_length,
            max_symbol_word_ratio=g.max_symbol_word_ratio, max_bullet_lines_ratio=g.max_bullet_lines_ratio,
            max_ellipsis_lines_ratio=g.max_ellipsis_lines_ratio,
            max_non_alpha_words_ratio=g.max_non_alpha_words_ratio, min_stop_words=g.min_stop_words,
            stop_words=g.stop_words, language=RegexWordTokenizer())))
    return steps


def dedup_content(doc: Document) -> str:
    """What exact dedup hashes (module level so the executors can pickle it)."""
    return doc.text


# ---------------------------------------------------------------------------- rows and MDS


def in_validation(text: str, fraction: float) -> bool:
    """Stable split: the same text lands in the same split on every machine, run and task count."""
    if fraction <= 0.0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2.0 ** 64


class RowPacker:
    """Concatenates documents (EOS after each) into one stream and cuts it into rows of `row_length`.

    `add` returns the completed rows and, per row, the positions where documents begin; the
    unfinished tail is kept for the next call (and dropped at the end of the task).
    """

    def __init__(self, row_length: int, eos_id: int, dtype: str):
        self.row_length, self.eos_id, self.dtype = row_length, eos_id, np.dtype(dtype)
        self.pending = np.empty(0, self.dtype)
        self._pending_starts = np.empty(0, np.int64)

    def add(self, docs: Sequence[Sequence[int]]) -> tuple[np.ndarray, list[np.ndarray]]:
        lengths = np.fromiter((len(d) + 1 for d in docs), np.int64, len(docs))
        ends = np.cumsum(lengths)
        stream = np.empty(int(ends[-1]) if len(docs) else 0, self.dtype)
        is_token = np.ones(len(stream), bool)
        is_token[ends - 1] = False
        stream[ends - 1] = self.eos_id
        # one C-level pass over all ids of the batch; no Python work per token
        stream[is_token] = np.fromiter(chain.from_iterable(docs), self.dtype, len(stream) - len(docs))

        starts = np.concatenate([self._pending_starts, len(self.pending) + ends - lengths])
        stream = np.concatenate([self.pending, stream])
        n_rows = len(stream) // self.row_length
        cut = np.searchsorted(starts, np.arange(n_rows + 1) * self.row_length)
        no_start = np.array([self.row_length], np.int32)
        row_starts = [(starts[cut[r]:cut[r + 1]] - r * self.row_length).astype(np.int32) if cut[r + 1] > cut[r]
                      else no_start for r in range(n_rows)]
        used = n_rows * self.row_length
        self.pending = stream[used:].copy()
        self._pending_starts = starts[cut[n_rows]:] - used
        return stream[:used].reshape(n_rows, self.row_length), row_starts


class MDSTokenWriter(PipelineStep):
    """Tokenizes documents in batches and writes fixed-length token rows with document starts as MDS.

    Each task writes its split folders under a temporary name and renames them when it finishes,
    so a task that died half-way leaves nothing that looks complete and is redone from scratch.
    """

    type = "💽 - WRITER"
    name = "🧱 MDS token rows"

    def __init__(self, output_dir: str, tokenizer_path: str, eos_id: int, row_length: int, token_dtype: str,
                 validation: float, size_limit: int, compression: str | None, batch_size: int = 256,
                 progress: bool = False):
        super().__init__()
        self.output_dir, self.tokenizer_path, self.eos_id = output_dir, tokenizer_path, eos_id
        self.row_length, self.token_dtype, self.validation = row_length, token_dtype, validation
        self.size_limit, self.compression, self.batch_size = size_limit, compression, batch_size
        self.progress = progress
        self.splits = SPLITS if validation > 0 else SPLITS[:1]

    def task_dir(self, split: str, rank: int, tmp: bool = False) -> str:
        name = f".task_{rank:05d}.tmp" if tmp else f"task_{rank:05d}"
        return os.path.join(self.output_dir, split, name)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self._write_task(data, rank)
        yield from ()   # the last step: consumes the documents, forwards none

    def _write_task(self, data: DocumentsPipeline, rank: int) -> None:
        from tqdm import tqdm

        from data_pipeline.mds import MDSWriter
        from data_pipeline.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(self.tokenizer_path)
        tokenizer.encode_special_tokens = True   # "<|endoftext|>" typed in a document is text, not our EOS
        columns = {"tokens": f"ndarray:{self.token_dtype}", "doc_starts": "ndarray:int32"}
        packers, writers = {}, {}
        for split in self.splits:
            tmp = self.task_dir(split, rank, tmp=True)
            shutil.rmtree(tmp, ignore_errors=True)   # leftovers of a task that died
            packers[split] = RowPacker(self.row_length, self.eos_id, self.token_dtype)
            writers[split] = MDSWriter(out=tmp, columns=columns, compression=self.compression,
                                       size_limit=self.size_limit)
        try:
            with tqdm(desc=f"task {rank} tokenize", unit="doc", disable=not self.progress, file=sys.stderr) as bar:
                for batch in batched(data, self.batch_size):
                    texts = {split: [] for split in self.splits}
                    for doc in batch:
                        texts["val" if in_validation(doc.text, self.validation) else "train"].append(doc.text)
                    for split, split_texts in texts.items():
                        if split_texts:
                            self._write(split, split_texts, tokenizer, packers[split], writers[split])
                    bar.update(len(batch))
            for split in self.splits:
                writers[split].finish()
                self.stat_update(f"{split}_dropped_tail_tokens", value=len(packers[split].pending), unit="task")
            for split in self.splits:   # publish: only now do the task's folders get their final names
                final = self.task_dir(split, rank)
                shutil.rmtree(final, ignore_errors=True)
                os.rename(self.task_dir(split, rank, tmp=True), final)
        except BaseException:
            for split in self.splits:
                shutil.rmtree(self.task_dir(split, rank, tmp=True), ignore_errors=True)
            raise

    def _write(self, split: str, texts: list[str], tokenizer, packer: RowPacker, writer) -> None:
        with self.track_time("batch"):
            # encode_batch_fast: the Rust side tokenizes the batch in parallel and skips offsets
            ids = [enc.ids for enc in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
            rows, starts = packer.add(ids)
            for row, row_starts in zip(rows, starts):
                writer.write({"tokens": row, "doc_starts": row_starts})
        self.stat_update(f"{split}_documents", value=len(texts), unit="task")
        self.stat_update(f"{split}_tokens", value=sum(len(x) + 1 for x in ids), unit="task")
        self.stat_update(f"{split}_rows", value=len(rows), unit="task")
