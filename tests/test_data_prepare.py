"""`braid data prepare|tokenizer`: recipe -> datatrove -> MDS token rows, on small generated corpora (CPU)."""
from __future__ import annotations

import gzip
import json
import os
import random
import socket

import numpy as np
import pytest
import yaml

from data_pipeline.pipeline import RowPacker, in_validation
from data_pipeline.prepare import build_executors, prepare
from data_pipeline.recipe import load_recipe, recipe_from_dict
from data_pipeline.tokenizer import load_tokenizer, train_bpe
from launch.cli import main as braid

EOS, PAD = "<|endoftext|>", "<|pad|>"
ROW = 64
_WORDS = ("the of and to that have with be in is it for on as was at by from this are an which or were but not "
          "river mountain garden window letter music station harbor winter summer morning evening teacher "
          "farmer doctor market bridge forest valley village castle island journey question answer reason "
          "history language science picture kitchen library century country student company problem system "
          "quickly slowly carefully often always never usually rarely bright quiet heavy gentle ancient modern "
          "build carry follow gather listen measure notice open remember travel wander write explain").split()


def _prose(rng: random.Random, n_words: int, tag: str) -> str:
    words, sentences = [], []
    while len(words) < n_words:
        sentence = [rng.choice(_WORDS) for _ in range(rng.randint(7, 14))]
        words += sentence
        sentences.append(" ".join(sentence).capitalize() + ".")
    # a unique tag keeps generated documents distinct; the stop words keep Gopher's quality filter happy
    return f"Entry {tag} of the set and the list. " + " ".join(sentences)


def make_corpus(folder, n_good: int = 240, seed: int = 0) -> dict:
    """Three JSONL files (plain, .gz, .zst) with good prose, junk each filter drops, duplicates and a bad line.

    Returns the documents expected to survive, per file in order, and what each filter should drop.
    """
    import zstandard

    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    files = {"a.jsonl": [], "b.jsonl.gz": [], "c.jsonl.zst": []}
    kept = {name: [] for name in files}
    dropped = {"length": 0, "patterns": 0, "gopher_repetition": 0, "gopher_quality": 0}
    duplicates = 0
    names = list(files)
    for i in range(n_good):
        name = names[i % 3]
        text = _prose(rng, rng.randint(60, 140), str(i))
        files[name].append({"id": f"good-{i}", "text": text})
        kept[name].append(text)
        if i % 25 == 7:   # an exact copy later in the same file: dedup drops the copy
            files[name].append({"id": f"copy-{i}", "text": text})
            duplicates += 1
        if i % 20 == 3:
            files[name].append({"id": f"short-{i}", "text": "too short"})
            dropped["length"] += 1
        if i % 30 == 5:
            files[name].append({"id": f"spam-{i}", "text": _prose(rng, 80, f"s{i}") + " BUY CHEAP PILLS NOW"})
            dropped["patterns"] += 1
        if i % 30 == 6:
            files[name].append({"id": f"url-{i}", "text": _prose(rng, 80, f"u{i}"),
                                "url": f"https://ads.blocked.example/{i}"})
            dropped["patterns"] += 1
        if i % 40 == 9:
            files[name].append({"id": f"rep-{i}", "text": "\n".join(["click here to win a prize today"] * 30)})
            dropped["gopher_repetition"] += 1
        if i % 40 == 11:
            numbers = " ".join(str(rng.randint(10 ** 5, 10 ** 6)) for _ in range(90))
            files[name].append({"id": f"num-{i}", "text": numbers})
            dropped["gopher_quality"] += 1
    bad_line = {}
    for name, records in files.items():
        lines = [json.dumps(r) + "\n" for r in records]
        if name == "a.jsonl":
            lines.insert(4, '{"id": "broken", "text": "no closing quote}\n')
            bad_line = {"file": os.path.join(str(folder), name), "line": 5}
        data = "".join(lines).encode()
        if name.endswith(".gz"):
            data = gzip.compress(data)
        elif name.endswith(".zst"):
            data = zstandard.ZstdCompressor().compress(data)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    n_read = sum(len(r) for r in files.values())
    return {"kept": kept, "dropped": dropped, "duplicates": duplicates, "read": n_read, "bad_line": bad_line}


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    rng = random.Random(1)
    texts = [_prose(rng, 100, str(i)) for i in range(200)] + ["0123456789 BUY CHEAP PILLS"]
    tok = train_bpe(texts, vocab_size=400, special_tokens=[EOS, PAD])
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    tok.save(path)
    return path


