"""Writing: outputs appear atomically and only on success; side files never overwrite an input."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
import uuid
from pathlib import Path

import onnx

from ..errors import UsageError
from .proto import needs_external_data


def default_output_path(input_path: str | os.PathLike) -> Path:
    p = Path(input_path)
    stem = p.name[:-5] if p.name.endswith(".onnx") else p.name
    return p.with_name(stem + ".pruned.onnx")


STDOUT = "-"  # as a JSON destination: standard output


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
        model = onnx.load(str(path), load_external_data=False)
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
    """Write a side file (report, plan) atomically; an OS failure is a usage error."""
    if str(path) == STDOUT:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path = Path(path)
    try:
        with AtomicModelWriter(path) as writer:
            writer.write_bytes(text.encode())
    except OSError as exc:
        raise UsageError(f"{path}: cannot write ({exc.strerror or exc})") from None


class AtomicModelWriter:
    """Write a model beside its final path, let the caller verify it, then rename.

    with AtomicModelWriter(out) as w:
        tmp = w.write(model)      # a complete model file under a temporary name
        verify(tmp)               # raise to abandon: nothing is left behind
    # renamed into place here
    """

    def __init__(self, final_path: str | os.PathLike):
        self.final = Path(final_path)
        self.tmp: Path | None = None
        self.data_file: Path | None = None

    def __enter__(self) -> AtomicModelWriter:
        return self

    def _temporary(self) -> Path:
        """A fresh ``.NAME.XXXXXXXX.tmp`` beside the final path (never the final name itself).

        The name is recorded before the file exists (``mkstemp`` would create
        it first): a Ctrl-C at any instant still finds what to remove.
        """
        while True:
            self.tmp = self.final.parent / f".{self.final.name}.{uuid.uuid4().hex[:8]}.tmp"
            try:  # 0o666 less the umask, like any file the user writes
                os.close(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                return self.tmp
            except FileExistsError:
                continue

    def write_bytes(self, data: bytes) -> Path:
        self._temporary().write_bytes(data)
        return self.tmp

    def write(self, model: onnx.ModelProto) -> Path:
        try:
            return self._write(model)
        except OSError as exc:
            raise UsageError(f"{self.final}: cannot write ({exc.strerror or exc})") from None

    def _write(self, model: onnx.ModelProto) -> Path:
        directory = self.final.parent
        self._temporary()
        if needs_external_data(model):
            # A fresh name: never clobber a data file another model refers to.
            self.data_file = directory / f"{self.final.name}.{uuid.uuid4().hex[:8]}.data"
            onnx.save_model(
                model,
                str(self.tmp),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=self.data_file.name,
                size_threshold=1024,
            )
        else:
            onnx.save_model(model, str(self.tmp))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None and self.tmp is not None:
            try:
                os.replace(self.tmp, self.final)
                return False
            except OSError as err:
                self.tmp.unlink(missing_ok=True)
                raise UsageError(f"{self.final}: cannot write ({err.strerror})") from None
        for p in (self.tmp, self.data_file):
            if p is not None:
                with contextlib.suppress(OSError):
                    p.unlink()
        return False
