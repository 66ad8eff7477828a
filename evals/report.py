"""`braid eval report MODEL`: a run's (or converted folder's) eval results on one Markdown page.

Reads MODEL/evals/SUITE/results.json (suites run by hand) and MODEL/evals/step_*/SUITE/results.json
(suites run by training's eval hooks), and writes MODEL/evals/REPORT.md: per suite the headline
numbers, its tables (length x depth grids, per-length task scores), its settings and provenance,
and its plots; then, for the hooks, each headline number against the training step.
"""
from __future__ import annotations

import json
import os
from typing import Any

from evals.cli import headline_scores


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(rows: dict[str, dict[str, Any]], corner: str) -> list[str]:
    """A Markdown table of {row: {column: number}}; rows missing a column get a blank."""
    columns = list(dict.fromkeys(c for row in rows.values() for c in row))
    lines = [f"| {corner} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_number(row.get(c, "")) for c in columns) + " |")
    return lines


def _nested_tables(scores: dict[str, Any]) -> list[str]:
    """Every score that is a {row: {column: number}} mapping (grids, per-length tables) as a table."""
    lines: list[str] = []
    for key, value in scores.items():
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            if all(isinstance(x, (int, float)) for v in value.values() for x in v.values()):
                lines += ["", f"`{key}`:", "", *_table(value, "")]
    return lines


def find_results(root: str) -> tuple[dict[str, str], dict[int, dict[str, str]]]:
    """({suite: results.json} run by hand, {step: {suite: results.json}} from the training hooks)."""
    manual: dict[str, str] = {}
    hooks: dict[int, dict[str, str]] = {}
    if not os.path.isdir(root):
        return manual, hooks
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if name.startswith("step_") and os.path.isdir(folder):
            for suite in sorted(os.listdir(folder)):
                path = os.path.join(folder, suite, "results.json")
                if os.path.isfile(path):
                    hooks.setdefault(int(name.removeprefix("step_")), {})[suite] = path
        elif os.path.isfile(os.path.join(folder, "results.json")):
            manual[name] = os.path.join(folder, "results.json")
    return manual, hooks


def render(root: str, base: str | None = None) -> str:
    """The Markdown page; plot links are relative to `base` (the report's folder, default root)."""
    manual, hooks = find_results(root)
    if not manual and not hooks:
        raise FileNotFoundError(f"{root}: no results.json under it (run `braid eval SUITE MODEL` first)")
    lines = [f"# Evaluation report: {os.path.dirname(os.path.abspath(root))}", ""]
    for suite, path in manual.items():
        with open(path) as f:
            record = json.load(f)
        prov = record.get("provenance", {})
        lines += [f"## {suite}", "",
                  f"checkpoint `{prov.get('checkpoint') or prov.get('model')}` (step {prov.get('step')}), "
                  f"written {record.get('created')}", ""]
        headline = headline_scores(suite, record.get("scores", {}))
        if headline:
            lines += _table({"value": headline}, "score")
        lines += _nested_tables(record.get("scores", {}))
        settings = {k: v for k, v in record.get("settings", {}).items() if not isinstance(v, (dict, list)) or
                    len(json.dumps(v)) < 120}
        lines += ["", "Settings: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in settings.items()), ""]
        folder = os.path.dirname(path)
        for image in sorted(f for f in os.listdir(folder) if f.endswith(".png")):
            lines += [f"![{suite}: {image}]({os.path.relpath(os.path.join(folder, image), base or root)})", ""]
    if hooks:
        lines += ["## During training (eval hooks)", ""]
        rows: dict[str, dict[str, Any]] = {}
        for step in sorted(hooks):
            row: dict[str, Any] = {}
            for suite, path in hooks[step].items():
                with open(path) as f:
                    for metric, value in headline_scores(suite, json.load(f).get("scores", {})).items():
                        row[f"{suite}/{metric}"] = value
            rows[str(step)] = row
        lines += _table(rows, "step") + [""]
    return "\n".join(lines)


def write_report(model: str, out: str | None = None) -> str:
    """Write the report (default MODEL/evals/REPORT.md) and return its path."""
    root = os.path.join(model, "evals")
    path = os.path.abspath(out or os.path.join(root, "REPORT.md"))
    text = render(root, os.path.dirname(path))
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path