def write_recipe(tmp_path, tokenizer_file: str, inputs: list[dict] | None = None, **sections) -> str:
    recipe = {
        "output": str(tmp_path / "out"),
        "inputs": inputs or [{"type": "jsonl", "path": str(tmp_path / "corpus")}],
        "filters": {"length": {"enabled": True, "min_chars": 50},
                    "patterns": {"enabled": True, "text_patterns": ["BUY CHEAP PILLS"],
                                 "blocked_domains": ["blocked.example"]},
                    "gopher_repetition": {"enabled": True},
                    "gopher_quality": {"enabled": True}},
        "dedup": {"method": "exact"},
        "validation": 0.25,
        "tokenizer": {"path": tokenizer_file, "eos_token": EOS, "pad_token": PAD, "batch_size": 16},
        "shards": {"row_length": ROW, "size_limit": "16KB"},
        "executor": {"type": "local", "tasks": 2, "workers": 1},
    }
    for key, value in sections.items():
        recipe[key] = value if not isinstance(value, dict) else {**recipe.get(key, {}), **value}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


# ---------------------------------------------------------------------------- reading shards back


def read_rows(dataset_dir: str) -> list[dict]:
    """Rows of an MDS folder, in order, through mosaicml-streaming's own reader."""
    import data_pipeline.mds  # noqa: F401  (streaming without its vision/text subpackages)
    from streaming.base.compression import decompress
    from streaming.base.local import LocalDataset

    with open(os.path.join(dataset_dir, "index.json")) as f:
        index = json.load(f)
    for shard in index["shards"]:
        raw = os.path.join(dataset_dir, shard["raw_data"]["basename"])
        if not os.path.exists(raw):   # LocalDataset reads the uncompressed shard
            with open(os.path.join(dataset_dir, shard["zip_data"]["basename"]), "rb") as f:
                data = decompress(shard["compression"], f.read())
            with open(raw, "wb") as f:
                f.write(data)
    ds = LocalDataset(dataset_dir)
    return [ds.get_item(i) for i in range(len(ds))]


def check_task_rows(task_dir: str, docs: list[str], tok, eos_id: int) -> int:
    """The task's rows are exactly its documents' ids with EOS after each, cut at ROW; returns the dropped tail."""
    rows = read_rows(task_dir) if os.path.isfile(os.path.join(task_dir, "index.json")) else []
    expected = np.array([t for d in docs for t in tok.encode(d, add_special_tokens=False).ids + [eos_id]],
                        dtype=np.int64)
    assert len(rows) == len(expected) // ROW
    if not rows:
        return len(expected)
    stream = np.concatenate([r["tokens"] for r in rows]).astype(np.int64)
    assert rows[0]["tokens"].dtype == np.uint16 and rows[0]["doc_starts"].dtype == np.int32
    np.testing.assert_array_equal(stream, expected[:len(stream)])
    # split at EOS and decode: every complete piece is the next kept document, in order
    pieces = np.split(stream, np.flatnonzero(stream == eos_id) + 1)[:-1]
    assert [tok.decode(p[:-1].tolist()) for p in pieces] == docs[:len(pieces)]
    # doc_starts: where a document begins (after an EOS; 0 only at the task's first row), else [ROW]
    for i, row in enumerate(rows):
        before = np.concatenate([[eos_id if i == 0 else stream[i * ROW - 1]], row["tokens"][:-1]])
        starts = np.flatnonzero(before == eos_id).tolist()
        assert row["doc_starts"].tolist() == (starts or [ROW])
    return len(expected) - len(stream)


# ---------------------------------------------------------------------------- the pipeline


