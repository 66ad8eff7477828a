"""The documentation stands alone and agrees with the code: every config key is documented, every
link and named file exists in the repository, and nothing points outside it."""
import dataclasses
import os
import re
import subprocess
import typing

import pytest

from conftest import REPO


def _config_keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted keys of a config dataclass tree (`model.attn.window`); list entries as `inputs[].path`."""
    keys, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        kind, name = hints[f.name], prefix + f.name
        inner = [a for a in (kind, *typing.get_args(kind)) if dataclasses.is_dataclass(a)]
        if typing.get_origin(kind) is list and inner:
            keys.append(name)
            keys += _config_keys(inner[0], name + "[].")
        elif inner:
            keys += _config_keys(inner[0], name + ".")
        else:
            keys.append(name)
    return keys


def _tracked() -> set[str]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_every_config_key_is_documented():
    from data_pipeline.recipe import Recipe
    from pretrain.config import TrainConfig
    with open(os.path.join(REPO, "docs", "config.md")) as f:
        documented = set(re.findall(r"`([A-Za-z_][\w.\[\]]*)`", f.read()))
    missing = [k for k in _config_keys(TrainConfig) + _config_keys(Recipe) if k not in documented]
    assert not missing, f"docs/config.md lacks: {', '.join(missing)}"


def test_config_key_walk_sees_nested_and_list_sections():
    from data_pipeline.recipe import Recipe
    from pretrain.config import TrainConfig
    keys = _config_keys(TrainConfig)
    assert {"model.attn.window", "launch.slurm.env", "data.train[].proportion", "evals.suites"} <= set(keys)
    assert {"inputs[].text_key", "executor.slurm.mem_per_cpu_gb"} <= set(_config_keys(Recipe))


@pytest.mark.parametrize("doc", ["README.md", "BENCHMARKS.md", "docs/design.md", "docs/config.md",
                                 "configs/data/README.md"])
def test_links_resolve_inside_the_repository(doc):
    tracked = _tracked()
    with open(os.path.join(REPO, doc)) as f:
        text = f.read()
    assert "../shared" not in text, f"{doc} points outside the repository"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path = os.path.normpath(os.path.join(os.path.dirname(doc), target))
        assert not path.startswith(".."), f"{doc}: link {target} leaves the repository"
        assert path in tracked or any(t.startswith(path + "/") for t in tracked), f"{doc}: link {target} is not tracked"


def test_files_named_by_readme_makefile_and_ci_are_tracked():
    """A fresh clone has only tracked files: a config the README or CI names must not be ignored."""
    tracked = _tracked()
    names = set()
    for doc in ("README.md", "Makefile", ".ci/run", ".ci/smoke"):
        with open(os.path.join(REPO, doc)) as f:
            names |= set(re.findall(r"(?<![\w/.])((?:configs|docs|benchmarks|evals|data_pipeline|\.ci)/"
                                    r"[\w./-]+\.(?:ya?ml|md|json|jsonl|py|txt))", f.read()))
    assert names, "the pattern found no file names"
    missing = sorted(n for n in names if n not in tracked)
    assert not missing, f"named but not tracked by git (check .gitignore): {', '.join(missing)}"
