"""Staged outputs: all files of a run appear together, and only when the run succeeds.

    with Staging(force) as stage:
        staged = stage.model(out, model)      # out's name, inside a private folder beside out
        verify(staged)                        # raise to abandon: nothing is left behind
        stage.text(report_path, text)
    # published here: side files first, the model last

Each file is created under its final name in a ``mkdtemp`` folder (mode 0700)
inside its destination folder, with O_EXCL|O_NOFOLLOW, and written, flushed
and fsynced through the descriptor that created it: nothing can be swapped in
by name between creating and writing. Publishing links each staged file into
place with ``os.link``, which never replaces: a file that appeared at the
final name meanwhile (another run) is a usage error, not clobbered. With
``force`` an existing regular file is swapped out by ``rename`` instead, kept
in the staging folder until the whole set is in place so that a failure part
way puts it back. Signals are held while publishing; on any failure before or
during it, every file of the run and the staging folders are removed.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import onnx
from onnx import external_data_helper

from ..errors import UsageError, VerificationFailed
from .proto import PACKED_4BIT, needs_external_data
from .stream import GRAPH_INITIALIZER, MODEL_GRAPH, length_key

STAGING_PREFIX = ".onnxprune-"
STDOUT = "-"
EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay in the model file (onnx.save_model's size_threshold)
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_HELD = {signal.SIGINT, signal.SIGTERM} | ({signal.SIGHUP} if hasattr(signal, "SIGHUP") else set())


class Staging:
    def __init__(self, force: bool = False):
        self.force = force
        self.folders: dict[Path, Path] = {}  # destination folder -> its staging folder
        # (final, staged, rank: side files 0, model data 1, model 2, (device, inode) written)
        self.files: list[tuple[Path, Path, int, tuple[int, int]]] = []
        self.stdout: list[str] = []

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self.publish()
        finally:
            self.discard()
        return False

    # ---- staging

    def _folder(self, final: Path) -> Path:
        parent = final.parent.resolve()
        if parent not in self.folders:
            try:
                self.folders[parent] = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=parent))
            except OSError as exc:
                raise UsageError(f"{final}: cannot write in {final.parent} ({exc.strerror})") from None
        return self.folders[parent]

    def _create(self, final: Path, name: str | None = None, rank: int = 0):
        staged = self._folder(final) / (name or final.name)
        fd = os.open(staged, _CREATE, 0o666)  # 0o666 less the umask, like any file the user writes
        st = os.fstat(fd)
        self.files.append((final.parent / staged.name, staged, rank, (st.st_dev, st.st_ino)))
        return staged, os.fdopen(fd, "wb")

    def bytes(self, final, data: bytes, rank: int = 0) -> Path:
        """Stage ``data`` as the file ``final`` will be; its staged path."""
        final = Path(final)
        try:
            staged, f = self._create(final, rank=rank)
            with f:
                f.write(data)
                _synced(f)
        except OSError as exc:
            raise UsageError(f"{final}: cannot write ({exc.strerror or exc})") from None
        return staged

    def text(self, final, text: str) -> Path | None:
        """Stage a text file; ``-`` is standard output, printed once the files are published."""
        if str(final) == STDOUT:
            self.stdout.append(text)
            return None
        return self.bytes(final, text.encode())

    def model(self, final, model: onnx.ModelProto) -> Path:
        """Stage ``model`` as ``final``; weights past EXTERNAL_DATA_THRESHOLD go to a data file
        beside it, under a fresh name (never one another model refers to). ``model`` is left
        with its large tensors pointing at that file, as onnx.save_model leaves it."""
        final = Path(final)
        try:
            data_name = None
            if needs_external_data(model):
                data_name = f"{final.name}.{uuid.uuid4().hex[:8]}.data"
                self._write_external(model, final, data_name)
            staged, f = self._create(final, rank=2)
            with f:
                write_model(f, model)
                _synced(f)
        except OSError as exc:
            raise UsageError(f"{final}: cannot write ({exc.strerror or exc})") from None
        return staged

    def _write_external(self, model: onnx.ModelProto, final: Path, name: str) -> None:
        """The large tensors' bytes into the staged data file, through its descriptor (what
        onnx.save_model does by name, reopening the file for each tensor)."""
        _, f = self._create(final, name, rank=1)
        with f:
            for tensor in _initializers(model.graph):
                if tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_MIN_BYTES:
                    offset = f.tell()
                    f.write(tensor.raw_data)
                    external_data_helper.set_external_data(tensor, name, offset, len(tensor.raw_data))
                    tensor.ClearField("raw_data")
            _synced(f)

    def staged(self, final) -> Path:
        """Where the file to be published as ``final`` is staged."""
        return next(staged for f, staged, *_ in self.files if f == Path(final))

    # ---- publishing

    def publish(self) -> None:
        """Link every staged file into place (side files, the model's data, the model), signals
        held; undo what was done on a failure part way."""
        done: list[tuple[Path, Path | None]] = []  # (final, the file it replaced, kept in staging)
        with _signals_held():
            try:
                for final, staged, _, written in sorted(self.files, key=lambda f: f[2]):
                    _check_unchanged(staged, written)
                    done.append((final, self._place(final, staged)))
                _drop_pending()  # a signal now comes too late to stop the run: its files are in place
            except BaseException:
                for final, replaced in reversed(done):
                    with contextlib.suppress(OSError):
                        if replaced is not None:
                            os.rename(replaced, final)
                        else:
                            os.unlink(final)
                raise
        for text in self.stdout:
            sys.stdout.write(text)
        sys.stdout.flush()

    def _place(self, final: Path, staged: Path) -> Path | None:
        """``staged`` at ``final`` without replacing; with ``force`` an existing regular file is
        moved aside into the staging folder first (returned, for an undo)."""
        try:
            os.link(staged, final, follow_symlinks=False)
            return None
        except FileExistsError:
            if not self.force:
                raise UsageError(f"{final}: exists (it appeared while this run worked); pass `force` "
                                 "to overwrite it") from None
        except OSError as exc:
            raise UsageError(f"{final}: cannot write ({exc.strerror})") from None
        try:
            if not stat.S_ISREG(os.lstat(final).st_mode):
                raise UsageError(f"{final}: is not a regular file (any more); outputs replace regular files only")
            aside = staged.with_name(f"{staged.name}.replaced")
            os.link(final, aside, follow_symlinks=False)
            os.rename(staged, final)
        except OSError as exc:  # e.g. removed or swapped meanwhile
            raise UsageError(f"{final}: cannot replace ({exc.strerror or exc})") from None
        return aside

    def discard(self) -> None:
        """Remove the staging folders and what is in them (published files have their own name)."""
        for folder in self.folders.values():
            shutil.rmtree(folder, ignore_errors=True)
        self.folders.clear()


def _check_unchanged(staged: Path, written: tuple[int, int]) -> None:
    """The staged name still names the file written (not a link or another file swapped in)."""
    st = os.lstat(staged)
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != written:
        raise UsageError(f"{staged}: replaced while staged (by another process); nothing written")


def write_model(f, model: onnx.ModelProto) -> None:
    """``model``'s protobuf encoding into ``f``, one initializer at a time: SerializeToString of
    the whole would hold a second copy of every weight in memory at once (the run's peak while
    writing). The model and graph are encoded without their weights, the initializers follow as
    graph fields of their own; a protobuf parser reads the same model (the order of fields in the
    encoding does not matter, that of repeated entries is kept)."""
    graph = model.graph
    rest = _without(graph, "initializer").SerializeToString()
    sizes = [_encoded_size(t) for t in graph.initializer]
    graph_size = len(rest) + sum(len(length_key(GRAPH_INITIALIZER, n)) + n for n in sizes)
    f.write(_without(model, "graph").SerializeToString())
    if model.HasField("graph"):
        f.write(length_key(MODEL_GRAPH, graph_size))
        f.write(rest)
    for t, size in zip(graph.initializer, sizes):
        f.write(length_key(GRAPH_INITIALIZER, size))
        _write_tensor(f, t, size)


def _write_tensor(f, t: onnx.TensorProto, size: int) -> None:
    """``t``'s encoding, its raw bytes written apart: protobuf serialises a message into a buffer of
    its own and copies that into the bytes returned, two copies of the largest weight at once
    (BERT-base's 94 MB embedding table: the run's peak was that); ``raw_data`` read alone is one."""
    raw_length = _raw_length(t)
    if size < LARGE_RAW_BYTES or raw_length is None:
        f.write(t.SerializeToString())
        return
    f.write(_without(t, "raw_data").SerializeToString())
    raw = t.raw_data
    if len(raw) != raw_length:  # the size written ahead came from the dims: the file would not parse
        raise VerificationFailed(f"weight {t.name!r} holds {len(raw)} bytes, its dtype and shape "
                                 f"{list(t.dims)} need {raw_length}: not written")
    f.write(length_key(TENSOR_RAW_DATA, len(raw)))
    f.write(raw)


def _encoded_size(t: onnx.TensorProto) -> int:
    """``t.ByteSize()`` without encoding ``t`` whole where it holds raw data (ByteSize encodes the
    message to measure it, and reading ``raw_data`` copies it: 0.2 s of BERT-base's write for what
    its dims say); ``_write_tensor`` checks the raw length it writes against it."""
    raw_length = _raw_length(t)
    if raw_length is None or raw_length < LARGE_RAW_BYTES:
        return t.ByteSize()
    return _without(t, "raw_data").ByteSize() + len(length_key(TENSOR_RAW_DATA, raw_length)) + raw_length


def _raw_length(t: onnx.TensorProto) -> int | None:
    """The bytes of ``t``'s raw data from its dims and dtype, or None when it holds none (or a
    dtype of no fixed size)."""
    if not t.HasField("raw_data") or t.data_type in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING):
        return None
    elements = math.prod(t.dims)
    if t.data_type in PACKED_4BIT:
        return (elements + 1) // 2
    try:
        return elements * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, ValueError):  # a dtype this onnx does not know
        return None


TENSOR_RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
LARGE_RAW_BYTES = 1 << 20  # below this, one copy more does not matter


def _without(message, skipped: str):
    """A copy of ``message`` without its field ``skipped`` (the rest is small: nodes, names). Its
    fields are visited by descriptor, not ``ListFields()``, which would read (copy) ``skipped`` too."""
    copy = type(message)()
    for field in message.DESCRIPTOR.fields:
        if field.name == skipped:
            continue
        value = getattr(message, field.name)
        if field.is_repeated:
            if len(value):
                getattr(copy, field.name).extend(value)
        elif not message.HasField(field.name):
            continue
        elif field.type == field.TYPE_MESSAGE:
            getattr(copy, field.name).CopyFrom(value)
        else:
            setattr(copy, field.name, value)
    return copy


def _initializers(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            for body in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _initializers(body)


def _synced(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _drop_pending() -> None:
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "sigtimedwait"):
        while signal.sigtimedwait(_HELD, 0) is not None:
            pass


@contextlib.contextmanager
def _signals_held():
    """SIGINT, SIGTERM and SIGHUP wait until the block is done (main thread only)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
