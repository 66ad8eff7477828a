"""Training and validation batches streamed from MDS token rows (mosaicml-streaming).

Shard format (written by the prepare side, see data_pipeline/pipeline.py): each MDS sample
is one row of a token stream, `tokens` (row_length,) uint16/uint32 and `doc_starts` (n,)
int32, the sorted positions in the row where a document begins (a row that starts
mid-document does not list 0; one where none begins lists row_length). A task's consecutive
rows continue each other.

Batches are dicts of LongTensors, all (B, seq_len):
    input_ids  row[:-1]
    labels     row[1:]          (IGNORE_INDEX where a validation slot is padding)
    doc_ids    document index of each input token within its row: 0 for the document the
               row starts in, +1 at each document start; the model resets state where it changes.

Training (`build_train_loader`): one or more streams mixed by proportion, shuffled from a
seed, partitioned over data-parallel ranks and DataLoader workers, resumable mid-epoch.

Resumption, on the same or another number of ranks. With a fixed `num_canonical_nodes`,
streaming's epoch is one global sample order G that depends only on the streams, seed and
epoch. We hand streaming the data-parallel layout as a single node of `dp_world_size`
ranks (`_RowDataset`), so its partition deals G round-robin: at every step the DP ranks
together take the next B * dp_world_size samples of G (rank r the ones at r, r + R, ...).
After k steps exactly G[:k * B * R] has been seen, whatever R was. The loader state is that
count of global samples (streaming's `sample_in_epoch`); a resumed run gives it back to
streaming, which drops that prefix of G and deals the rest over the new ranks: exactly the
samples not yet seen, none twice. `tests/test_data_streaming.py` checks 2 -> 2, 2 -> 1, 1 -> 2.
Caveats inherent to streaming's epoch: an epoch of E samples holds
num_canonical_nodes * ceil(E / num_canonical_nodes) slots (the extra ones repeat samples),
and its tail is padded with repeats so that every rank gets as many samples as the others.

Validation (`build_val_loader`): one stream read in order, unshuffled and finite; a sample
is k consecutive rows joined (validation at k times the training length), the ranks get
contiguous blocks, padded to equal length with slots whose labels are all IGNORE_INDEX.
"""
from __future__ import annotations

import json
import math
import os
import socket
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset

from data_pipeline.mds import (Stream, StreamingDataset, World, clean_stale_shared_memory, get_hash,
                               get_index_basename, hold_shared_memory)

IGNORE_INDEX = -100          # labels that carry no loss (torch cross_entropy's default ignore_index)
Batch = dict[str, torch.Tensor]
# Hash algorithms in the order we prefer them for validation, fastest first.
_HASH_PREFERENCE = ("xxh3_64", "xxh64", "xxh128", "xxh3_128", "xxh32", "md5", "sha1", "sha256")
_STATE_VERSION = 1
_SETUP_LOCK = os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(),
                           "braid_streaming_setup.lock")


@dataclass
class StreamSource:
    """One MDS dataset: a local folder read in place (`path`), or a `remote` folder/URL whose
    shards are copied into the local cache `local` on first use. `proportion` weighs it in a
    mixture (relative; all streams of a mixture give one, or none does)."""

    path: str | None = None
    remote: str | None = None
    local: str | None = None
    proportion: float | None = None

    def __post_init__(self) -> None:
        self.path, self.remote, self.local = (None if p is None else os.fspath(p)
                                              for p in (self.path, self.remote, self.local))
        if bool(self.path) == bool(self.remote or self.local):
            raise ValueError(f"a stream is either `path` or a (`remote`, `local`) pair, got {self}")
        if self.remote and not self.local:
            raise ValueError(f"stream with remote {self.remote!r} needs a `local` cache folder")
        if self.local and not self.remote:
            raise ValueError(f"stream with local {self.local!r} needs a `remote` (or give `path`)")
        if self.proportion is not None:
            proportion = float(self.proportion)
            if not math.isfinite(proportion) or proportion < 0:
                raise ValueError(f"stream {self.name}: proportion must be a finite number >= 0, "
                                 f"got {self.proportion!r}")
            self.proportion = proportion

    @classmethod
    def parse(cls, spec: str | os.PathLike | dict | StreamSource) -> StreamSource:
        """A source from a path, a config dict or a StreamSource."""
        if isinstance(spec, StreamSource):
            return spec
        if isinstance(spec, (str, os.PathLike)):
            return cls(path=os.fspath(spec))
        return cls(**spec)

    @property
    def name(self) -> str:
        return self.path or f"{self.remote} -> {self.local}"

    @property
    def local_dir(self) -> str:
        """Where streaming reads shards from."""
        return self.path or self.local     # type: ignore[return-value]

    @property
    def remote_folder(self) -> str | None:
        """The remote when it is a folder on this machine (not a URL): we can check it."""
        return self.remote if self.remote and "://" not in self.remote else None


