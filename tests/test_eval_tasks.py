"""Synthetic long-context suites (passkey, niah, ruler, phonebook): generators, scorers, runner."""
import collections
import json
import os
import re

import pytest

from evals import niah, passkey, phonebook, retrieval, ruler
from evals.tasks import niah as niah_task
from evals.tasks import passkey as passkey_task
from evals.tasks import phonebook as phonebook_task
from evals.tasks import ruler as ruler_tasks

RESERVE = 10
# (generator name, length): the tiny test BPE spends many tokens on words it never saw, so the RULER
# tasks with one-shot examples need longer contexts.
LENGTHS = {"passkey": 256, "niah": 512, "niah_single_1": 512, "niah_multikey_2": 512, "niah_multikey_3": 1024,
           "vt": 2048, "cwe": 2048, "fwe": 1024}
GENERATORS = [*LENGTHS, "phonebook"]


def make(name, lm, seed, length=None, depth=0.5):
    length = length or LENGTHS.get(name)
    if name == "passkey":
        return passkey_task.make_sample(lm.count_tokens, length, depth, seed, RESERVE), passkey_task.score
    if name == "niah":
        return niah_task.make_sample(lm.count_tokens, length, depth, seed, RESERVE), niah_task.score
    if name == "phonebook":
        return phonebook_task.make_sample(lm.count_tokens, 12, seed), phonebook_task.score
    return ruler_tasks.make_sample(name, lm.count_tokens, length, seed, RESERVE), ruler_tasks.score


def solve(name, sample):
    """Answer from the prompt alone, as a perfect reader would: checks that the answers are right."""
    prompt = sample.prompt
    if name == "passkey":
        return re.search(r"The pass key is (\d{5})\. Remember it", prompt).group(1)
    if name == "niah":
        key = re.search(r"What is the special magic number for (\w+)", prompt).group(1)
        return re.search(rf"The special magic number for {key} is (\d+)\.", prompt).group(1)
    if name.startswith("niah_"):
        key = re.search(r"What is the special magic \w+ for (\S+) mentioned", prompt).group(1)
        return re.search(rf"for {re.escape(key)} is: (\S+)\.\n", prompt).group(1)
    if name == "phonebook":
        person = re.search(r"What is the phone number of (.+)\?", prompt).group(1)
        return re.search(rf"^{person}: (\S+)$", prompt, re.M).group(1)
    if name == "vt":
        question = prompt.rsplit("Memorize and track", 1)[1]          # the real instance, not the example
        value = re.search(r"assigned the value (\d+) in the text above", question).group(1)
        assigned = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)", question))
        holds = {v for v, rhs in assigned.items() if rhs == value}
        while True:
            more = {v for v, rhs in assigned.items() if rhs.startswith("VAR ") and rhs[4:] in holds} - holds
            if not more:
                return " ".join(sorted(holds))
            holds |= more
    if name == "cwe":
        listing = prompt.rsplit("Below is a numbered list", 1)[1].split("\nQuestion:")[0]
        counts = collections.Counter(re.findall(r"\d+\. (\w+)", listing))
        return " ".join(w for w, _ in counts.most_common(10))
    if name == "fwe":
        text = prompt.split("coded words. ", 1)[1].split("\nQuestion:")[0]
        counts = collections.Counter(w for w in text.split() if w != "...")
        return " ".join(w for w, _ in counts.most_common(3))
    raise AssertionError(name)


def wrong(answer: str) -> str:
    """Every digit and letter shifted: same shape, no shared answer."""
    return "".join(chr((ord(c) - 48 + 1) % 10 + 48) if c.isdigit() else
                   ("b" if c == "a" else "a") if c.isalpha() else c for c in answer)


@pytest.mark.parametrize("name", GENERATORS)
def test_answers_are_what_a_perfect_reader_finds(eval_model, name):
    sample, score = make(name, eval_model, seed=3)
    answer = solve(name, sample)
    assert sorted(answer.split()) == sorted(" ".join(sample.answers).split())
    assert score(f" {answer}.", sample.answers) == 1.0
    assert score(" " + " ".join(wrong(a) for a in sample.answers), sample.answers) == 0.0
    assert score("", sample.answers) == 0.0


