"""Writing: outputs appear atomically and only on success; side files never overwrite an input."""

from __future__ import annotations

import contextlib
import os
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


def check_output_path(input_path, output_path, force: bool) -> Path:
    """Refuse to overwrite without --force, and fail early on an unwritable location."""
    out = Path(output_path)
    if out.exists() and out.is_dir():
        raise UsageError(f"{out}: is a directory")
    same = out.exists() and Path(input_path).exists() and os.path.samefile(input_path, out)
    if same and not force:
        raise UsageError(f"{out}: output would overwrite the input; pass `force` to allow it")
    if out.exists() and not force and not same:
        raise UsageError(f"{out}: exists; pass `force` to overwrite it")
    return ensure_writable(out)


def check_side_files(model_path, output_path, writes: dict[str, object],
                     reads: dict[str, object] | None = None) -> None:
    """Side files to write (flag -> path, e.g. ``{"--report": ...}``) must be writable and
    overwrite nothing else of the run: the input model, the output model
    (``None`` for a dry run), a file read (``--plan-in``) or each other.
    """
    taken = {"the input model": model_path, "the output model": output_path, **(reads or {})}
    for flag, path in writes.items():
        if not path:
            continue
        ensure_writable(path, flag)
        clash = next((what for what, other in taken.items() if other and _same_path(path, other)), None)
        if clash:
            raise UsageError(f"{path}: {flag} would overwrite {clash}")
        taken[flag] = path


def _same_path(a, b) -> bool:
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)  # also through links
    return a.resolve() == b.resolve()


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