@dataclass
class LoaderConfig:
    """A training mixture and how to batch it.

    streams: StreamSources (or paths / dicts); seq_len: tokens per training sequence (rows
    hold seq_len + 1); batch_size: sequences per data-parallel rank per step; seed: shuffle
    and mixture seed; num_canonical_nodes: fixed so that the global order does not depend on
    the number of ranks (see the module docstring); epoch_size: samples per epoch when
    mixing (default: all samples of all streams); predownload: samples prepared ahead
    (default about 4M tokens' worth, see `_predownload`); verify_hashes: hash every local
    shard at start (sizes are always checked; downloads are hash-checked whenever the index
    has hashes). An epoch is exactly one pass over E samples when num_canonical_nodes and
    the global batch divide E (see the module docstring for the caveats otherwise).
    """

    streams: list[StreamSource]
    seq_len: int
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = True
    num_workers: int = 0
    num_canonical_nodes: int = 64
    epoch_size: int | None = None
    shuffle_algo: str = "py1e"
    shuffle_block_size: int | None = None
    predownload: int | None = None
    cache_limit: int | str | None = None
    download_timeout: float = 60.0
    verify_hashes: bool = False

    def __post_init__(self) -> None:
        self.streams = [StreamSource.parse(s) for s in self.streams]
        if not self.streams:
            raise ValueError("LoaderConfig needs at least one stream")
        if self.seq_len < 1 or self.batch_size < 1 or self.num_workers < 0:
            raise ValueError(f"need seq_len >= 1, batch_size >= 1, num_workers >= 0; got "
                             f"{self.seq_len}, {self.batch_size}, {self.num_workers}")
        given = [s.proportion is not None for s in self.streams]
        if any(given) and not all(given):
            missing = [s.name for s in self.streams if s.proportion is None]
            raise ValueError(f"either every stream of a mixture gives a proportion or none does; "
                             f"missing for {missing}")
        if all(given) and sum(s.proportion for s in self.streams) <= 0:   # type: ignore[misc]
            raise ValueError("stream proportions sum to 0; at least one must be positive")


# ---------------------------------------------------------------------------------------------
# Batches


def make_batch(tokens: np.ndarray, doc_starts: Sequence[np.ndarray],
               valid: np.ndarray | None = None) -> Batch:
    """Token rows (B, L + 1) and each row's document starts -> the batch dict, (B, L) each.

    `valid` (B,) bool: rows that are False are padding; their labels are all IGNORE_INDEX.
    """
    rows = torch.from_numpy(tokens.astype(np.int64, copy=False))
    batch, length = rows.shape[0], rows.shape[1] - 1
    # doc_ids = number of document starts at or before each input position, not counting 0
    marks = np.zeros((batch, length), np.int64)
    for i, starts in enumerate(doc_starts):
        starts = starts[(starts > 0) & (starts < length)]
        marks[i, starts] = 1
    labels = rows[:, 1:].clone()
    if valid is not None and not valid.all():
        labels[torch.from_numpy(~valid)] = IGNORE_INDEX
    return {"input_ids": rows[:, :-1].clone(), "labels": labels,
            "doc_ids": torch.from_numpy(marks.cumsum(1))}