@pytest.mark.parametrize("name", GENERATORS)
def test_same_seed_same_prompt(eval_model, name):
    first, second, other = (make(name, eval_model, seed)[0] for seed in (7, 7, 8))
    assert first.prompt == second.prompt and first.answers == second.answers
    assert other.prompt != first.prompt


@pytest.mark.parametrize("name,length", [("passkey", 256), ("passkey", 1024), ("niah", 1024), ("niah", 2048),
                                         ("niah_single_1", 1024), ("niah_multikey_2", 2048),
                                         ("niah_multikey_3", 2048), ("vt", 4096), ("cwe", 3072), ("fwe", 2048)])
def test_prompt_fills_the_length(eval_model, name, length):
    sample, _ = make(name, eval_model, seed=1, length=length)
    tokens = eval_model.count_tokens(sample.prompt)
    assert tokens == sample.meta["prompt_tokens"]
    assert 0.8 * (length - RESERVE) <= tokens <= length - RESERVE


@pytest.mark.parametrize("task", [passkey_task, niah_task])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_needle_at_requested_depth(eval_model, task, depth):
    sample = task.make_sample(eval_model.count_tokens, 1024, depth, 5, RESERVE)
    start, end = sample.meta["haystack_span"]
    at = sample.meta["needle_char"]
    needle = sample.meta["needle"]
    assert sample.prompt[at:at + len(needle)] == needle and sample.answers[0] in needle
    before = eval_model.count_tokens(sample.prompt[start:at])
    after = eval_model.count_tokens(sample.prompt[at + len(needle):end])
    assert abs(before / (before + after) - depth) < 0.05


def test_ruler_string_match_all_counts_each_reference():
    assert ruler_tasks.score("Answer: ABCDE, fghij", ["abcde", "FGHIJ", "KLMNO", "PQRST"]) == 0.5
    assert ruler_tasks.zeta(2.0) == pytest.approx(1.6449340668, abs=1e-8)


def test_bad_options_name_the_option(eval_model, tmp_path):
    count = eval_model.count_tokens
    with pytest.raises(ValueError, match="--depths"):
        passkey_task.make_sample(count, 1024, 1.5, 0)
    with pytest.raises(ValueError, match="--lengths"):
        niah_task.make_sample(count, 64, 0.5, 0)
    with pytest.raises(ValueError, match="--tasks"):
        ruler.run(eval_model, str(tmp_path), lengths=[1024], tasks=["qa_1"])
    with pytest.raises(ValueError, match="--entries"):
        phonebook_task.make_sample(count, 0, 0)
    with pytest.raises(ValueError, match="--lengths"):
        passkey.run(eval_model, str(tmp_path), lengths=[0])
    assert not os.path.exists(tmp_path / "results.json")


SUITES = {"passkey": passkey, "niah": niah, "ruler": ruler, "phonebook": phonebook}


def sample_count(name, options):
    """How many prompts a suite's options ask for, counted from the options alone."""
    if name in ("passkey", "niah"):
        return len(options["lengths"]) * len(options["depths"]) * options["samples"]
    if name == "ruler":
        return len(options["lengths"]) * len(ruler_tasks.TASKS) * options["samples"]
    return len(options["entries"]) * options["samples"]


def expected_samples(suite, lm, options=None):
    options = options or suite.SMOKE
    if suite is passkey or suite is niah:
        task = passkey_task if suite is passkey else niah_task
        return retrieval.grid_samples(lm, task, options["lengths"], options["depths"], options["samples"], 0,
                                      task.MAX_NEW_TOKENS)
    if suite is ruler:
        return ruler.build_samples(lm, options["lengths"], list(ruler_tasks.TASKS), options["samples"], 0,
                                   options["max_new_tokens"])
    return phonebook.build_samples(lm, options["entries"], options["samples"], 0)


