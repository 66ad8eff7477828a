"""The one place that imports mosaicml-streaming (MDS shards, `StreamingDataset`).

Why this module exists: `import streaming` runs `streaming/__init__.py`, which imports
`streaming.vision` (torchvision: no CPU build on the registry), `streaming.text` and,
through `streaming/base/__init__.py`, `streaming.base.dataloader` (transformers). Braid
needs none of them, only the MDS writer/reader, `Stream`, `StreamingDataset` and a few
utilities. So, unless `streaming` was already imported by someone else, we register the
two package modules `streaming` and `streaming.base` ourselves, pointing at the installed
package folders but *without running their `__init__.py`*, and then import just the
submodules we use. Any other attribute of those packages (`streaming.vision`,
`streaming.base.StreamingDataLoader`, ...) is imported lazily on first access, so code that
does want them still gets the real thing (and its real import error on a CPU machine).

Everything else in Braid imports streaming's classes from here, never from `streaming`.

Also here, because they depend on streaming's shared-memory naming:
`clean_stale_shared_memory`, a variant of streaming's function of that name that removes
only the shared memory of dead runs, and `hold_shared_memory`, which marks a dataset's
shared memory as alive (see their docstrings).
"""
from __future__ import annotations

import fcntl
import importlib
import importlib.machinery
import importlib.util
import os
import re
import sys
import tempfile
import types
import weakref
from typing import IO


def _register_package_without_init(name: str, path: str) -> None:
    """Put package `name` (folder `path`) in sys.modules without executing its __init__.py.

    Submodules (`streaming.base.dataset`) import alone, as usual. The first access to any
    other attribute runs the real __init__.py into the module (PEP 562 `__getattr__`), so
    code that wants e.g. `streaming.vision` gets the real package, or its real import error.
    """
    module = types.ModuleType(name, f"{name}: registered by data_pipeline.mds; __init__.py deferred")
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__spec__.submodule_search_locations = [path]
    module.__path__ = [path]
    module.__package__ = name
    module.__file__ = os.path.join(path, "__init__.py")

    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if importlib.util.find_spec(f"{name}.{attr}") is not None:   # a submodule: import just it
            return importlib.import_module(f"{name}.{attr}")
        del module.__getattr__            # run the real __init__ only once
        with open(module.__file__) as source:
            exec(compile(source.read(), module.__file__, "exec"), module.__dict__)
        return getattr(module, attr)

    module.__getattr__ = __getattr__
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)


def _load_streaming() -> None:
    if "streaming" in sys.modules:      # already imported (e.g. with torchvision present): reuse it
        return
    spec = importlib.util.find_spec("streaming")   # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("mosaicml-streaming is not installed; on CPU install it with --no-deps "
                          "(see DESIGN.md, Install facts)")
    root = list(spec.submodule_search_locations)[0]
    _register_package_without_init("streaming", root)
    _register_package_without_init("streaming.base", os.path.join(root, "base"))


_load_streaming()

# Only submodules that import neither torchvision nor transformers.
from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, LOCALS, SHM_TO_CLEAN  # noqa: E402
from streaming.base.dataset import StreamingDataset  # noqa: E402
from streaming.base.format import MDSWriter, get_index_basename  # noqa: E402
from streaming.base.hashing import get_hash  # noqa: E402
from streaming.base.stream import Stream  # noqa: E402
from streaming.base.util import merge_index  # noqa: E402
from streaming.base.world import World  # noqa: E402
from streaming.base.shared import memory as _streaming_memory  # noqa: E402

__all__ = ["MDSWriter", "StreamingDataset", "Stream", "World", "merge_index", "get_hash",
           "get_index_basename", "clean_stale_shared_memory", "hold_shared_memory"]



_untracked: set[str] = set()     # block names this process has unregistered from its resource tracker


def _release_shared_memory(self: _streaming_memory.SharedMemory) -> None:
    """streaming's `SharedMemory.cleanup` (run at exit), made exact about the resource tracker.

    A process registers every block it creates with its resource tracker (a set of names), and
    streaming unregisters it by unlinking the name at exit. But `clean_stale_shared_memory` reclaims
    the blocks of datasets a process has dropped (each validation builds new loaders), and a reused
    prefix creates a block of the same name again: then one unlink finds the name gone (the block
    stays registered: the tracker prints "leaked shared_memory" and a "No such file" line per block)
    or two cleanups unregister one name twice (a KeyError traceback in the tracker). Here each name
    is unregistered exactly once, whoever removed it.
    """
    from multiprocessing import resource_tracker
    for shm in self.created_shms:
        shm.close()
        try:
            shm.unlink()                 # unregisters too
            _untracked.add(shm._name)
        except FileNotFoundError:
            if shm._name not in _untracked:
                resource_tracker.unregister(shm._name, "shared_memory")
                _untracked.add(shm._name)
    for shm in self.opened_shms:        # attached, never registered (streaming skips it): close only
        shm.close()
    self.created_shms, self.opened_shms = [], []


_streaming_memory.SharedMemory.cleanup = _release_shared_memory