def test_row_packer_keeps_one_stream_and_marks_document_starts():
    packer = RowPacker(row_length=4, eos_id=0, dtype="uint16")
    rows, starts = packer.add([[1, 2, 3], [4], [5, 6, 7, 8, 9]])
    assert rows.tolist() == [[1, 2, 3, 0], [4, 0, 5, 6], [7, 8, 9, 0]]
    assert [s.tolist() for s in starts] == [[0], [0, 2], [4]]   # the third row starts mid-document
    rows, starts = packer.add([[10, 11], [12, 13, 14, 15, 16, 17]])
    assert rows.tolist() == [[10, 11, 0, 12], [13, 14, 15, 16]]
    assert [s.tolist() for s in starts] == [[0, 3], [4]]
    assert packer.pending.tolist() == [17, 0]
    rows, starts = packer.add([])
    assert rows.shape == (0, 4) and starts == []


def test_prepare_counts_and_rows_reproduce_kept_documents(tmp_path, tokenizer_path, capfd):
    corpus = make_corpus(tmp_path / "corpus")
    recipe = load_recipe(write_recipe(tmp_path, tokenizer_path))
    summary = prepare(recipe)

    assert summary["documents_read"] == corpus["read"]
    assert summary["malformed_lines"] == 1
    assert summary["dropped"] == corpus["dropped"]
    assert summary["duplicates"] == corpus["duplicates"]
    bad = corpus["bad_line"]
    assert f"{bad['file']}:{bad['line']}: malformed line skipped" in capfd.readouterr().err

    tok = load_tokenizer(tokenizer_path)
    eos_id = tok.token_to_id(EOS)
    out = tmp_path / "out"
    meta = json.loads((out / "braid_data.json").read_text())
    assert (meta["row_length"], meta["vocab_size"], meta["eos_id"], meta["pad_id"], meta["token_dtype"]) == \
        (ROW, 400, eos_id, tok.token_to_id(PAD), "uint16")
    assert meta["tokenizer"]["path"] == tokenizer_path and len(meta["tokenizer"]["sha256"]) == 64
    assert meta["recipe"]["shards"]["row_length"] == ROW and meta["stats"] == summary
    assert json.loads((out / "stats.json").read_text()) == summary

    # tasks share out the sorted files: task 0 reads a.jsonl and c.jsonl.zst, task 1 b.jsonl.gz
    per_task = [corpus["kept"]["a.jsonl"] + corpus["kept"]["c.jsonl.zst"], corpus["kept"]["b.jsonl.gz"]]
    for split in ("train", "val"):
        total_docs = total_rows = dropped_tail = 0
        for rank, docs in enumerate(per_task):
            docs = [d for d in docs if in_validation(d, 0.25) == (split == "val")]
            dropped_tail += check_task_rows(str(out / split / f"task_{rank:05d}"), docs, tok, eos_id)
            total_docs += len(docs)
        total_rows = len(read_rows(str(out / split)))   # the merged index sees every task's rows
        stats = summary["splits"][split]
        assert (stats["documents"], stats["rows"], stats["tokens"], stats["dropped_tail_tokens"]) == \
            (total_docs, total_rows, total_rows * ROW, dropped_tail)
    assert summary["splits"]["val"]["documents"] > 10   # the held-out split is not empty
    assert summary["tokens_written"] == (summary["splits"]["train"]["rows"] + summary["splits"]["val"]["rows"]) * ROW


def _mtimes(folder) -> dict[str, tuple[int, int]]:
    return {name: (os.stat(folder / name).st_mtime_ns, os.stat(folder / name).st_ino)
            for name in sorted(os.listdir(folder))}


def test_rerun_redoes_only_the_task_without_completion_marker(tmp_path, tokenizer_path):
    make_corpus(tmp_path / "corpus", n_good=90)
    recipe_path = write_recipe(tmp_path, tokenizer_path, validation=0.0)
    first = prepare(load_recipe(recipe_path))
    out = tmp_path / "out"
    task0, task1 = out / "train" / "task_00000", out / "train" / "task_00001"
    before0, before1 = _mtimes(task0), _mtimes(task1)
    filter_stats = _mtimes(out / ".work" / "logs" / "filter" / "stats")

    os.remove(out / ".work" / "logs" / "tokenize" / "completions" / "00001")
    (out / "train" / ".task_00001.tmp").mkdir()          # what a killed task leaves behind
    (out / "train" / ".task_00001.tmp" / "shard.00000.mds").write_bytes(b"half")
    second = prepare(load_recipe(recipe_path))

    assert _mtimes(task0) == before0                       # task 0: not touched
    after1 = _mtimes(task1)
    assert after1.keys() == before1.keys() and all(after1[k] != before1[k] for k in after1)   # task 1: redone
    assert not (out / "train" / ".task_00001.tmp").exists()
    assert _mtimes(out / ".work" / "logs" / "filter" / "stats") == filter_stats   # filter stage: all skipped
    for key in ("documents_read", "dropped", "duplicates", "splits"):
        assert second[key] == first[key]
    assert not (out / "val").exists()                      # validation 0: no val split