@pytest.mark.parametrize("name", SUITES)
def test_suite_smoke_run_writes_results_and_png(eval_model, tmp_path, name):
    suite = SUITES[name]
    assert suite.SUITE == name
    record = suite.run(eval_model, str(tmp_path), **suite.SMOKE)
    assert (tmp_path / "results.json").stat().st_size > 0
    assert record["suite"] == name and record["provenance"] == eval_model.provenance
    assert record["settings"]["decoding"] == "greedy" and record["settings"]["seed"] == 0
    with open(tmp_path / f"{name}.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    scores = record["scores"]
    smoke = suite.SMOKE
    if name in ("passkey", "niah"):
        assert set(scores) == {"accuracy", "grid"}
        assert list(scores["grid"]) == [str(n) for n in smoke["lengths"]]
        assert all(list(row) == [f"{d:g}" for d in smoke["depths"]] for row in scores["grid"].values())
    elif name == "ruler":
        assert set(scores) == {"average", "per_length"}
        assert set(scores["per_length"][str(smoke["lengths"][0])]) == {*ruler_tasks.TASKS, "average"}
    else:
        assert list(scores["accuracy_by_entries"]) == [str(n) for n in smoke["entries"]]
    with open(tmp_path / "samples.jsonl") as f:
        assert len(f.readlines()) == sample_count(name, smoke)


def test_heatmap_labels_read_on_their_cells_and_titles_name_the_model(eval_model, tmp_path, monkeypatch):
    import matplotlib
    from matplotlib import colormaps

    from evals.common import model_label
    matplotlib.use("Agg")
    colours = colormaps["RdYlGn"]
    assert retrieval.cell_text_color(colours(0.0)) == "white"        # dark red: a black label would not read
    assert retrieval.cell_text_color(colours(1.0)) == "white"        # dark green
    assert retrieval.cell_text_color(colours(0.5)) == "black"        # yellow
    drawn = {}

    def capture(ax_text):
        def text(self, x, y, s, **kwargs):
            drawn.setdefault("cells", []).append((s, kwargs.get("color")))
            return ax_text(self, x, y, s, **kwargs)
        return text
    from matplotlib.axes import Axes
    monkeypatch.setattr(Axes, "text", capture(Axes.text))
    retrieval.heatmap(str(tmp_path / "h.png"), {"64": {"0": 0.0, "0.5": 0.5}, "128": {"0": 1.0, "0.5": 0.95}},
                      "passkey: accuracy 0.61\nrun, step 800, M-S-")
    assert drawn["cells"] == [("0.00", "white"), ("1.00", "white"), ("0.50", "black"), ("0.95", "white")]

    titles = []
    monkeypatch.setattr(retrieval, "heatmap", lambda path, grid, title: titles.append(title))
    lm = type(eval_model)(model=eval_model.model, tokenizer=eval_model.tokenizer, eos_id=0, train_length=64,
                          provenance={"model": str(tmp_path / "runs" / "samba" / "checkpoints" / "step_00000800"),
                                      "step": 800, "pattern": eval_model.cfg.pattern})
    assert model_label(lm) == f"samba, step 800, {eval_model.cfg.pattern}"
    passkey.run(lm, str(tmp_path / "out"), **passkey.SMOKE)
    assert titles[0].startswith("passkey: accuracy ") and titles[0].endswith(f"\nsamba, step 800, {eval_model.cfg.pattern}")


@pytest.mark.parametrize("name", SUITES)
def test_oracle_model_scores_100_percent(eval_model, tmp_path, monkeypatch, name):
    """generate() replaced by a model that knows each prompt's answer: the runner must score 1.0, so
    prompts reach the model intact, continuations are decoded and matched to the right sample."""
    suite, lm = SUITES[name], eval_model
    options = {**suite.SMOKE, **({"max_new_tokens": 64} if name == "ruler" else {})}   # room for uuids
    answers = {tuple(retrieval.encode_prompt(lm, s.prompt)): s.answers
               for s in expected_samples(suite, lm, options)}
    newline = retrieval.newline_token_ids(lm)[0]
    calls = []

    def oracle(model, prompts, max_new_tokens, stop_tokens=()):
        calls.append(len(prompts))
        assert newline in set(stop_tokens) and lm.eos_id in set(stop_tokens)
        assert all(tuple(p) in answers for p in prompts), "a prompt the suite should not have built"
        return [(lm.encode(" " + " ".join(answers[tuple(p)])) + [newline, 5, 6])[:max_new_tokens] for p in prompts]

    monkeypatch.setattr(retrieval, "generate", oracle)
    record = suite.run(lm, str(tmp_path), **options)
    overall = record["scores"]["average" if name == "ruler" else "accuracy"]
    assert overall == 1.0
    assert len(answers) == sample_count(name, options)      # distinct prompts, as many as asked for
    assert max(calls) <= suite.SMOKE["batch_size"] and sum(calls) == len(answers)

    monkeypatch.setattr(retrieval, "generate", lambda model, prompts, n, stop_tokens=(): [[newline]] * len(prompts))
    record = suite.run(lm, str(tmp_path), **options)
    assert record["scores"]["average" if name == "ruler" else "accuracy"] == 0.0


@pytest.mark.parametrize("name", SUITES)
def test_cli_options_are_run_keywords(name):
    """`braid eval SUITE` passes the parsed options to run(): every dest must be a keyword of run()."""
    import argparse
    import inspect

    suite = SUITES[name]
    parser = argparse.ArgumentParser()
    suite.add_arguments(parser)
    options = vars(parser.parse_args([]))
    keywords = set(inspect.signature(suite.run).parameters) - {"lm", "out_dir"}
    assert set(options) == keywords and set(suite.SMOKE) <= keywords
    assert options["seed"] == 0 and options["progress"] is True


# ---- JRT-Prompt (repeat_context) ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["passkey", "niah", "phonebook"])
def test_repeat_context_is_jrt_prompt(eval_model, name):
    """repeat_context=2: the question first, the context twice, the question last; the same answer,
    still found by a perfect reader; passkey/niah stay within the length, the phonebook doubles."""
    count = eval_model.count_tokens
    if name == "phonebook":
        once, twice = (phonebook_task.make_sample(count, 12, 4, repeat_context=n) for n in (1, 2))
        lines = once.prompt.split("\n\n")[1]
        assert twice.prompt.count(lines) == 2 and once.prompt.count(lines) == 1
        assert twice.meta["prompt_tokens"] > 1.8 * once.meta["prompt_tokens"]
    else:
        task = passkey_task if name == "passkey" else niah_task
        once, twice = (task.make_sample(count, 1024, 0.5, 4, RESERVE, repeat_context=n) for n in (1, 2))
        assert twice.prompt.count(twice.meta["needle"]) == 2 and once.prompt.count(once.meta["needle"]) == 1
        assert twice.meta["prompt_tokens"] <= 1024 - RESERVE and once.meta["prompt_tokens"] <= 1024 - RESERVE
        start, end = twice.meta["haystack_span"]
        assert twice.prompt[start:end].count(twice.meta["needle"]) == 2
    question = once.prompt.rsplit("\n", 1)[1]
    assert twice.prompt.endswith(question) and twice.prompt.startswith(question.split("?")[0] + "?\n")
    assert not once.prompt.startswith(question.split("?")[0])
    assert twice.answers == once.answers and twice.meta["repeat_context"] == 2
    assert solve(name, twice) == twice.answers[0]
    with pytest.raises(ValueError, match="^--repeat-context"):
        phonebook_task.make_sample(count, 12, 4, repeat_context=0)


def test_phonebook_suite_with_repeat_context(eval_model, tmp_path):
    record = phonebook.run(eval_model, str(tmp_path), entries=[4], samples=2, batch_size=2, progress=False,
                           repeat_context=2)
    assert record["settings"]["repeat_context"] == 2 and record["settings"]["prompt_format"].startswith("JRT")
    rows = [json.loads(line) for line in open(tmp_path / retrieval.SAMPLES)]
    assert all(r["repeat_context"] == 2 for r in rows)
    plain = phonebook.build_samples(eval_model, [4], 2, 0)
    assert [r["name"] for r in rows] == [s.meta["name"] for s in plain]     # the same questions