def _row(sample: dict[str, Any], length: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, doc_starts) of one sample, checked against the expected number of tokens.

    MDS cannot store an empty array, so a row where no document begins lists `length`
    (past its end): starts >= length are dropped.
    """
    tokens, starts = sample["tokens"], np.asarray(sample["doc_starts"], np.int64)
    if tokens.shape != (length,):
        raise ValueError(f"row of {tokens.shape[0]} tokens where {length} were expected")
    if starts.size and starts.min() < 0:
        raise ValueError(f"negative doc_starts {starts.tolist()}")
    return tokens, starts[starts < length]


def _collate(samples: list[dict[str, Any]], length: int) -> Batch:
    """Samples with `tokens` (length,), `doc_starts` and optionally `pad` -> a batch."""
    rows = [_row(s, length) for s in samples]
    valid = np.array([not s.get("pad", False) for s in samples])
    return make_batch(np.stack([r[0] for r in rows]), [r[1] for r in rows], valid)


# ---------------------------------------------------------------------------------------------
# Ranks, shared memory and shard checks


def _dp_coordinates(dp_rank: int | None, dp_world_size: int | None) -> tuple[int, int]:
    """(rank, world) of data parallelism: explicit, else torch.distributed's, else (0, 1)."""
    if (dp_rank is None) != (dp_world_size is None):
        raise ValueError("give both dp_rank and dp_world_size, or neither")
    if dp_rank is None:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if not 0 <= dp_rank < dp_world_size:   # type: ignore[operator]
        raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_world_size {dp_world_size})")
    return dp_rank, dp_world_size           # type: ignore[return-value]


def _check_launch_env() -> None:
    """Make streaming's view of the processes (it reads RANK, WORLD_SIZE, LOCAL_RANK and
    LOCAL_WORLD_SIZE) match torch.distributed; fill them in when a launcher did not.

    streaming coordinates the processes of one machine through shared memory led by local
    rank 0; a wrong LOCAL_WORLD_SIZE makes several "leaders" collide.
    """
    initialized = dist.is_available() and dist.is_initialized()
    if not initialized:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but torch.distributed is not "
                               "initialized; call dist.init_process_group before building loaders")
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    for var, value in (("RANK", rank), ("WORLD_SIZE", world)):
        if var in os.environ and int(os.environ[var]) != value:
            raise RuntimeError(f"environment {var}={os.environ[var]} but torch.distributed says {value}")
    if not all(v in os.environ for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")):
        hosts: list[str] = [""] * world
        dist.all_gather_object(hosts, socket.gethostname())
        me = hosts[rank]
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(hosts[:rank].count(me)), LOCAL_WORLD_SIZE=str(hosts.count(me)))


@contextmanager
def _streaming_setup() -> Iterator[None]:
    """Around StreamingDataset construction: one job at a time per machine, stale shared
    memory cleaned first; construct inside, then `hold_shared_memory(dataset)`.

    streaming picks its shared-memory prefix by scanning /dev/shm for a free one and then
    creating it; two jobs constructing at the same moment on one machine can pick the same
    prefix. Local rank 0 of each job holds a machine-wide file lock while its job constructs
    (the other local ranks wait for it at a barrier, so they scan only under that lock). The
    lock lives in /dev/shm, not in TMPDIR, which schedulers often make private to each job.
    """
    _check_launch_env()
    leader = int(os.environ.get("LOCAL_RANK", "0")) == 0
    lock = FileLock(_SETUP_LOCK) if leader else None
    if lock is not None:
        lock.acquire()
    try:
        if lock is not None:
            clean_stale_shared_memory()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        yield
    finally:
        if lock is not None:
            lock.release()


def _read_index(source: StreamSource) -> dict[str, Any]:
    """The stream's index.json: from the local folder, else from a remote that is a folder."""
    folders = [source.local_dir] + ([source.remote_folder] if source.remote_folder else [])
    for folder in folders:
        if os.path.isfile(os.path.join(folder, get_index_basename())):
            with open(os.path.join(folder, get_index_basename())) as f:
                return json.load(f)
    if source.remote and not source.remote_folder:
        return {}            # a URL: streaming downloads (and checks) the index itself
    where = folders[-1]
    what = "folder does not exist" if not os.path.isdir(where) else \
        f"{os.path.join(where, get_index_basename())} does not exist"
    raise FileNotFoundError(f"no MDS dataset at {where}: {what}")


