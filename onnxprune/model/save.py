"""Writing: every output path checked against every input before any work (never replaced,
whatever `force` says); one file written on its own (the staging of a run's outputs together
is model/publish.py)."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import onnx

from ..errors import UsageError
from .publish import STDOUT, Staging
from .stream import read_model_metadata


def default_output_path(input_path: str | os.PathLike) -> Path:
    p = Path(input_path)
    stem = p.name[:-5] if p.name.endswith(".onnx") else p.name
    return p.with_name(stem + ".pruned.onnx")


def check_outputs(writes: dict[str, object], reads: dict[str, object], force: bool = False,
                  stdout_ok: tuple[str, ...] = ()) -> None:
    """Before any work: every output of a run (option -> path; None: not written) against every
    input (what -> path or paths; a folder stands for the files in it, a model for its external
    data too) by real path and inode, and against each other. A clash is a usage error whatever
    ``force`` says: ``force`` only lets a run replace an existing regular file that it does not
    read. A link, a directory, a device or a FIFO is never a destination. ``stdout_ok``: the
    options for which ``-`` means standard output.
    """
    read = _identities(reads)
    taken: dict[str, str] = {}
    for option, path in writes.items():
        if path is None or path == "":
            continue
        if str(path) == STDOUT and option in stdout_ok:
            if STDOUT in taken:
                raise UsageError(f"{option} and {taken[STDOUT]} cannot both be written to standard output")
            taken[STDOUT] = option
            continue
        if str(path) == STDOUT:
            raise UsageError(f"{option} {STDOUT}: standard output takes JSON only; name a file (./- for one named -)")
        path = Path(path)
        real = os.path.realpath(path)
        clash = read.get(real) or read.get(_inode(path)) or taken.get(real)
        if clash:
            raise UsageError(f"{path}: {option} would overwrite {clash} (`force` does not allow that)")
        _check_destination(path, option, force)
        ensure_writable(path, option)
        taken[real] = option


def _check_destination(path: Path, option: str, force: bool) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UsageError(f"{path}: {option} cannot be checked ({exc.strerror})") from None
    if stat.S_ISLNK(mode):
        raise UsageError(f"{path}: {option} is a symbolic link; outputs are not written through links")
    if stat.S_ISDIR(mode):
        raise UsageError(f"{path}: {option} path is a directory")
    if not stat.S_ISREG(mode):
        raise UsageError(f"{path}: {option} is not a regular file (a device, FIFO or socket); "
                         "outputs replace regular files only")
    if not force:
        raise UsageError(f"{path}: exists; pass `force` to overwrite it")


def _inode(path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _identities(reads: dict[str, object]) -> dict:
    """Real path and (device, inode) of every file read -> what it is (for messages)."""
    found: dict = {}
    for what, paths in reads.items():
        for path in ([paths] if isinstance(paths, (str, os.PathLike)) else paths or ()):
            for f in _files_at(Path(path)):
                found.setdefault(os.path.realpath(f), what)
                inode = _inode(f)
                if inode is not None:
                    found.setdefault(inode, what)
    return found


def _files_at(path: Path) -> list[Path]:
    if path.is_dir():
        return [path, *(p for p in path.rglob("*") if p.is_file())]
    return [path]


def model_files(path) -> list[Path]:
    """A model file and the external data files it names (read from the file without its
    data); only the model where it cannot be parsed (loading says why, later)."""
    path = Path(path)
    try:
        model = read_model_metadata(path)
    except Exception:
        return [path]
    found = dict.fromkeys([path])
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location:
                found.setdefault(path.parent / location)
    return list(found)


def _tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for body in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _tensors(body)


def ensure_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail before any work when ``path`` cannot be written (probed: os.access lies to root)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path}: {what} path is a directory")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"{path}: directory {parent} does not exist")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise UsageError(f"{path}: cannot write in {parent} ({exc.strerror})") from None
    return path


def write_text_file(path: str | os.PathLike, text: str) -> None:
    """Write a side file (a command's JSON) on its own, staged; ``-`` is standard output."""
    with Staging(force=True) as stage:
        stage.text(path, text)


class AtomicModelWriter:
    """One file written beside its final path, checked by the caller, then put in place (a run
    with several outputs stages them together: model/publish.Staging).

    with AtomicModelWriter(out) as w:
        tmp = w.write(model)      # a complete model file, staged
        verify(tmp)               # raise to abandon: nothing is left behind
    # in place here (replacing a regular file that was there: the checks were made before)
    """

    def __init__(self, final_path: str | os.PathLike):
        self.final = Path(final_path)
        self.stage = Staging(force=True)

    def __enter__(self) -> AtomicModelWriter:
        return self

    def write_bytes(self, data: bytes) -> Path:
        return self.stage.bytes(self.final, data)

    def write(self, model: onnx.ModelProto) -> Path:
        return self.stage.model(self.final, model)

    def __exit__(self, exc_type, exc, tb) -> bool:
        return self.stage.__exit__(exc_type, exc, tb)
