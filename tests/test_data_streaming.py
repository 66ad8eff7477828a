"""Streaming loader: partitioning over ranks, resume across world sizes, mixtures, batches,
validation rows, errors, stale shared memory. CPU only; small MDS datasets in tmp_path.

Every row of a test dataset is a slice of one token stream 0, 1, 2, ... (plus a per-stream
offset), so a row's first token names it: row id = (tokens[0] - offset) // ROW.
Documents start wherever the stream position is a multiple of DOC.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from conftest import launch_ranks, wait_ranks  # noqa: E402
from data_pipeline.mds import MDSWriter, StreamingDataset, clean_stale_shared_memory  # noqa: E402
from data_pipeline.streaming import (IGNORE_INDEX, LoaderConfig, StreamSource,  # noqa: E402
                                     build_train_loader, build_val_loader, make_batch)

ROW = 17            # tokens per row: seq_len 16 + 1
SEQ = ROW - 1
ROWS = 512          # divisible by num_canonical_nodes (64) and every global batch used: one
                    # epoch is then exactly one pass over the rows
DOC = 19            # longer than a row: some rows hold no document start
OFFSET_B = 20000    # token offset of the second stream of a mixture


def write_rows(out: Path, rows: int = ROWS, *, offset: int = 0, row_length: int = ROW,
               hashes: tuple[str, ...] = ("xxh64",), size_limit: int = 2000) -> Path:
    """An MDS dataset of `rows` consecutive slices of the stream offset, offset + 1, ..."""
    columns = {"tokens": f"ndarray:uint16:{row_length}", "doc_starts": "ndarray:int32"}
    with MDSWriter(out=str(out), columns=columns, hashes=list(hashes), size_limit=size_limit) as writer:
        for i in range(rows):
            position = np.arange(i * row_length, (i + 1) * row_length)
            starts = np.flatnonzero(position % DOC == 0)
            # as the prepare side writes them: MDS stores no empty array, so no start is [row_length]
            writer.write({"tokens": (position + offset).astype(np.uint16),
                          "doc_starts": (starts if len(starts) else np.array([row_length])).astype(np.int32)})
    return out


def row_ids(batch: dict[str, torch.Tensor], offset: int = 0) -> list[int]:
    return ((batch["input_ids"][:, 0] - offset) // ROW).tolist()


@pytest.fixture(scope="module")
def rows_dir(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("mds") / "train")


def config(*streams, **changes) -> LoaderConfig:
    return LoaderConfig(streams=list(streams), **{"seq_len": SEQ, "batch_size": 4, **changes})


# ---------------------------------------------------------------------------------------------
# Several ranks, as separate processes (gloo), torchrun-like environment


def _rank_worker(args: dict) -> None:
    """One rank: stream from a saved state (or the start) for `steps` batches or to the end
    of the epoch; write the row ids of every batch and the state at the end."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    loader = build_train_loader(config(args["data"], num_workers=args["workers"]))
    if args["state_in"]:
        loader.load_state_dict(json.loads(Path(args["state_in"]).read_text()))
    steps = []
    for batch in loader:
        steps.append(row_ids(batch))
        if len(steps) == args["steps"]:
            break
    rank = dist.get_rank()
    Path(f"{args['out']}.{rank}.json").write_text(json.dumps({"steps": steps, "state": loader.state_dict()}))
    dist.barrier()
    dist.destroy_process_group()


