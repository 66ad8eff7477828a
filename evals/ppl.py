"""`ppl` suite: perplexity against position, far past the training length.

Why: a hybrid's recurrent and window layers should let it read past its training length
with a flat (or falling) per-token loss, where a full-attention model degrades. We score
long windows of held-out text chunk by chunk through one `HybridCache` (recurrent state
and window KV carried across chunks, exactly as generation would), so memory stays
bounded, and average the NLL of each predicted token by its position in log2 buckets.

    python -m ... eval ppl --length 16384 --chunk 1024 --samples 4 --text held_out.txt

Position of a token = how many tokens precede it in its window (1 .. length-1); bucket
[2^k, 2^(k+1)). Windows are document-bounded: each lies inside one document (--text is one
document; an MDS split's documents are read back from its rows' `doc_starts`), so a token's
position is really that much context of its own text. Windows start at the beginning of
distinct documents at least `length` tokens long, drawn by the seed; when fewer documents
are that long, further non-overlapping windows of the long ones are taken (starting at
length, 2*length ... into the document). Position past the training length therefore needs
documents longer than it (experiments/configs/stdlib_modules.yaml builds such a split).
--cross-documents cuts the windows from the documents' concatenated stream instead, EOS
tokens between them and no boundary given to the model (the behaviour before windows were
document-bounded).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .common import EvalModel, write_results, with_defaults

SUITE = "ppl"
SMOKE: dict[str, Any] = {"length": 96, "chunk": 24, "samples": 2, "batch_size": 2}

DEFAULTS: dict[str, Any] = {"length": 16384, "chunk": 1024, "samples": 4, "text": None, "data": None,
                            "seed": 0, "batch_size": 1, "cross_documents": False, "progress": True}
# documents found before an MDS split stops being read (windows are drawn among them)
ENOUGH_DOCUMENTS_PER_SAMPLE = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The suite's options (dest names are run()'s keyword arguments)."""
    parser.add_argument("--length", type=int, default=DEFAULTS["length"],
                        help="tokens per scored window (can be many times the training length)")
    parser.add_argument("--chunk", type=int, default=DEFAULTS["chunk"],
                        help="tokens per forward; state is carried through the cache between chunks")
    parser.add_argument("--samples", type=int, default=DEFAULTS["samples"], help="number of windows scored")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="windows per forward")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", default=None, help="plain text file of held-out text")
    source.add_argument("--data", default=None, help="MDS split folder (e.g. data/tiny/val) of held-out rows")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="which windows are drawn")
    parser.add_argument("--cross-documents", action="store_true",
                        help="cut windows from the concatenated token stream, across document boundaries "
                             "(default: each window inside one document)")


# ---- NLL ---------------------------------------------------------------------------------------