def test_task_that_dies_midway_is_redone_cleanly(tmp_path, tokenizer_path, monkeypatch):
    from data_pipeline import pipeline

    make_corpus(tmp_path / "corpus", n_good=60)
    recipe_path = write_recipe(tmp_path, tokenizer_path, validation=0.0, tokenizer={"batch_size": 4})
    real_task, real_write = pipeline.MDSTokenWriter._write_task, pipeline.MDSTokenWriter._write
    state = {"rank": None, "batches": 0}

    def task(self, data, rank):
        state["rank"] = rank
        return real_task(self, data, rank)

    def dying_write(self, *args):
        if state["rank"] == 1:
            state["batches"] += 1
            if state["batches"] == 3:   # task 1 dies after writing two batches
                raise RuntimeError("killed")
        return real_write(self, *args)

    monkeypatch.setattr(pipeline.MDSTokenWriter, "_write_task", task)
    monkeypatch.setattr(pipeline.MDSTokenWriter, "_write", dying_write)
    with pytest.raises(RuntimeError, match="killed"):
        prepare(load_recipe(recipe_path))
    out = tmp_path / "out"
    assert (out / "train" / "task_00000" / "index.json").exists()
    assert not (out / "train" / "task_00001").exists() and not (out / "train" / ".task_00001.tmp").exists()
    assert not (out / "braid_data.json").exists() and not (out / "train" / "index.json").exists()

    monkeypatch.setattr(pipeline.MDSTokenWriter, "_write", real_write)
    resumed = prepare(load_recipe(recipe_path))
    clean = prepare(load_recipe(write_recipe(tmp_path, tokenizer_path, validation=0.0,
                                             output=str(tmp_path / "clean"))))
    assert resumed["splits"] == clean["splits"]
    for rank in (0, 1):
        a = read_rows(str(out / "train" / f"task_{rank:05d}"))
        b = read_rows(str(tmp_path / "clean" / "train" / f"task_{rank:05d}"))
        assert all((x["tokens"] == y["tokens"]).all() for x, y in zip(a, b)) and len(a) == len(b)


def _prose_docs(n: int, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    return [_prose(rng, 70, f"p{i}") for i in range(n)]


def test_parquet_input(tmp_path, tokenizer_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = _prose_docs(30)
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"content": docs, "id": [str(i) for i in range(30)]}), tmp_path / "pq" / "x.parquet")
    recipe = write_recipe(tmp_path, tokenizer_path, inputs=[{"type": "parquet", "path": str(tmp_path / "pq"),
                                                            "text_key": "content"}],
                          validation=0.0, executor={"tasks": 1}, dedup={"method": "none"})
    summary = prepare(load_recipe(recipe))
    assert summary["documents_read"] == 30 and summary["splits"]["train"]["documents"] == 30
    tok = load_tokenizer(tokenizer_path)
    check_task_rows(str(tmp_path / "out" / "train" / "task_00000"), docs, tok, tok.token_to_id(EOS))


def test_saved_dataset_input(tmp_path, tokenizer_path):
    import datasets

    docs = _prose_docs(25, seed=4)
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "ds"))
    recipe = write_recipe(tmp_path, tokenizer_path, inputs=[{"type": "hf_disk", "path": str(tmp_path / "ds"),
                                                            "text_key": "body"}],
                          validation=0.0, executor={"tasks": 1})
    summary = prepare(load_recipe(recipe))
    assert summary["documents_read"] == 25 and summary["splits"]["train"]["documents"] == 25
    tok = load_tokenizer(tokenizer_path)
    check_task_rows(str(tmp_path / "out" / "train" / "task_00000"), docs, tok, tok.token_to_id(EOS))