_SHM_DIR = "/dev/shm"
# streaming names every shared-memory block "{prefix:06}_{name}" (streaming.base.shared.prefix)
_SHM_NAME = re.compile(r"^(\d{6})_(%s)$" % "|".join(map(re.escape, SHM_TO_CLEAN)))
# ... and its lock files "{prefix:06}_{name}" in the temp folder
_LOCK_NAME = re.compile(r"^(\d{6})_(%s)$" % "|".join(map(re.escape, (BARRIER_FILELOCK, CACHE_FILELOCK))))
# ours: held (shared) by every process using a prefix, see hold_shared_memory()
_OWNER_LOCK = os.path.join(_SHM_DIR, "braid_streaming_{}.lock")
_OWNER_NAME = re.compile(r"^braid_streaming_(\d{6})\.lock$")
_held: dict[int, IO[str]] = {}       # id(dataset) -> its open owner lock file


def _locals_inode(prefix: str) -> str | None:
    """Identity of one incarnation of a prefix: the inode of its `locals` block."""
    try:
        return str(os.stat(os.path.join(_SHM_DIR, f"{prefix}_{LOCALS}")).st_ino)
    except FileNotFoundError:
        return None


def hold_shared_memory(dataset: StreamingDataset) -> None:
    """Mark the dataset's shared memory as in use for as long as this process (or a worker
    forked from it) keeps the dataset: a shared flock on /dev/shm/braid_streaming_<prefix>.lock,
    which the kernel drops when they die. The file records which incarnation of the prefix
    it guards (prefix numbers are reused), as the inode of its `locals` block.

    Call it right after constructing a StreamingDataset, before another job can clean up.
    """
    if not os.path.isdir(_SHM_DIR):
        return
    prefix = f"{dataset._shm_prefix_int:06}"
    handle = open(_OWNER_LOCK.format(prefix), "a+")
    fcntl.flock(handle, fcntl.LOCK_SH)
    handle.seek(0)
    incarnation = _locals_inode(prefix)
    if handle.readline().strip() != incarnation:    # a file left by an earlier incarnation
        handle.truncate(0)
        handle.write(f"{incarnation}\n")        # appends: peers writing alike leave equal lines
        handle.flush()
    # Kept beside the dataset, not in it (a dataset must stay picklable for spawned workers);
    # closed, so released, when the dataset is collected.
    _held[id(dataset)] = handle
    weakref.finalize(dataset, lambda key=id(dataset): _held.pop(key).close())


def _mapped_shared_memory() -> set[str]:
    """Names of /dev/shm blocks mapped by a live process of this user (other users cannot
    map ours: Python creates them with mode 0600)."""
    in_use: set[str] = set()
    marker = _SHM_DIR + "/"
    uid = os.getuid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    at = line.find(marker)
                    if at != -1:
                        in_use.add(line[at + len(marker):].split()[0])
        except OSError:   # the process is gone meanwhile
            continue
    return in_use


def clean_stale_shared_memory() -> list[str]:
    """Remove streaming's shared memory (and lock files) left behind by killed runs.

    A run killed whole (SIGKILL to the job, the OOM killer) leaves its StreamingDatasets'
    blocks in /dev/shm. A later run over the same (remote, local) pair then fails with
    "Reused local directory" (once the old lock files are gone, e.g. with a per-job TMPDIR),
    and leftover lock files make new runs skip prefixes. streaming's own
    `clean_stale_shared_memory()` unlinks every prefix, including those of runs still alive
    on the machine (another job, another pytest worker), which breaks them. Here a prefix is
    removed only when it is dead:
      - prefixes of Braid processes: nobody holds its `hold_shared_memory` lock. (Mapping is
        no proof of life: streaming maps the blocks of every prefix it scans at start.)
      - other prefixes (no lock file for this incarnation): no live process maps any of its
        blocks (Linux /proc).
    Unlinking only removes names; a process that still maps a block keeps it. Call it where
    no other Braid job constructs a dataset at the same moment (streaming.py holds a
    machine-wide lock). Returns the paths removed.
    """
    if not (os.path.isdir(_SHM_DIR) and os.path.isdir("/proc")):
        return []
    paths: dict[str, list[str]] = {}
    for folder, pattern in ((_SHM_DIR, _SHM_NAME), (tempfile.gettempdir(), _LOCK_NAME), (_SHM_DIR, _OWNER_NAME)):
        for name in os.listdir(folder):
            match = pattern.match(name)
            if match:
                paths.setdefault(match.group(1), []).append(os.path.join(folder, name))
    mapped: set[str] | None = None
    removed: list[str] = []
    for prefix, files in paths.items():
        owner = _OWNER_LOCK.format(prefix)
        if owner in files:
            files.remove(owner)
            with open(owner, "a+") as handle:
                try:    # exclusive only when no live process holds it shared
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                handle.seek(0)
                ours = handle.readline().strip() == _locals_inode(prefix)
                removed += _unlink(([*files] if ours else []) + [owner])
            if ours:
                continue
            # else the blocks (if any) belong to a later, non-Braid user of the prefix number
        mapped = _mapped_shared_memory() if mapped is None else mapped
        if files and not any(os.path.basename(f) in mapped for f in files):
            removed += _unlink(files)
    return removed


def _unlink(files: list[str]) -> list[str]:
    done = []
    for path in files:
        try:
            os.unlink(path)
            done.append(path)
        except (FileNotFoundError, PermissionError):
            pass
    return done
