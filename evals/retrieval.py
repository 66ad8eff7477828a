"""The one runner behind the passkey, niah, ruler and phonebook suites: prompts -> batched greedy
generation -> decoded answers -> scores -> results.json, samples.jsonl and a PNG.

    rows = evaluate(lm, samples, passkey.score, max_new_tokens=10, batch_size=8)
    record = finish(out_dir, "passkey", scores, settings, lm, rows, lambda path: heatmap(path, grid, "..."))

Each prompt starts with the model's end-of-text token when it has one (a document boundary, as in
training) and is sized so that prompt + answer fit the requested length. Prompts are sorted by length
before batching so that a batch pads little.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import Any

from tqdm.auto import tqdm

from evals.common import EvalModel, figure_title, write_results
from evals.tasks import Sample
from model.generation import generate

SAMPLES = "samples.jsonl"


def encode_prompt(lm: EvalModel, text: str) -> list[int]:
    """The prompt's token ids as the model sees them: end-of-text first (if known), then the text."""
    ids = lm.encode(text)
    return [lm.eos_id] + ids if lm.eos_id is not None else ids


def reserve_tokens(lm: EvalModel, max_new_tokens: int) -> int:
    """Tokens of the requested length not available to the prompt text: the answer and the leading eos."""
    return max_new_tokens + (1 if lm.eos_id is not None else 0)


def newline_token_ids(lm: EvalModel) -> list[int]:
    """Every token whose text holds a newline: generation stops there, since each answer is one line."""
    size = min(lm.tokenizer.get_vocab_size(), lm.cfg.vocab_size)
    return [i for i in range(size) if "\n" in lm.tokenizer.decode([i], skip_special_tokens=False)]


def predict(lm: EvalModel, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
            stop_at_newline: bool = True, progress: bool = True, desc: str = "generate") -> list[str]:
    """Greedy continuations of `prompts` (same order), cut at the first newline when asked."""
    encoded = [encode_prompt(lm, p) for p in prompts]
    stops = ([lm.eos_id] if lm.eos_id is not None else []) + (newline_token_ids(lm) if stop_at_newline else [])
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))     # longest first: memory errors early
    predictions: list[str] = [""] * len(encoded)
    with tqdm(total=len(encoded), desc=desc, disable=not progress, unit="prompt") as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            outputs = generate(lm.model, [encoded[i] for i in batch], max_new_tokens, stop_tokens=stops)
            for i, tokens in zip(batch, outputs):
                if tokens and tokens[-1] in stops:
                    tokens = tokens[:-1]
                text = lm.decode(tokens)
                predictions[i] = text.split("\n", 1)[0] if stop_at_newline else text
            bar.update(len(batch))
    return predictions


def evaluate(lm: EvalModel, samples: Sequence[Sample], scorer: Callable[[str, list[str]], float], *,
             max_new_tokens: int, batch_size: int, stop_at_newline: bool = True, progress: bool = True,
             desc: str = "generate") -> list[dict[str, Any]]:
    """One row per sample: its meta, answers, the model's prediction and its score."""
    predictions = predict(lm, [s.prompt for s in samples], max_new_tokens, batch_size, stop_at_newline,
                          progress, desc)
    return [{**s.meta, "answers": s.answers, "prediction": p, "score": scorer(p, s.answers)}
            for s, p in zip(samples, predictions)]


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def group_mean(rows: Sequence[dict[str, Any]], *keys: str) -> dict:
    """Mean score nested by the given meta keys, e.g. group_mean(rows, "length", "depth") ->
    {"1024": {"0.5": 0.8}}; keys become strings, as JSON would make them anyway."""
    if not keys:
        return mean(r["score"] for r in rows)
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(label(row[keys[0]]), []).append(row)
    return {k: group_mean(v, *keys[1:]) for k, v in groups.items()}