def test_minhash_dedup_drops_near_duplicates(tmp_path, tokenizer_path):
    docs = _prose_docs(40, seed=5)
    near = [d.replace(".", "!", 1) for d in docs[:5]]   # one character changed
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs + near))
    recipe = write_recipe(tmp_path, tokenizer_path, validation=0.0, executor={"tasks": 1},
                          dedup={"method": "minhash",
                                 "minhash": {"n_grams": 3, "num_buckets": 4, "hashes_per_bucket": 4}})
    summary = prepare(load_recipe(recipe))
    assert summary["duplicates"] == 5 and summary["splits"]["train"]["documents"] == 40


# ---------------------------------------------------------------------------- tokenizer training


def test_tokenizer_training_offline(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access during tokenizer training")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    (tmp_path / "corpus").mkdir()
    docs = _prose_docs(120, seed=6)
    (tmp_path / "corpus" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    tok_path = tmp_path / "tok" / "tokenizer.json"
    recipe = write_recipe(tmp_path, str(tok_path),
                          tokenizer={"vocab_size": 333, "extra_special_tokens": ["<|user|>"]})
    assert braid(["data", "tokenizer", recipe]) == 0

    tok = load_tokenizer(str(tok_path))
    assert tok.get_vocab_size(with_added_tokens=True) == 333
    assert [tok.token_to_id(t) for t in (EOS, PAD, "<|user|>")] == [0, 1, 2]
    text = "Ünïcode, tabs\tand  spaces — all bytes survive.\n"
    assert tok.decode(tok.encode(text).ids) == text


def test_tokenizer_trains_on_what_prepare_keeps(tmp_path):
    """The tokenizer sees the documents `prepare` tokenizes: after the filters and dedup, validation held out."""
    from data_pipeline.tokenizer import train_from_recipe
    corpus = make_corpus(tmp_path / "corpus", n_good=60)
    # junk the pattern filter drops, so frequent that a tokenizer trained on it would learn it as one token
    with open(tmp_path / "corpus" / "d.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"id": f"junk-{i}", "text": "Zyxwvquartz " * 40 + _prose(random.Random(i), 30, f"j{i}")})
                    + "\n")
    tok_path = tmp_path / "tok" / "tokenizer.json"
    recipe = load_recipe(write_recipe(tmp_path, str(tok_path), tokenizer={"vocab_size": 400},
                                      filters={"patterns": {"text_patterns": ["BUY CHEAP PILLS", "Zyxwvquartz"]}}))
    result = train_from_recipe(recipe)
    assert len(load_tokenizer(str(tok_path)).encode(" Zyxwvquartz").ids) > 1       # never seen as a word
    summary = prepare(recipe)
    assert result["read"] == summary["documents_read"] == corpus["read"] + 60          # the junk file too
    assert result["filtered"] == sum(summary["dropped"].values()) >= 60
    assert result["duplicates"] == summary["duplicates"] == corpus["duplicates"]
    assert result["documents"] == summary["splits"]["train"]["documents"]            # the training split exactly
    assert result["held_out"] == summary["splits"]["val"]["documents"]


def test_a_wrong_text_key_names_the_key_and_the_fields_and_the_corrected_rerun_runs(tmp_path, tokenizer_path, capsys):
    (tmp_path / "corpus").mkdir()
    docs = _prose_docs(40, seed=8)
    (tmp_path / "corpus" / "a.jsonl").write_text("".join(json.dumps({"id": i, "content": t, "url": "u"}) + "\n"
                                                         for i, t in enumerate(docs)))
    recipe = write_recipe(tmp_path, tokenizer_path, executor={"tasks": 1})
    assert braid(["data", "prepare", recipe]) == 2
    line = _error_line(capsys)
    assert line == (f"braid: error: recipe.inputs[0].text_key='text': none of the 40 records read from "
                    f"{tmp_path / 'corpus'} has that field (fields found: content, id, url); set "
                    "recipe.inputs[0].text_key to the field that holds the text")
    assert braid(["data", "tokenizer", recipe, f"tokenizer.path={tmp_path / 'tok.json'}",
                  "tokenizer.vocab_size=300"]) == 2
    assert "recipe.inputs[0].text_key='text': none of the 40 records read" in _error_line(capsys)
    # the failed run's unfinished work does not block the corrected recipe
    fixed = write_recipe(tmp_path, tokenizer_path, executor={"tasks": 1},
                         inputs=[{"type": "jsonl", "path": str(tmp_path / "corpus"), "text_key": "content"}])
    assert braid(["data", "prepare", fixed]) == 0, capsys.readouterr().err[-2000:]
    assert "discarding the unfinished preparation" in capsys.readouterr().err
    info = json.loads((tmp_path / "out" / "braid_data.json").read_text())
    assert info["stats"]["documents_read"] == 40 and info["tokenizer"]["vocab_size"] == 400


# ---------------------------------------------------------------------------- bad input


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("braid: error: ")
    return err[-1]


def test_missing_tokenizer_is_one_clear_error(tmp_path, capsys):
    make_corpus(tmp_path / "corpus", n_good=9)
    recipe = write_recipe(tmp_path, str(tmp_path / "nope" / "tokenizer.json"))
    assert braid(["data", "prepare", recipe]) == 2
    line = _error_line(capsys)
    assert "tokenizer file not found" in line and "nope/tokenizer.json" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, key", [("filters.lenght.min_chars=5", "recipe.filters.lenght"),
                                           ("executor.slurm.partitoin=cpu", "recipe.executor.slurm.partitoin"),
                                           ("shards.row_length=abc", "recipe.shards.row_length"),
                                           ("executor.slurm.sbatch_args={array: 0-3}",
                                            "recipe.executor.slurm.sbatch_args.array: set by datatrove")])