def launch(world: int, out: Path, data: Path, *, steps: int | None = None, state_in: Path | None = None,
           workers: int = 0, launcher_sets_local: bool = True) -> tuple[list[subprocess.Popen], Path, int]:
    args = dict(data=str(data), out=str(out), steps=steps, workers=workers,
                state_in=str(state_in) if state_in else None)
    # as torchrun does; else the loader derives them
    local = (lambda rank: {"LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)}) if launcher_sets_local else None
    return launch_ranks(__file__, world, json.dumps(args), local), out, world


def collect(job: tuple[list[subprocess.Popen], Path, int]) -> tuple[list[list[list[int]]], dict]:
    """Per rank, the row ids of each batch; and rank 0's final state (all ranks must agree)."""
    procs, out, world = job
    wait_ranks(procs)
    results = [json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in range(world)]
    assert all(r["state"] == results[0]["state"] for r in results)
    return [r["steps"] for r in results], results[0]["state"]


def global_steps(per_rank: list[list[list[int]]]) -> list[set[int]]:
    """The set of rows each step consumed over all ranks; ranks must not overlap."""
    assert len({len(steps) for steps in per_rank}) == 1, "ranks ran different numbers of steps"
    merged = []
    for step in zip(*per_rank):
        rows = [r for batch in step for r in batch]
        assert len(set(rows)) == len(rows), f"ranks overlap within a step: {step}"
        merged.append(set(rows))
    return merged


def test_ranks_partition_and_resume_across_world_sizes(rows_dir, tmp_path):
    # The global order: one rank, one unbroken epoch; batch k holds G[4k : 4k + 4].
    order = [r for batch in build_train_loader(config(rows_dir)) for r in row_ids(batch)]
    assert sorted(order) == list(range(ROWS))

    def expect(start: int, steps: list[set[int]], world: int) -> None:
        glob = 4 * world
        assert steps == [set(order[start + glob * k: start + glob * (k + 1)]) for k in range(len(steps))]

    # First runs, side by side: 2 ranks (2 workers each) stop after 5 steps; 1 rank after 6.
    two = launch(2, tmp_path / "two", rows_dir, steps=5, workers=2, launcher_sets_local=False)
    one = launch(1, tmp_path / "one", rows_dir, steps=6)
    two_steps, two_state = collect(two)
    one_steps, one_state = collect(one)
    expect(0, global_steps(two_steps), 2)
    expect(0, global_steps(one_steps), 1)
    assert two_state["sample_in_epoch"] == 40 and one_state["sample_in_epoch"] == 24
    (tmp_path / "two.state").write_text(json.dumps(two_state))
    (tmp_path / "one.state").write_text(json.dumps(one_state))

    # Resumes to the end of the epoch: 2 -> 2, 2 -> 1, 1 -> 2.
    jobs = {"2->2": launch(2, tmp_path / "a", rows_dir, state_in=tmp_path / "two.state"),
            "2->1": launch(1, tmp_path / "b", rows_dir, state_in=tmp_path / "two.state"),
            "1->2": launch(2, tmp_path / "c", rows_dir, state_in=tmp_path / "one.state", workers=1)}
    before = {"2->2": two_steps, "2->1": two_steps, "1->2": one_steps}
    starts = {"2->2": 40, "2->1": 40, "1->2": 24}
    for name, job in jobs.items():
        steps, state = collect(job)
        world = job[2]
        expect(starts[name], global_steps(steps), world)
        seen = [r for rank in before[name] + steps for batch in rank for r in batch]
        assert sorted(seen) == list(range(ROWS)), f"{name}: not exactly one pass over the rows"
        assert state["epoch"] == 1 and state["sample_in_epoch"] == 0


def test_explicit_dp_coordinates_partition_without_torch_distributed(rows_dir):
    # Tensor/pipeline-parallel callers pass their data-parallel rank; peers get the same rows.
    loaders = [build_train_loader(config(rows_dir), dp_rank=r, dp_world_size=2) for r in (0, 1, 1)]
    epochs = [[row_ids(b) for b in loader] for loader in loaders]
    assert epochs[1] == epochs[2]
    rows = [r for batch in epochs[0] + epochs[1] for r in batch]
    assert sorted(rows) == list(range(ROWS))
    assert loaders[0].state_dict() == loaders[1].state_dict()


# ---------------------------------------------------------------------------------------------
# One process


def test_state_resumes_in_process_and_epochs_continue(rows_dir):
    loader = build_train_loader(config(rows_dir))
    iterator = iter(loader)
    first = [row_ids(next(iterator)) for _ in range(3)]
    state = loader.state_dict()
    rest_here = [row_ids(b) for b in loader]             # a new iter() continues the epoch
    assert loader.state_dict()["epoch"] == 1
    resumed = build_train_loader(config(rows_dir))
    resumed.load_state_dict(state)
    assert [row_ids(b) for b in resumed] == rest_here
    assert sorted(r for b in first + rest_here for r in b) == list(range(ROWS))
    second_epoch = [r for b in loader for r in row_ids(b)]
    assert sorted(second_epoch) == list(range(ROWS)) and second_epoch != [r for b in first + rest_here for r in b]
    with pytest.raises(ValueError, match="does not match"):
        build_train_loader(config(rows_dir, seed=1)).load_state_dict(state)


def test_mixture_proportions(tmp_path):
    a = write_rows(tmp_path / "a", 256)
    b = write_rows(tmp_path / "b", 256, offset=OFFSET_B)
    loader = build_train_loader(config(StreamSource(path=str(a), proportion=0.7),
                                       {"path": str(b), "proportion": 0.3}, batch_size=8, seed=3))
    from_a = [int(t < OFFSET_B) for batch in loader for t in batch["input_ids"][:, 0].tolist()]
    assert abs(sum(from_a) - 0.7 * 512) <= 1                  # the epoch holds the exact shares
    n = 200                                                    # and any prefix, within sampling error
    assert abs(np.mean(from_a[:n]) - 0.7) < 4 * math.sqrt(0.7 * 0.3 / n)


def test_batch_tensors_from_rows(rows_dir):
    batch = next(iter(build_train_loader(config(rows_dir, shuffle=False))))
    assert set(batch) == {"input_ids", "labels", "doc_ids"}
    for name, tensor in batch.items():
        assert tensor.shape == (4, SEQ) and tensor.dtype == torch.long, name
    for i, row in enumerate(row_ids(batch)):
        position = torch.arange(row * ROW, (row + 1) * ROW)
        assert torch.equal(batch["input_ids"][i], position[:-1])
        assert torch.equal(batch["labels"][i], position[1:])
        starts = (position[:-1] % DOC == 0) & (torch.arange(SEQ) > 0)
        assert torch.equal(batch["doc_ids"][i], starts.long().cumsum(0))


def test_make_batch_doc_ids():
    tokens = np.arange(2 * 9, dtype=np.uint16).reshape(2, 9)
    batch = make_batch(tokens, [np.array([0, 3, 7]), np.array([2, 8])], valid=np.array([True, False]))
    assert batch["doc_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 2], [0, 0, 1, 1, 1, 1, 1, 1]]
    assert batch["labels"][0].tolist() == list(range(1, 9)) and (batch["labels"][1] == IGNORE_INDEX).all()


def test_validation_joins_consecutive_rows(tmp_path):
    val = write_rows(tmp_path / "val", 41)                      # 20 samples of 2 rows, 1 row left over
    per_rank = [list(build_val_loader(val, 2 * SEQ, 3, dp_rank=r, dp_world_size=3)) for r in range(3)]
    assert [len(b) for b in per_rank] == [3, 3, 3]             # 7 slots each: batches 3 + 3 + 1
    seen = []
    for batches in per_rank:
        for batch in batches:
            assert batch["input_ids"].shape[1] == 2 * SEQ
            for ids, labels, docs in zip(batch["input_ids"], batch["labels"], batch["doc_ids"]):
                start = int(ids[0])
                stream = torch.arange(start, start + 2 * SEQ + 1)        # continuous across the join
                assert torch.equal(ids, stream[:-1])
                starts = (stream[:-1] % DOC == 0) & (torch.arange(2 * SEQ) > 0)
                assert torch.equal(docs, starts.long().cumsum(0))
                if (labels == IGNORE_INDEX).all():
                    continue                                             # padding slot
                assert torch.equal(labels, stream[1:])
                seen.append(start // (2 * ROW))
    assert seen == list(range(20))                                       # in order, each once
    same_length = [row_ids(b) for b in build_val_loader(str(val), SEQ, 4, num_workers=1)]
    assert same_length == [[i, i + 1, i + 2, i + 3] for i in range(0, 40, 4)] + [[40]]


def test_remote_cache_pair(rows_dir, tmp_path):
    cache = tmp_path / "cache"
    loader = build_train_loader(config(StreamSource(remote=str(rows_dir), local=str(cache))))
    assert sorted(r for b in loader for r in row_ids(b)) == list(range(ROWS))
    assert (cache / "index.json").is_file() and len(list(cache.glob("shard.*.mds"))) > 1


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        build_train_loader(config(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty" / "index.json")):
        build_train_loader(config(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="index.json"):
        build_val_loader(StreamSource(remote=str(tmp_path / "empty"), local=str(tmp_path / "c")), SEQ, 2)


def test_corrupt_shards(tmp_path):
    data = write_rows(tmp_path / "d", 64)
    shard = data / "shard.00001.mds"
    flipped = bytearray(shard.read_bytes())
    flipped[-3] ^= 0xFF
    shard.write_bytes(flipped)                                   # same size, wrong hash
    with pytest.raises(ValueError, match=f"{shard} fails its xxh64 hash"):
        build_train_loader(config(data, verify_hashes=True))
    with pytest.raises(RuntimeError, match=f"Checksum failure: {tmp_path / 'cache' / shard.name}"):
        list(build_train_loader(config(StreamSource(remote=str(data), local=str(tmp_path / "cache")))))
    shard.write_bytes(flipped[:-10])                             # truncated
    with pytest.raises(ValueError, match=f"shard {shard} is corrupt: {len(flipped) - 10} bytes"):
        build_train_loader(config(data))


def test_row_length_mismatch(rows_dir):
    with pytest.raises(ValueError, match=f"rows of {ROW} tokens, but seq_len 20 needs rows of seq_len \\+ 1 = 21"):
        build_train_loader(config(rows_dir, seq_len=20))
    with pytest.raises(ValueError, match=f"seq_len 40 is not a multiple of the stream's training length {SEQ}"):
        build_val_loader(rows_dir, 40, 2)


@pytest.mark.parametrize("proportions, message", [
    ((0.5, -0.5), "finite number >= 0"),
    ((float("nan"), 1.0), "finite number >= 0"),
    ((0.5, None), "every stream of a mixture"),
    ((0.0, 0.0), "sum to 0"),
])
def test_invalid_proportions(rows_dir, proportions, message):
    with pytest.raises(ValueError, match=message):
        config(*[StreamSource(path=str(rows_dir), proportion=p) for p in proportions])


# ---------------------------------------------------------------------------------------------
# Shared memory left by a killed run

_KILLED_RUN = """
import sys, time
sys.path.insert(0, {repo!r})
from data_pipeline.streaming import LoaderConfig, StreamSource, build_train_loader
loader = build_train_loader(LoaderConfig(streams=[StreamSource(remote={remote!r}, local={local!r})],
                                         seq_len={seq}, batch_size=4))
next(iter(loader))
print("streaming", flush=True)
time.sleep(600)
"""


def _prefixes_listing(folder: Path) -> set[int]:
    """streaming prefixes whose `locals` block lists `folder`: a new dataset over the same
    (remote, local) pair fails with "Reused local directory" when its scan reaches one."""
    found = set()
    for name in os.listdir("/dev/shm"):
        if name.endswith("_locals") and name[:6].isdigit():
            data = Path("/dev/shm", name).read_bytes()
            size = int.from_bytes(data[:4], "little")
            if str(folder) in data[4:size].decode(errors="replace").split("\0"):
                found.add(int(name[:6]))
    return found


def test_stale_shared_memory_from_killed_run(rows_dir, tmp_path):
    cache = tmp_path / "cache"
    code = _KILLED_RUN.format(repo=str(REPO), remote=str(rows_dir), local=str(cache), seq=SEQ)
    # A job killed whole, as Slurm or the OOM killer do (killing only the main process, Python's
    # resource tracker survives and unlinks the blocks itself).
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "streaming"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _prefixes_listing(cache)                              # left behind
    live = build_train_loader(config(rows_dir))                  # cleans them up first
    assert not _prefixes_listing(cache)
    loader = build_train_loader(config(StreamSource(remote=str(rows_dir), local=str(cache))))
    assert _prefixes_listing(cache) == {loader.dataset._shm_prefix_int}
    assert sorted(r for b in loader for r in row_ids(b)) == list(range(ROWS))
    # cleaning again spares live datasets: ours (held) and plain streaming ones (mapped)
    foreign = StreamingDataset(local=str(rows_dir), batch_size=4)
    removed = clean_stale_shared_memory()
    assert not any(f"{p:06}_" in path for path in removed for p in
                   (live.dataset._shm_prefix_int, loader.dataset._shm_prefix_int, foreign._shm_prefix_int))
    assert _prefixes_listing(cache) == {loader.dataset._shm_prefix_int}
    assert len(list(live)) == ROWS // 4


if __name__ == "__main__":     # a rank of the multi-process tests above
    _rank_worker(json.loads(sys.argv[1]))


def test_reclaimed_shared_memory_is_not_reported_leaked_at_exit():
    """Blocks of a dropped dataset reclaimed by clean_stale_shared_memory (the name unlinked under its creator),
    and a prefix reused for a new block of the same name: the process exits without the resource tracker's
    "leaked shared_memory" warnings, "No such file" lines or KeyError tracebacks."""
    code = """
import os
import data_pipeline.mds  # noqa: F401  (streaming, as Braid loads it)
from streaming.base.shared.memory import SharedMemory
name = f"braidtest_{os.getpid()}"
a = SharedMemory(name=name, create=True, size=64)
os.unlink("/dev/shm/" + name)                          # reclaimed while its creator lives
b = SharedMemory(name=name, create=True, size=64)      # the name reused by a new block
c = SharedMemory(name=name + "_x", create=True, size=64)
os.unlink("/dev/shm/" + name + "_x")
"""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0 and out.stderr == "", out.stderr[-2000:]
