"""The bundled corpus for tiny runs: the Python standard library of the running interpreter, as JSONL.

Real text, available offline on every machine, PSF-licensed (the licence is copied next to the data):
  * the reference documentation shipped as `pydoc_data.topics` (prose, one document per topic);
  * the source of every stdlib module (docstrings, comments and code), one document per top-level
    function or class (with its decorators and the comment block above it) plus one document for
    the rest of each module (module docstring, imports, constants); or, with `documents="modules"`,
    one document per whole module, source order kept (long documents: a few hundred are longer than
    4096 tokens, for perplexity far past a short training length).

Tests, IDLE, lib2to3, distutils, encodings (code tables) and site-packages are left out. Order is
deterministic (sorted paths, source order), and the .gz files carry no timestamp, so one Python
version always gives byte-identical output; another version gives a slightly different corpus.
About 9 MB of text with CPython 3.11.

    python -m data_pipeline.corpus OUT_DIR [--parts N]
"""
from __future__ import annotations

import argparse
import ast
import gzip
import json
import os
import platform
import shutil
import sys
import sysconfig
from collections.abc import Iterator

from data_pipeline.recipe import Recipe, resolve_path

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "lib2to3", "distutils",
              "encodings", "ensurepip", "turtledemo", "__pycache__"}
META = "meta.json"


def _stdlib_files(root: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")]
        found += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith(".py")]
    return sorted(found)


def _module_documents(source: str) -> Iterator[tuple[str, str]]:
    """(name, text) per top-level def/class, then the rest of the module as one document."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    taken = [False] * len(lines)
    pieces = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        while first > 0 and lines[first - 1].lstrip().startswith("#"):   # the comment block that introduces it
            first -= 1
        pieces.append((node.name, first, node.end_lineno))
        for i in range(first, node.end_lineno):
            taken[i] = True
    rest = "".join(line for line, used in zip(lines, taken) if not used).strip("\n")
    if rest.strip():
        yield "<module>", rest + "\n"
    for name, first, last in pieces:
        yield name, "".join(lines[first:last])


def stdlib_documents(documents: str = "pieces") -> Iterator[dict]:
    """Every corpus document, in a deterministic order; `documents`: pieces (per def/class) or modules."""
    version = platform.python_version()
    root = sysconfig.get_paths()["stdlib"]
    try:
        from pydoc_data.topics import topics
    except ImportError:   # some distributions strip it; the code part is still plenty
        topics = {}
    for name in sorted(topics):
        yield {"id": f"python-{version}/docs/{name}", "text": topics[name].strip() + "\n",
               "url": f"https://docs.python.org/{version.rsplit('.', 1)[0]}/reference/#{name}"}
    for rel in _stdlib_files(root):
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                source = f.read()
            pieces = list(_module_documents(source))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue   # a handful of files are templates or other encodings
        if documents == "modules":
            if source.strip():
                yield {"id": f"python-{version}/Lib/{rel}", "text": source,
                       "url": f"https://github.com/python/cpython/blob/v{version}/Lib/{rel}"}
            continue
        for name, text in pieces:
            yield {"id": f"python-{version}/Lib/{rel}#{name}", "text": text,
                   "url": f"https://github.com/python/cpython/blob/v{version}/Lib/{rel}"}


def _write_gzip(path: str, text: str) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(text.encode("utf-8"))   # no name or timestamp in the header: reproducible bytes


def build_corpus(out_dir: str, parts: int = 4, documents: str = "pieces") -> dict:
    """Write `parts` files part-0000.jsonl.gz ... of about equal size, a meta.json and the PSF licence."""
    out_dir = resolve_path(out_dir)
    docs = list(stdlib_documents(documents))
    lines = [json.dumps(d, ensure_ascii=False) + "\n" for d in docs]
    total = sum(len(line) for line in lines)
    tmp = f"{out_dir}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    # contiguous ranges keep the document order; part k ends once k+1 parts' worth of bytes are written
    bounds = [total * (k + 1) / parts for k in range(parts)]
    part, written, chunk = 0, 0, []
    for line in lines + [None]:
        if line is None or (written >= bounds[part] and part < parts - 1 and chunk):
            _write_gzip(os.path.join(tmp, f"part-{part:04d}.jsonl.gz"), "".join(chunk))
            part, chunk = part + 1, []
        if line is not None:
            chunk.append(line)
            written += len(line)
    licence = os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")
    if os.path.isfile(licence):
        shutil.copyfile(licence, os.path.join(tmp, "LICENSE-PSF.txt"))
    meta = {"builder": "python_stdlib", "document_kind": documents, "python": platform.python_version(),
            "documents": len(docs),
            "chars": sum(len(d["text"]) for d in docs), "files": part,
            "license": "PSF-2.0 (Python Software Foundation License; see LICENSE-PSF.txt)"}
    with open(os.path.join(tmp, META), "w") as f:
        json.dump(meta, f, indent=2)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    os.rename(tmp, out_dir)
    return meta


def ensure_corpus(recipe: Recipe) -> dict | None:
    """Build the recipe's bundled corpus if it has one and it is not there yet; return its meta."""
    if recipe.corpus is None:
        return None
    out_dir = resolve_path(recipe.corpus.path)
    meta_path = os.path.join(out_dir, META)
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("document_kind", "pieces") == recipe.corpus.documents:
            return meta
        print(f"braid: {out_dir} holds {meta.get('document_kind', 'pieces')} documents, the recipe asks for "
              f"{recipe.corpus.documents}: rebuilding it", file=sys.stderr)
    print(f"braid: building the {recipe.corpus.builder} corpus in {out_dir}", file=sys.stderr)
    return build_corpus(out_dir, recipe.corpus.parts, recipe.corpus.documents)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("--documents", choices=("pieces", "modules"), default="pieces")
    args = parser.parse_args(argv)
    print(json.dumps(build_corpus(args.out_dir, args.parts, args.documents), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