def test_bad_recipe_key_names_its_path(tmp_path, tokenizer_path, capsys, override, key):
    recipe = write_recipe(tmp_path, tokenizer_path)
    assert braid(["data", "prepare", recipe, override]) == 2
    assert key in _error_line(capsys)


def test_unknown_key_inside_a_list_item():
    with pytest.raises(ValueError, match=r"recipe\.inputs\[0\]\.txt_key: unknown key"):
        recipe_from_dict({"output": "x", "inputs": [{"path": "y", "txt_key": "body"}], "tokenizer": {"path": "t"}})


def test_failed_reruns_leave_the_good_output_alone(tmp_path, tokenizer_path, capsys):
    make_corpus(tmp_path / "corpus", n_good=60)
    recipe = write_recipe(tmp_path, tokenizer_path)
    assert braid(["data", "prepare", recipe]) == 0
    out = tmp_path / "out"
    published = {p: p.read_bytes() for p in [out / "braid_data.json", out / "train" / "index.json",
                                              out / "val" / "index.json"]}
    shards = _mtimes(out / "train" / "task_00000")
    capsys.readouterr()

    # a different recipe into the same output: refused
    assert braid(["data", "prepare", recipe, "shards.row_length=32"]) == 2
    assert "different recipe" in (line := _error_line(capsys)) and "shards.row_length" in line
    # even with overwrite, a run whose corpus ends up empty stops before touching the output
    assert braid(["data", "prepare", recipe, "filters.length.min_chars=1000000", "overwrite=true"]) == 2
    assert "empty corpus: no document survived" in _error_line(capsys)
    # a missing input
    assert braid(["data", "prepare", recipe, "inputs=[{path: /does/not/exist}]"]) == 2
    assert "/does/not/exist not found" in _error_line(capsys)

    assert {p: p.read_bytes() for p in published} == published
    assert _mtimes(out / "train" / "task_00000") == shards
    assert len(read_rows(str(out / "train"))) == json.loads(published[out / "braid_data.json"])["stats"][
        "splits"]["train"]["rows"]


def test_empty_corpus_is_an_error(tmp_path, tokenizer_path, capsys):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jsonl").write_text('{"text": "tiny"}\n{"oops\n')
    assert braid(["data", "prepare", write_recipe(tmp_path, tokenizer_path)]) == 2
    line = _error_line(capsys)
    assert "empty corpus" in line and "1 read" in line and "1 malformed" in line
    assert not (tmp_path / "out" / "braid_data.json").exists() and not (tmp_path / "out" / "train").exists()


