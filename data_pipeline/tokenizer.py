"""Byte-level BPE tokenizers with the `tokenizers` library, trained and loaded from local files only.

datatrove's own tokenizer steps treat any string that is not an existing file as a Hugging Face hub
name and download it; Braid never goes through that path: `load_tokenizer` takes a file or fails.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from data_pipeline.recipe import Recipe, TokenizerSpec, resolve_path


@dataclass(frozen=True)
class TokenizerInfo:
    """What the shards and the loader need to know about the tokenizer."""
    path: str
    sha256: str
    vocab_size: int
    eos_id: int
    pad_id: int

    @property
    def token_dtype(self) -> str:
        # contract with the loader: uint16 while every id fits, else uint32
        return "uint16" if self.vocab_size <= 65535 else "uint32"


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_recorded_tokenizer(path: str, recorded_sha256: str | None, info_path: str | None) -> None:
    """The tokenizer file named for a dataset must be the one its shards were made with: a file retrained
    or replaced in place since then (another sha256 than braid_data.json recorded) is a one-line error."""
    if not recorded_sha256:
        return
    actual = file_sha256(path)
    if actual != recorded_sha256:
        raise ValueError(f"tokenizer {path} has sha256 {actual[:16]}..., but {info_path} records "
                         f"{recorded_sha256[:16]}... for the tokenizer the shards were made with (the file was "
                         "retrained or replaced since); pass --tokenizer with the original file")


def load_tokenizer(path: str) -> Tokenizer:
    """A `Tokenizer` from a local tokenizer.json; a missing file is a FileNotFoundError, never a hub lookup."""
    path = resolve_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path} (train one with `braid data tokenizer RECIPE.yaml`)")
    try:
        return Tokenizer.from_file(path)
    except Exception as err:  # the Rust side raises a plain Exception for a corrupt file
        raise ValueError(f"{path}: not a valid tokenizer.json ({err})") from None


def tokenizer_info(spec: TokenizerSpec) -> TokenizerInfo:
    """Load the recipe's tokenizer and check its special tokens (and vocab size, when the recipe gives one)."""
    tok = load_tokenizer(spec.path)
    ids = {}
    for key in ("eos_token", "pad_token"):
        token = getattr(spec, key)
        ids[key] = tok.token_to_id(token)
        if ids[key] is None:
            raise ValueError(f"recipe.tokenizer.{key}: {token!r} is not a token of {resolve_path(spec.path)}")
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    if spec.vocab_size is not None and spec.vocab_size != vocab_size:
        raise ValueError(f"recipe.tokenizer.vocab_size is {spec.vocab_size} but {resolve_path(spec.path)} has "
                         f"{vocab_size} tokens (retrain it with `braid data tokenizer` or fix the recipe)")
    path = resolve_path(spec.path)
    return TokenizerInfo(path=path, sha256=file_sha256(path), vocab_size=vocab_size,
                         eos_id=ids["eos_token"], pad_id=ids["pad_token"])


def new_byte_level_bpe() -> Tokenizer:
    """An untrained byte-level BPE: no normalizer and no unknown token, so decode(encode(text)) == text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str], min_frequency: int = 2,
              show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (special tokens included, with the first ids)."""
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the 256 byte tokens plus "
                         f"{len(special_tokens)} special tokens")
    tok = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _recipe_texts(recipe: Recipe, readers: list, limit: int | None, counts: Counter) -> Iterator[str]:
    """The texts `braid data prepare` would tokenize into the training split, in input order: the recipe's
    readers (same formats, same malformed-line handling), its filters, exact dedup (the first copy of a text
    kept), and the validation documents held out. A `minhash` recipe is deduplicated exactly here: its
    near-duplicate clusters need the whole corpus's signatures first."""
    from data_pipeline.pipeline import build_filters, in_validation
    filters = [step for _, step in build_filters(recipe)]
    dedup = recipe.dedup.method != "none"
    seen: set[bytes] = set()
    for reader in readers:
        docs = _counted(reader.run(None, rank=0, world_size=1), counts, "read")
        for step in filters:
            docs = step.run(docs, rank=0, world_size=1)
        for doc in _counted(docs, counts, "kept"):
            if dedup:
                key = hashlib.blake2b(doc.text.encode("utf-8"), digest_size=16).digest()
                if key in seen:
                    counts["duplicates"] += 1
                    continue
                seen.add(key)
            if in_validation(doc.text, recipe.validation):
                counts["held_out"] += 1
                continue
            if limit is not None and counts["documents"] >= limit:
                return
            counts["documents"] += 1
            yield doc.text


def _counted(docs: Iterable, counts: Counter, key: str) -> Iterator:
    for doc in docs:
        counts[key] += 1
        yield doc


def train_from_recipe(recipe: Recipe) -> dict:
    """`braid data tokenizer`: train on the documents the recipe keeps (after its filters and dedup, the
    validation split held out) and write tokenizer.json (atomically)."""
    from data_pipeline.corpus import ensure_corpus
    from data_pipeline.pipeline import build_readers, check_inputs, check_text_key

    spec = recipe.tokenizer
    if spec.vocab_size is None:
        raise ValueError("recipe.tokenizer.vocab_size: required to train a tokenizer")
    specials = list(dict.fromkeys([spec.eos_token, spec.pad_token, *spec.extra_special_tokens]))
    ensure_corpus(recipe)
    check_inputs(recipe)
    start, counts = time.perf_counter(), Counter()
    readers = build_readers(recipe, progress=False)                # their stats explain an empty result
    tok = train_bpe(_recipe_texts(recipe, readers, spec.max_documents, counts), spec.vocab_size, specials,
                    spec.min_frequency, show_progress=sys.stderr.isatty())
    if counts["documents"] == 0:
        check_text_key(recipe, {f"input{i}": {k: v.total for k, v in reader.stats.stats.items()}
                                for i, reader in enumerate(readers)})
        raise ValueError(f"no documents to train the tokenizer on: {counts['read']:,} read, {counts['kept']:,} kept "
                         f"by the filters, {counts['duplicates']:,} duplicates, {counts['held_out']:,} held out for "
                         "validation")
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != spec.vocab_size:
        print(f"braid: warning: the corpus only supports {got} tokens, not {spec.vocab_size}", file=sys.stderr)
    path = resolve_path(spec.path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, path)
    return {"path": path, "vocab_size": got, "documents": counts["documents"], "read": counts["read"],
            "filtered": counts["read"] - counts["kept"], "duplicates": counts["duplicates"],
            "held_out": counts["held_out"], "special_tokens": specials, "sha256": file_sha256(path),
            "time_s": round(time.perf_counter() - start, 2)}