def _hash_algo(index: dict[str, Any]) -> str | None:
    """The fastest hash algorithm that every shard of the index records, if any."""
    files = [info for shard in index.get("shards", [])
             for info in (shard.get("raw_data"), shard.get("zip_data")) if info]
    common = set.intersection(*(set(f.get("hashes") or {}) for f in files)) if files else set()
    return next((algo for algo in _HASH_PREFERENCE if algo in common), None)


def _check_shards(source: StreamSource, index: dict[str, Any], verify_hashes: bool) -> None:
    """Every shard file that is present has the size (and, if asked, hash) index.json records.

    streaming itself checks hashes only of files it downloads, and sizes never; a truncated
    or corrupt local shard would otherwise fail deep inside a DataLoader worker, or not at all.
    """
    algo = _hash_algo(index) if verify_hashes else None
    folders = [source.local_dir] + ([source.remote_folder] if source.remote_folder else [])
    for shard in index.get("shards", []):
        present = False
        for info in (shard.get("raw_data"), shard.get("zip_data")):
            if not info:
                continue
            for folder in folders:
                filename = os.path.join(folder, info["basename"])
                if not os.path.isfile(filename):
                    continue
                present = True
                size = os.path.getsize(filename)
                if size != info["bytes"]:
                    raise ValueError(f"shard {filename} is corrupt: {size} bytes, index.json records {info['bytes']}")
                if algo is not None:
                    with open(filename, "rb") as f:
                        digest = get_hash(algo, f.read())
                    if digest != info["hashes"][algo]:
                        raise ValueError(f"shard {filename} fails its {algo} hash check "
                                         f"(index.json records {info['hashes'][algo]}, file has {digest})")
        if not present and not (source.remote and not source.remote_folder):
            raw = shard["raw_data"]["basename"]
            raise FileNotFoundError(f"shard {os.path.join(folders[-1], raw)} listed in index.json is missing")


def _make_streams(sources: Sequence[StreamSource], verify_hashes: bool) -> list[Stream]:
    streams = []
    for source in sources:
        index = _read_index(source)
        _check_shards(source, index, verify_hashes)
        weight = {} if source.proportion is None else {"proportion": source.proportion}
        streams.append(Stream(remote=source.remote, local=source.local_dir,
                              validate_hash=_hash_algo(index), **weight))
    return streams


# ---------------------------------------------------------------------------------------------
# Training