# ---------------------------------------------------------------------------- slurm


def test_slurm_executor_from_recipe(tmp_path, tokenizer_path):
    import dill
    from datatrove.executor import SlurmPipelineExecutor

    make_corpus(tmp_path / "corpus", n_good=6)
    recipe = load_recipe(write_recipe(tmp_path, tokenizer_path, executor={
        "type": "slurm", "tasks": 8,
        "slurm": {"partition": "cpu-long", "time": "07:30:00", "cpus_per_task": 4, "mem_per_cpu_gb": 3,
                  "job_name": "tiny", "account": "lm", "setup": ["source /opt/braid/bin/activate"],
                  "env": {"HF_HOME": "/scratch/hf home"}, "sbatch_args": {"exclusive": True}}}))
    executors = build_executors(recipe)
    assert [ex.job_name for ex in executors] == ["tiny-filter", "tiny-dedup", "tiny-check", "tiny-tokenize",
                                                  "tiny-publish"]
    assert [ex.tasks for ex in executors] == [8, 1, 1, 8, 1]
    for i, ex in enumerate(executors):
        assert isinstance(ex, SlurmPipelineExecutor)
        assert (ex.partition, ex.time, ex.cpus_per_task, ex.mem_per_cpu_gb) == ("cpu-long", "07:30:00", 4, 3)
        assert ex.depends is (executors[i - 1] if i else None)
    script = executors[0].get_launch_file_contents(executors[0].get_sbatch_args(8), "launch_pickled_pipeline x")
    for line in ("#SBATCH --partition=cpu-long", "#SBATCH --time=07:30:00", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --mem-per-cpu=3G", "#SBATCH --array=0-7", "#SBATCH --job-name=tiny-filter",
                 "#SBATCH --account=lm", "#SBATCH --exclusive\n", "source /opt/braid/bin/activate",
                 "export HF_HOME='/scratch/hf home'"):
        assert line in script
    assert "#SBATCH --qos" not in script
    dill.loads(dill.dumps(executors[-1]))   # what sbatch runs is this executor, pickled
    assert not (tmp_path / "out" / "train").exists()   # building submits and writes nothing


def test_stdlib_corpus_whole_modules(tmp_path):
    """documents: modules keeps each module whole (the long documents the experiments evaluate on);
    pieces splits it per top-level def/class; the same text either way; a recipe asking for the
    other kind rebuilds the corpus."""
    import itertools

    from data_pipeline.corpus import ensure_corpus, stdlib_documents
    from data_pipeline.recipe import recipe_from_dict

    modules = list(itertools.islice((d for d in stdlib_documents("modules") if "/Lib/" in d["id"]), 40))
    assert all("#" not in d["id"] for d in modules)
    pieces = [d for d in itertools.islice(stdlib_documents("pieces"), 20000) if "/Lib/" in d["id"]]
    for module in modules[:10]:
        mine = [p["text"] for p in pieces if p["id"].split("#")[0] == module["id"]]
        assert len(mine) >= 1
        assert sorted("".join(mine).split()) == sorted(module["text"].split())   # the same text, regrouped
    recipe = {"output": str(tmp_path / "out"), "inputs": [{"path": str(tmp_path / "corpus")}],
              "tokenizer": {"path": str(tmp_path / "tok.json")},
              "corpus": {"path": str(tmp_path / "corpus"), "parts": 1, "documents": "modules"}}
    meta = ensure_corpus(recipe_from_dict(recipe))
    assert meta["document_kind"] == "modules" and meta["documents"] < 1000
    meta = ensure_corpus(recipe_from_dict({**recipe, "corpus": {**recipe["corpus"], "documents": "pieces"}}))
    assert meta["document_kind"] == "pieces" and meta["documents"] > 3000
    with pytest.raises(ValueError, match="^recipe.corpus.documents: 'files' is not one of pieces, modules"):
        recipe_from_dict({**recipe, "corpus": {**recipe["corpus"], "documents": "files"}})