def _nll(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


@torch.inference_mode()
def full_nll(model: torch.nn.Module, ids: Tensor) -> Tensor:
    """Per-token NLL (B, L-1) of ids (B, L) from one parallel forward: the reference for chunked_nll."""
    return _nll(model(ids[:, :-1]), ids[:, 1:])


@torch.inference_mode()
def chunked_nll(model: torch.nn.Module, ids: Tensor, chunk: int, progress: Any = None) -> Tensor:
    """Per-token NLL (B, L-1) of ids (B, L), fed `chunk` tokens at a time through one cache.

    Token t+1 is predicted from the logits at t; chunks carry recurrent and window state,
    so this equals full_nll up to float rounding, in memory bounded by the chunk (plus the
    KV of any full-attention layer).
    """
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: must be >= 1")
    cache = model.new_cache()
    inputs, targets = ids[:, :-1], ids[:, 1:]
    out = []
    for start in range(0, inputs.shape[1], chunk):
        logits = model(inputs[:, start:start + chunk], cache=cache)
        out.append(_nll(logits, targets[:, start:start + chunk]))
        if progress is not None:
            progress.update(1)
    return torch.cat(out, dim=1)


def bucket_edges(length: int) -> list[tuple[int, int]]:
    """log2 position buckets [1,2), [2,4), ... covering positions 1 .. length-1 (last one clipped)."""
    edges, start = [], 1
    while start < length:
        edges.append((start, min(2 * start, length)))
        start *= 2
    return edges


def bucket_scores(nll: Tensor, train_length: int | None) -> dict[str, Any]:
    """nll (N, L-1), column j = position j+1 -> per-bucket mean NLL and ppl, and two summaries.

    nll_at_train_length: mean NLL at positions [train_length/2, train_length), the last
    octave inside the training length; nll_beyond: positions >= train_length (None when
    the windows do not reach that far or the training length is unknown).
    """
    nll = nll.double()
    length = nll.shape[1] + 1
    buckets = []
    for start, end in bucket_edges(length):
        part = nll[:, start - 1:end - 1]
        mean = part.mean().item()
        buckets.append({"start": start, "end": end, "nll": mean, "ppl": math.exp(mean), "tokens": part.numel()})

    def mean_over(lo: int, hi: int) -> float | None:
        lo, hi = max(lo, 1), min(hi, length)
        return nll[:, lo - 1:hi - 1].mean().item() if hi > lo else None

    at = beyond = None
    if train_length:
        at = mean_over(max(train_length // 2, 1), train_length)
        beyond = mean_over(train_length, length)
    return {"buckets": buckets, "nll_at_train_length": at, "nll_beyond": beyond,
            "nll_mean": nll.mean().item(), "ppl_mean": math.exp(nll.mean().item())}


# ---- text sources ----------------------------------------------------------------------------

def mds_rows(folder: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, doc_starts inside the row) of an MDS split's rows in order, via data_pipeline's reader."""
    from data_pipeline.mds import StreamingDataset, hold_shared_memory
    from data_pipeline.streaming import StreamSource, _make_streams, _streaming_setup

    if not os.path.isfile(os.path.join(folder, "index.json")):
        raise ValueError(f"data={folder!r}: no MDS split there (index.json missing)")
    with _streaming_setup():
        dataset = StreamingDataset(streams=_make_streams([StreamSource(path=folder)], verify_hashes=False),
                                   batch_size=1, shuffle=False)
        hold_shared_memory(dataset)
    for i in range(dataset.num_samples):
        sample = dataset[i]
        row = np.asarray(sample["tokens"], dtype=np.int64)
        starts = np.asarray(sample.get("doc_starts", np.zeros(0)), dtype=np.int64)
        yield row, starts[starts < len(row)]


def mds_tokens(folder: str, max_tokens: int) -> np.ndarray:
    """The first max_tokens tokens of an MDS split (rows in order, concatenated)."""
    return mds_documents(folder, stop=lambda tokens, lengths: tokens >= max_tokens)[0]


def mds_documents(folder: str, stop: Callable[[int, list[int]], bool]) -> tuple[np.ndarray, np.ndarray]:
    """(token stream, start offset of each document in it) of an MDS split, rows read in order until
    stop(tokens read, lengths of the documents completed so far) or the split ends.

    A task's rows are one continuous stream, and the first row of each task starts a document, so
    the rows' `doc_starts` give the documents back (the last one of a task lacks the tail the
    pipeline dropped; the last one read may be cut where reading stopped).
    """
    rows, starts, lengths, total = [], [0], [], 0
    for row, row_starts in mds_rows(folder):
        for start in (row_starts + total).tolist():
            if start > starts[-1]:
                lengths.append(start - starts[-1])
                starts.append(start)
        rows.append(row)
        total += len(row)
        if stop(total, lengths):
            break
    stream = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return stream, np.asarray(starts if total else [], dtype=np.int64)


def run_val_split(lm: EvalModel) -> str | None:
    """The run's validation split (config.yaml data.val) when the model came from a training run."""
    import yaml

    model_path = lm.provenance.get("model")
    if not model_path or lm.provenance.get("kind") != "checkpoint":
        return None
    candidates = [model_path, os.path.dirname(model_path), os.path.dirname(os.path.dirname(model_path))]
    for run_dir in candidates:
        config = os.path.join(run_dir, "config.yaml")
        if os.path.isfile(config):
            with open(config) as f:
                val = ((yaml.safe_load(f) or {}).get("data") or {}).get("val")
            val = val[0] if isinstance(val, list) and val else val
            val = val.get("path") if isinstance(val, dict) else val
            return val if isinstance(val, str) and os.path.isdir(val) else None
    return None


def load_stream(lm: EvalModel, text: str | None, data: str | None, length: int, samples: int,
                cross_documents: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """(token stream, document start offsets in it, description of the source)."""
    if text is not None:
        if not os.path.isfile(text):
            raise ValueError(f"text={text!r}: no such file")
        with open(text, encoding="utf-8") as f:
            stream = np.asarray(lm.encode(f.read()), dtype=np.int64)
        return stream, np.zeros(1, np.int64), f"text:{os.path.abspath(text)}"
    if data is None:
        data = run_val_split(lm)
        if data is None:
            raise ValueError("text: required (--text FILE or --data DIR); the run's validation split "
                             "could not be located from the model's run config")
    if not os.path.isdir(data):
        raise ValueError(f"data={data!r}: no such folder")
    if cross_documents:
        stop = lambda tokens, lengths: tokens >= length * samples                          # noqa: E731
    else:       # enough long documents to draw from (or the whole split)
        stop = lambda tokens, lengths: sum(n >= length for n in lengths) >= ENOUGH_DOCUMENTS_PER_SAMPLE * samples  # noqa: E731,E501
    stream, starts = mds_documents(data, stop)
    return stream, starts, f"mds:{os.path.abspath(data)}"


def window_starts(stream_length: int, doc_starts: np.ndarray, length: int, samples: int, seed: int,
                  cross_documents: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """Start offsets of `samples` windows of `length` tokens, and facts about the draw for results.json.

    Document-bounded (the default): every window lies inside one document. Windows at document starts
    come first (distinct documents drawn by the seed); only when fewer documents are long enough do
    windows further into long documents (at length, 2*length, ... from their start) fill the rest.
    cross_documents: distinct non-overlapping slots of the whole stream, as before windows were bounded.
    """
    rng = np.random.default_rng(seed)
    if stream_length < length:
        raise ValueError(f"length={length}: the text has only {stream_length} tokens")
    if cross_documents:
        slots = stream_length // length
        if slots >= samples:
            starts = np.sort(rng.choice(slots, samples, replace=False)) * length
        else:
            starts = np.sort(rng.integers(0, stream_length - length + 1, samples))
        return starts, {"windows": "stream (across document boundaries)"}
    ends = np.append(doc_starts[1:], stream_length)
    sizes = ends - doc_starts
    long_enough = sizes >= length
    by_depth: list[np.ndarray] = []           # by_depth[k]: window starts k*length into a long document
    k = 0
    while True:
        fits = sizes >= (k + 1) * length
        if not fits.any():
            break
        by_depth.append(doc_starts[fits] + k * length)
        k += 1
    available = sum(len(d) for d in by_depth)
    if available < samples:
        raise ValueError(f"length={length}: only {available} window(s) of {length} tokens fit inside the "
                         f"documents read ({len(sizes)} documents, the longest {int(sizes.max(initial=0))} tokens); "
                         f"lower --length or --samples, point --data at a split of long documents, or pass "
                         f"--cross-documents")
    chosen: list[int] = []
    for depth in by_depth:
        need = samples - len(chosen)
        if need <= 0:
            break
        picked = depth if len(depth) <= need else rng.choice(depth, need, replace=False)
        chosen += picked.tolist()
    starts = np.sort(np.asarray(chosen, dtype=np.int64))
    return starts, {"windows": "document-bounded (each window inside one document)",
                    "documents_read": int(len(sizes)), "documents_long_enough": int(long_enough.sum()),
                    "windows_at_document_start": int(np.isin(starts, doc_starts).sum())}


def draw_windows(stream: np.ndarray, starts: np.ndarray, length: int) -> Tensor:
    return torch.from_numpy(np.stack([stream[s:s + length] for s in starts]))


# ---- the suite ---------------------------------------------------------------------------------

def _check(options: dict[str, Any]) -> None:
    for name in ("length", "chunk", "samples", "batch_size"):
        value = options[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a positive integer")
    if options["length"] < 2:
        raise ValueError(f"length={options['length']}: must be >= 2 (one context token and one target)")
    if options["text"] is not None and options["data"] is not None:
        raise ValueError("text/data: give one of --text and --data, not both")


def plot(scores: dict[str, Any], train_length: int | None, path: str, title: str) -> None:
    """ppl against position (log2 x axis, bucket centres), training length marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = scores["buckets"]
    x = [math.sqrt(b["start"] * max(b["end"] - 1, b["start"])) for b in buckets]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, [b["ppl"] for b in buckets], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    if train_length:
        ax.axvline(train_length, color="red", linestyle="--", label=f"training length {train_length}")
        ax.legend()
    ax.set_xlabel("position (tokens of context)")
    ax.set_ylabel("perplexity (bucket mean)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(lm: EvalModel, out_dir: str, **options: Any) -> dict:
    """Score the windows, write out_dir/results.json and out_dir/ppl.png, return the record."""
    options = with_defaults(SUITE, options, DEFAULTS)
    _check(options)
    length, chunk, samples, batch_size = (options[k] for k in ("length", "chunk", "samples", "batch_size"))
    cross = bool(options["cross_documents"])
    stream, doc_starts, source = load_stream(lm, options["text"], options["data"], length, samples, cross)
    starts, drawn = window_starts(len(stream), doc_starts, length, samples, options["seed"], cross)
    windows = draw_windows(stream, starts, length)
    device = next(lm.model.parameters()).device

    from tqdm import tqdm
    n_batches = math.ceil(samples / batch_size)
    bar = tqdm(total=n_batches * math.ceil((length - 1) / chunk), desc="ppl chunks", unit="chunk",
               disable=not options["progress"])
    nll = torch.cat([chunked_nll(lm.model, windows[i:i + batch_size].to(device), chunk, bar).cpu()
                     for i in range(0, samples, batch_size)])
    bar.close()

    scores = bucket_scores(nll, lm.train_length)
    settings = {"length": length, "chunk": chunk, "samples": samples, "batch_size": batch_size,
                "seed": options["seed"], "source": source, "stream_tokens": int(len(stream)),
                "train_length": lm.train_length, **drawn, "window_starts": starts.tolist(),
                "position": "tokens before the predicted token in its window; buckets [2^k, 2^(k+1))",
                "nll_at_train_length": "mean NLL over positions [train_length/2, train_length)",
                "nll_beyond": "mean NLL over positions >= train_length"}
    path = write_results(out_dir, SUITE, scores, settings, lm)
    plot(scores, lm.train_length, os.path.join(out_dir, "ppl.png"),
         f"ppl vs position ({lm.provenance.get('pattern', lm.cfg.pattern)}, {samples}x{length} tokens)")
    with open(path) as f:
        return json.load(f)
