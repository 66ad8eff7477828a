"""Byte-level BPE tokenizers with the `tokenizers` library, trained and loaded from local files only.

datatrove's own tokenizer steps treat any string that is not an existing file as a Hugging Face hub
name and download it; Braid never goes through that path: `load_tokenizer` takes a file or fails.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
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


def _recipe_texts(recipe: Recipe, limit: int | None, counter: list[int]) -> Iterator[str]:
    # the recipe's own readers (same formats, same malformed-line handling as `prepare`), all inputs in order
    from data_pipeline.pipeline import build_readers
    for reader in build_readers(recipe, progress=False):
        for doc in reader.run(None, rank=0, world_size=1):
            if limit is not None and counter[0] >= limit:
                return
            counter[0] += 1
            yield doc.text


def train_from_recipe(recipe: Recipe) -> dict:
    """`braid data tokenizer`: train on the recipe's inputs and write tokenizer.json (atomically)."""
    from data_pipeline.corpus import ensure_corpus
    from data_pipeline.pipeline import check_inputs

    spec = recipe.tokenizer
    if spec.vocab_size is None:
        raise ValueError("recipe.tokenizer.vocab_size: required to train a tokenizer")
    specials = list(dict.fromkeys([spec.eos_token, spec.pad_token, *spec.extra_special_tokens]))
    ensure_corpus(recipe)
    check_inputs(recipe)
    start, counter = time.perf_counter(), [0]
    tok = train_bpe(_recipe_texts(recipe, spec.max_documents, counter), spec.vocab_size, specials,
                    spec.min_frequency, show_progress=sys.stderr.isatty())
    if counter[0] == 0:
        raise ValueError("no documents to train the tokenizer on: the recipe's inputs are empty")
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != spec.vocab_size:
        print(f"braid: warning: the corpus only supports {got} tokens, not {spec.vocab_size}", file=sys.stderr)
    path = resolve_path(spec.path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, path)
    return {"path": path, "vocab_size": got, "documents": counter[0], "special_tokens": specials,
            "sha256": file_sha256(path), "time_s": round(time.perf_counter() - start, 2)}