class _RowDataset(StreamingDataset):
    """StreamingDataset whose samples are dealt over explicit data-parallel ranks.

    streaming keeps two views of the processes: `_unique_rank_world` (the real processes,
    from the environment: who leads shared memory and downloads on each machine) and
    `_parallel_rank_world` (who iterates which samples; streaming's own `replication`
    setting rewrites it too). We set the latter to one node of `dp_world_size` ranks, so
    tensor/pipeline-parallel peers (same dp_rank) read the same samples, and the partition
    is streaming's single-node one whatever the number of machines: G dealt round-robin.
    """

    def __init__(self, *, dp_rank: int, dp_world_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._parallel_rank_world = World(num_nodes=1, ranks_per_node=dp_world_size,
                                          workers_per_rank=1, worker=dp_rank)
        self.length = math.ceil(self.epoch_size / dp_world_size)
        self._thread_error: BaseException | None = None

    def on_exception(self, future: Any) -> None:
        # streaming's download threads report a failure (e.g. a checksum) by setting an event,
        # on which the sample loop just stops: the epoch would end early without an error.
        self._thread_error = self._thread_error or future.exception()
        super().on_exception(future)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            yield from super().__iter__()
        except RuntimeError:          # streaming's "Background thread failed", without the cause
            if self._thread_error is None:
                raise
        if self._thread_error is not None:
            raise RuntimeError(f"streaming failed to prepare a shard: {self._thread_error}") from self._thread_error


class TrainLoader:
    """Training batches for this data-parallel rank; resumable through `state_dict()`.

    `for batch in loader` yields the rest of the current epoch (the next one starts when it
    ends); `loader.batches()` yields forever. Every batch already yielded counts as seen.
    One iteration at a time: starting a new one abandons the previous one.
    """

    def __init__(self, dataset: _RowDataset, config: LoaderConfig, dp_rank: int, dp_world_size: int) -> None:
        self.dataset = dataset
        self.config = config
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.epoch = 0
        self.sample_in_epoch = 0          # global samples of this epoch seen by all DP ranks together
        self._active: Iterator[Batch] | None = None

    @property
    def global_batch_size(self) -> int:
        return self.config.batch_size * self.dp_world_size

    def _fingerprint(self) -> dict[str, Any]:
        return {"epoch_size": int(self.dataset.epoch_size),
                "samples_per_stream": [int(n) for n in self.dataset.samples_per_stream],
                "seed": self.config.seed, "num_canonical_nodes": self.config.num_canonical_nodes,
                "shuffle": self.config.shuffle, "shuffle_algo": self.config.shuffle_algo}

    def state_dict(self) -> dict[str, Any]:
        """Where this run is: the same on every rank; save it from rank 0."""
        return {"version": _STATE_VERSION, "epoch": self.epoch, "sample_in_epoch": self.sample_in_epoch,
                **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the samples `state` says were seen, on any number of ranks."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')}, expected {_STATE_VERSION}")
        saved = {k: state.get(k) for k in self._fingerprint()}
        if saved != self._fingerprint():
            raise ValueError(f"loader state does not match these streams/settings: saved {saved}, "
                             f"now {self._fingerprint()}")
        self.epoch, self.sample_in_epoch = int(state["epoch"]), int(state["sample_in_epoch"])
        self._active = None

    def _epoch_iterator(self) -> Iterator[Batch]:
        # Always tell streaming where we are: a fresh __iter__ would otherwise start a new epoch.
        self.dataset.next_epoch = self.epoch
        self.dataset.load_state_dict({
            "epoch": self.epoch, "sample_in_epoch": self.sample_in_epoch,
            "num_canonical_nodes": self.config.num_canonical_nodes, "shuffle_seed": self.config.seed,
            "initial_physical_nodes": 1})
        loader = DataLoader(self.dataset, batch_size=self.config.batch_size, num_workers=self.config.num_workers,
                            collate_fn=partial(_collate, length=self.config.seq_len + 1),
                            drop_last=self.config.drop_last)
        for batch in loader:
            # all DP ranks yield equally many, equally sized batches (streaming pads ranks evenly)
            self.sample_in_epoch += len(batch["input_ids"]) * self.dp_world_size
            yield batch
        self.epoch, self.sample_in_epoch = self.epoch + 1, 0

    def __iter__(self) -> Iterator[Batch]:
        self._active = None        # drop an abandoned iteration (its workers shut down)
        self._active = self._epoch_iterator()
        return self._active

    def batches(self) -> Iterator[Batch]:
        """Batches forever, epoch after epoch."""
        while True:
            from_start, yielded = self.sample_in_epoch == 0, False
            for batch in self:
                yielded = True
                yield batch
            if from_start and not yielded:
                raise RuntimeError(f"an epoch of {self.dataset.epoch_size} samples gives no batch of "
                                   f"{self.config.batch_size} on each of {self.dp_world_size} ranks")


def _predownload(config: LoaderConfig) -> int:
    """Samples streaming's threads prepare ahead of the one yielded; default ~4M tokens.

    They poll every 7 ms and stop `predownload` samples ahead, so streaming's default of
    8 * batch_size caps short rows at about 8 * batch_size samples per poll (measured:
    2x fewer tokens/s at seq_len 256 and 4096, benchmarks/bench_loader.py).
    """
    if config.predownload is not None:
        return config.predownload
    return max(8 * config.batch_size, 2 ** 22 // (config.seq_len + 1))


def _first_row_length(dataset: StreamingDataset, stream_id: int) -> int:
    return len(dataset[int(dataset.sample_offset_per_stream[stream_id])]["tokens"])


def build_train_loader(config: LoaderConfig, *, dp_rank: int | None = None,
                       dp_world_size: int | None = None) -> TrainLoader:
    """The training loader of this data-parallel rank.

    dp_rank / dp_world_size default to torch.distributed's rank and world size (pass them
    under tensor or pipeline parallelism, where peers of one data-parallel rank share data).
    With several processes, torch.distributed must be initialized; every rank calls this.
    """
    rank, world = _dp_coordinates(dp_rank, dp_world_size)
    with _streaming_setup():
        streams = _make_streams(config.streams, config.verify_hashes)
        dataset = _RowDataset(
            dp_rank=rank, dp_world_size=world, streams=streams, epoch_size=config.epoch_size,
            batch_size=config.batch_size, shuffle=config.shuffle, shuffle_seed=config.seed,
            shuffle_algo=config.shuffle_algo, shuffle_block_size=config.shuffle_block_size,
            num_canonical_nodes=config.num_canonical_nodes, predownload=_predownload(config),
            cache_limit=config.cache_limit, download_timeout=config.download_timeout)
        hold_shared_memory(dataset)
    for stream_id, source in enumerate(config.streams):
        row_length = _first_row_length(dataset, stream_id)
        if row_length != config.seq_len + 1:
            raise ValueError(f"stream {source.name}: rows of {row_length} tokens, but seq_len "
                             f"{config.seq_len} needs rows of seq_len + 1 = {config.seq_len + 1}")
    return TrainLoader(dataset, config, rank, world)


# ---------------------------------------------------------------------------------------------
# Validation


class _JoinedRows(Dataset):
    """Samples of k consecutive rows each, joined into one sequence of seq_len + 1 tokens.

    Rows of one stream continue each other, so the join is a continuous token stream: its
    first k * (row_length - 1) + 1 tokens give k times the training length; each row's
    document starts move by the row's offset. `slots` lists the first row of each sample
    of this rank; None marks a padding slot (any real sample, with labels IGNORE_INDEX).
    """

    def __init__(self, dataset: StreamingDataset, rows_per_sample: int, row_length: int,
                 slots: list[int | None]) -> None:
        self.dataset, self.k, self.row_length, self.slots = dataset, rows_per_sample, row_length, slots
        self.seq_len = rows_per_sample * (row_length - 1)

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, i: int) -> dict[str, Any]:
        first = self.slots[i]
        pad = first is None
        first = 0 if pad else first
        tokens, starts = [], []
        for j in range(self.k):
            row, row_starts = _row(self.dataset[first + j], self.row_length)
            tokens.append(row)
            starts.append(row_starts + j * self.row_length)
        joined, joined_starts = np.concatenate(tokens)[: self.seq_len + 1], np.concatenate(starts)
        return {"tokens": joined, "doc_starts": joined_starts[joined_starts <= self.seq_len], "pad": pad}


def build_val_loader(source: StreamSource | str | os.PathLike | dict, seq_len: int, batch_size: int, *,
                     num_workers: int = 0, max_samples: int | None = None,
                     dp_rank: int | None = None, dp_world_size: int | None = None) -> DataLoader:
    """A finite, unshuffled loader over one validation stream, for this data-parallel rank.

    seq_len is the training length (row_length - 1) or a multiple k of it; then each
    sample joins k consecutive rows. Samples are the stream's first max_samples (default
    all) groups of k rows, in order; rank r of R takes the r-th contiguous block of
    ceil(n / R), padded so every rank runs the same number of equally sized batches.
    """
    rank, world = _dp_coordinates(dp_rank, dp_world_size)
    source = StreamSource.parse(source)
    with _streaming_setup():
        dataset = StreamingDataset(streams=_make_streams([source], verify_hashes=False),
                                   batch_size=batch_size, shuffle=False)
        hold_shared_memory(dataset)
    row_length = _first_row_length(dataset, 0)
    train_length = row_length - 1
    if seq_len % train_length:
        raise ValueError(f"val stream {source.name}: seq_len {seq_len} is not a multiple of the "
                         f"stream's training length {train_length} (rows of {row_length} tokens)")
    k = seq_len // train_length
    total = dataset.num_samples // k
    if max_samples is not None:
        total = min(total, max_samples)
    if total == 0:
        raise ValueError(f"val stream {source.name}: {dataset.num_samples} rows give no sample of {k} rows")
    per_rank = math.ceil(total / world)
    firsts = [g * k for g in range(rank * per_rank, min((rank + 1) * per_rank, total))]
    slots: list[int | None] = [*firsts, *[None] * (per_rank - len(firsts))]
    return DataLoader(_JoinedRows(dataset, k, row_length, slots), batch_size=batch_size,
                      shuffle=False, num_workers=num_workers, collate_fn=partial(_collate, length=seq_len + 1))