def label(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_options(**lists: Sequence[float]) -> None:
    """Every named option must be non-empty and positive (e.g. lengths=[1024], samples=[5])."""
    for name, values in lists.items():
        values = list(values)
        if not values or any(v <= 0 for v in values):
            raise ValueError(f"--{name.replace('_', '-')}: needs positive values, got {values}")


def cell_text_color(rgba: Sequence[float]) -> str:
    """Black or white, whichever reads on a cell of this colour (relative luminance, sRGB weights)."""
    r, g, b = rgba[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


def heatmap(path: str, grid: dict[str, dict[str, float]], title: str) -> None:
    """Accuracy heatmap, depth (rows, 0 at the top) x length (columns), values written in the cells in
    black or white, whichever reads on the cell's colour."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = list(grid)
    depths = sorted({d for row in grid.values() for d in row}, key=float)
    values = [[grid[length].get(d, float("nan")) for length in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.5 * len(depths) + 2.4))
    image = ax.imshow(values, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), lengths)
    ax.set_yticks(range(len(depths)), depths)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for r, row in enumerate(values):
        for c, value in enumerate(row):
            if value != value:                                  # NaN: no sample in this cell
                ax.text(c, r, "n/a", ha="center", va="center", fontsize=8, color="gray")
                continue
            ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color=cell_text_color(image.cmap(image.norm(value))))
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def line_plot(path: str, series: dict[str, dict[str, float]], xlabel: str, ylabel: str, title: str) -> None:
    """One line per series (x values are the dict keys, numeric strings), log-2 x axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, points in series.items():
        xs = sorted(points, key=float)
        ax.plot([float(x) for x in xs], [points[x] for x in xs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def finish(out_dir: str, suite: str, scores: dict[str, Any], settings: dict[str, Any], lm: EvalModel,
           rows: Sequence[dict[str, Any]], figure: Callable[[str], None]) -> dict[str, Any]:
    """Write samples.jsonl (every prediction, for reading failures), the PNG and results.json; return the
    record written."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, SAMPLES), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    png = f"{suite}.png"
    figure(os.path.join(out_dir, png))
    path = write_results(out_dir, suite, scores, {**settings, "decoding": "greedy"}, lm,
                         extra={"figure": png, "samples_file": SAMPLES})
    with open(path) as f:
        return json.load(f)


def add_grid_arguments(parser: Any, max_new_tokens: int) -> None:
    """Options shared by the length x depth suites (passkey, niah)."""
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096],
                        help="context lengths in the model's tokens, answer included")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="needle positions as fractions of the filler (0 = start, 1 = end)")
    add_common_arguments(parser, max_new_tokens, samples=5)
    add_repeat_argument(parser, "within the same length (each copy is shorter)")


def add_repeat_argument(parser: Any, how: str) -> None:
    parser.add_argument("--repeat-context", type=int, default=1,
                        help="JRT-Prompt (Just Read Twice): the question, then the context this many times, "
                             f"then the question, {how}; 1 = the plain prompt")


def repeat_settings(repeat_context: int) -> dict[str, Any]:
    """What results.json says about the prompt format."""
    from evals.tasks import check_copies
    fmt = ("plain: header, context, question" if check_copies(repeat_context) == 1 else
           f"JRT-Prompt: question, header, the context {repeat_context} times, question")
    return {"repeat_context": repeat_context, "prompt_format": fmt}


def add_common_arguments(parser: Any, max_new_tokens: int, samples: int) -> None:
    parser.add_argument("--samples", type=int, default=samples, help="prompts per cell")
    parser.add_argument("--seed", type=int, default=0, help="data seed: the same seed gives the same prompts")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="answer tokens generated")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def grid_samples(lm: EvalModel, task: ModuleType, lengths: Sequence[int], depths: Sequence[float], samples: int,
                 seed: int, max_new_tokens: int, repeat_context: int = 1) -> list[Sample]:
    """task.make_sample for every (length, depth, index), each with its own derived seed."""
    from evals.tasks import check_depth, derive_seed

    check_options(lengths=lengths, samples=[samples], max_new_tokens=[max_new_tokens])
    depths = [check_depth(d) for d in depths]
    if not depths:
        raise ValueError("--depths: needs at least one depth in [0, 1]")
    reserve = reserve_tokens(lm, max_new_tokens)
    name = task.__name__.rsplit(".", 1)[-1]
    return [task.make_sample(lm.count_tokens, length, depth, derive_seed(seed, name, length, depth, i), reserve,
                             repeat_context=repeat_context)
            for length in lengths for depth in depths for i in range(samples)]


def run_grid(lm: EvalModel, out_dir: str, suite: str, task: ModuleType, *, lengths: Sequence[int],
             depths: Sequence[float], samples: int, seed: int, batch_size: int, max_new_tokens: int,
             progress: bool = True, repeat_context: int = 1) -> dict[str, Any]:
    """A length x depth needle suite: accuracy per cell, overall accuracy, heatmap PNG."""
    check_options(batch_size=[batch_size])
    built = grid_samples(lm, task, lengths, depths, samples, seed, max_new_tokens, repeat_context)
    rows = evaluate(lm, built, task.score, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    progress=progress, desc=suite)
    grid = group_mean(rows, "length", "depth")
    scores = {"accuracy": mean(r["score"] for r in rows), "grid": grid}
    settings = {"lengths": list(lengths), "depths": [float(d) for d in depths], "samples": samples, "seed": seed,
                "sample_seeds": "sha256(seed:task:length:depth:index)", "batch_size": batch_size,
                "max_new_tokens": max_new_tokens, "stop": "eos or newline", "bos": "eos" if lm.eos_id is not None
                else None, **repeat_settings(repeat_context), "prompt_tokens": group_mean([{**r, "score": r["prompt_tokens"]} for r in rows], "length")}
    return finish(out_dir, suite, scores, settings, lm, rows,
                  lambda path: heatmap(path, grid, figure_title(f"{suite}: accuracy {scores['accuracy']:.2f}", lm)))
