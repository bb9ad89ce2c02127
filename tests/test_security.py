"""Hostile input (issue 18): what a model, a data file or a side file may claim, and what the CLI
makes of it. Every case ends with its documented exit code, one escaped error line, no
traceback, and the directory as it was (inputs unchanged, nothing written).

- Terminal injection: node names and file names holding escape sequences and newlines are
  printed escaped (``\\x1b``), one line per message; files keep the real names.
- Bounded parsers: a YAML alias bomb, JSON and YAML nested 100k / 5k deep, a ratios file over
  1 MB, a YAML Python tag; plan files with fractional, repeated or infinite indices and a group
  listed twice; a message quotes at most 80 characters of what it names.
- Sizes checked before they are allocated: an input dim of 2^40 (declared or pinned), an .npy
  or .npz header claiming 10^12 elements, a PNG header claiming 30000 x 30000; an initializer
  whose data is longer or shorter than its shape; NaN/Inf calibration data; numeric options
  out of range.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.errors import QUOTE_LIMIT, escape, quoted

from graphs import one_error_line, run_main, small_cnn

ESC = "\x1b[31m"


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


def refused(capsys, tmp_path: Path, code: int, *args) -> str:
    """Run the CLI on ``args``; assert exit ``code``, one error line, and nothing changed; the line."""
    before = snapshot(tmp_path)
    exit_code, out, err = run_main(capsys, *args)
    assert exit_code == code, err
    line = one_error_line(err)
    assert snapshot(tmp_path) == before
    return line


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(small_cnn(), str(path))
    return path


# ---------------------------------------------------------------- terminal injection

def test_escape_shows_non_printables_as_hex():
    assert escape("conv\x1b[2J\r\n\x07é") == "conv\\x1b[2J\\x0d\\x0a\\x07é"
    assert escape("a\nb\x1b", keep_newlines=True) == "a\nb\\x1b"
    assert escape("\u202eevil") == "\\u202eevil"  # right-to-left override
    assert escape("plain text") == "plain text"


def _hostile_names(tmp_path: Path) -> Path:
    """small_cnn with its conv node named with an escape sequence and a newline."""
    m = small_cnn()
    for n in m.graph.node:
        if n.name == "conv":
            n.name = f"conv{ESC}red\nsecond"
    path = tmp_path / "names.onnx"
    onnx.save(m, str(path))
    return path


def test_node_names_are_printed_escaped(tmp_path, capsys):
    path = _hostile_names(tmp_path)
    for args in (["info", path], [path, "--structured", "0.5", "-o", tmp_path / "out.onnx", "-v"]):
        code, out, err = run_main(capsys, *args)
        assert code == 0, err
        assert "\x1b" not in out + err and "conv\\x1b[31mred\\x0asecond" in out
        assert not any(line.startswith("second") for line in out.splitlines())  # the name stays on its line
    pruned = onnx.load(str(tmp_path / "out.onnx"))
    assert f"conv{ESC}red\nsecond" in {n.name for n in pruned.graph.node}  # files keep the real names


def test_file_names_in_errors_are_escaped(tmp_path, capsys, model):
    line = refused(capsys, tmp_path, 2, model, "--structured", "0.5", "--data", tmp_path / f"d{ESC}\nx.npz")
    assert "\x1b" not in line and "d\\x1b[31m\\x0ax.npz" in line


def test_an_internal_error_is_escaped_too(tmp_path, capsys, monkeypatch, model):
    import onnxprune.api

    def broken(*args, **kwargs):
        raise RuntimeError(f"bug in {ESC}\nnode")

    monkeypatch.setattr(onnxprune.api, "prune_file", broken)
    code, _, err = run_main(capsys, model, "--structured", "0.5")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "\x1b" not in err


# ---------------------------------------------------------------- bounded parsers

def _alias_bomb() -> str:
    """Nine levels of nine aliases: 9^9 (387 million) strings once expanded, in about 330 bytes."""
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    previous = "a"
    for name in "bcdefghi":
        lines.append(f"{name}: &{name} [{','.join(['*' + previous] * 9)}]")
        previous = name
    return "\n".join(lines) + "\n"


RATIO_FILES = {
    "alias-bomb.yaml": (_alias_bomb(), "aliases are expanded"),
    "deep.json": ("[" * 100_000 + "]" * 100_000, "nested deeper than 64"),
    "deep-unbalanced.json": ("[" * 100_000, "nested deeper than 64"),
    "deep.yaml": ("[" * 5_000 + "]" * 5_000, "nested deeper than 64"),
    "deep-block.yaml": ("".join(" " * i + "k:\n" for i in range(100)), "nested deeper than 64"),
    "huge.json": ('{"conv": 0.5, "pad": "' + "x" * (1 << 20) + '"}', "larger than 1024 KB"),
    "python-tag.yaml": ("!!python/object/apply:os.system ['touch pwned']\n", "not valid YAML"),
    "long-key.json": (json.dumps({"k" * 100_000: 0.5}), "matches no group"),
    "long-value.json": (json.dumps({"conv": "v" * 100_000}), "must be a number"),
}


@pytest.mark.parametrize("name", list(RATIO_FILES))
def test_hostile_ratio_files_are_refused_in_one_short_line(tmp_path, capsys, model, name):
    text, expected = RATIO_FILES[name]
    (tmp_path / name).write_text(text)
    line = refused(capsys, tmp_path, 2, model, "--structured", "0.4", "--ratios", tmp_path / name)
    assert expected in line
    assert len(line) < 300 + len(str(tmp_path)), line  # the value is quoted, not printed
    assert not (tmp_path / "pwned").exists()


def test_quoted_keeps_at_most_80_characters():
    assert quoted("x" * 10_000) == repr("x" * 76)[:-1] + "..." and len(quoted("x" * 10_000)) == QUOTE_LIMIT
    assert quoted("short") == "'short'"
    assert quoted([1] * 10_000).endswith("...") and len(quoted([1] * 10_000)) == QUOTE_LIMIT


def _plan_file(tmp_path: Path, model: Path, change) -> Path:
    """A plan saved for ``model``, then changed: ``change`` edits its JSON, or returns new text."""
    import onnxprune

    path = tmp_path / "plan.json"
    data = onnxprune.prune(onnx.load(str(model)), 0.5).plan.to_json()
    text = change(data)
    path.write_text(text if isinstance(text, str) else json.dumps(data))
    return path


def _set_keep(values):
    def change(data):
        data["groups"][0]["keep"] = values
    return change


def _twice(data):
    data["groups"].append(dict(data["groups"][0]))


def _infinite(data):
    return json.dumps(data).replace('"keep": [', '"keep": [1e400, ', 1)


PLAN_CHANGES = {
    "fractional-indices": (_set_keep([1.7, 2.2]), "is not an integer"),
    "boolean-index": (_set_keep([True, 2]), "is not an integer"),
    "repeated-index": (_set_keep([1, 1, 2]), "listed twice"),
    "infinite-index": (_infinite, "is not an integer"),
    "out-of-range-index": (_set_keep([0, 10**30]), "within 0.."),
    "group-listed-twice": (_twice, "listed twice"),
    "unknown-group": (lambda d: d["groups"][0].update(id="nope" * 1000), "does not exist"),
    "deep": (lambda d: "[" * 100_000 + "]" * 100_000, "nested deeper than 64"),
}


@pytest.mark.parametrize("name", list(PLAN_CHANGES))
def test_bad_plan_files_are_refused(tmp_path, capsys, model, name):
    change, expected = PLAN_CHANGES[name]
    plan = _plan_file(tmp_path, model, change)
    line = refused(capsys, tmp_path, 2, model, "--plan-in", plan, "-o", tmp_path / "out.onnx")
    assert expected in line and len(line) < 300 + len(str(tmp_path)), line


# ---------------------------------------------------------------- sizes before allocation

def _with_input_dim(tmp_path: Path, value) -> Path:
    """small_cnn with input dim 0 set to ``value`` (an int, or a name: dynamic); outputs left dynamic."""
    m = small_cnn()
    for vi in m.graph.output:
        vi.type.tensor_type.shape.dim[0].dim_param = "N"
    dim = m.graph.input[0].type.tensor_type.shape.dim[0]
    if isinstance(value, int):
        dim.dim_value = value
    else:
        dim.dim_param = value
    path = tmp_path / "dims.onnx"
    onnx.save(m, str(path))
    return path


def test_a_declared_input_dim_of_2_40_is_refused_before_allocating(tmp_path, capsys):
    path = _with_input_dim(tmp_path, 2**40)
    line = refused(capsys, tmp_path, 4, path, "--structured", "0.5", "-o", tmp_path / "out.onnx")
    assert "memory available" in line and "--input-shape" in line and "1099511627776" in line


def test_a_pinned_input_dim_of_2_40_is_blamed_on_the_flag(tmp_path, capsys):
    path = _with_input_dim(tmp_path, "N")
    line = refused(capsys, tmp_path, 2, path, "--structured", "0.5", "-o", tmp_path / "out.onnx",
                   "--input-shape", f"x:{2**40},4,8,8")
    assert line.startswith("onnxprune: error: --input-shape x:") and "memory available" in line


def test_a_zero_batch_dim_is_blamed_on_the_model_not_the_flag(tmp_path, capsys):
    path = _with_input_dim(tmp_path, 0)
    line = refused(capsys, tmp_path, 2, "bench", path, "--iters", "1", "--warmup", "0")
    assert "--input-shape" not in line and "fixed batch dim 0" in line


def _npy_header(shape, dtype="<f4") -> bytes:
    """An .npy file's header claiming ``shape``, with no data behind it."""
    header = repr({"descr": dtype, "fortran_order": False, "shape": tuple(shape)}).encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def test_an_npy_header_claiming_10_12_elements_is_refused(tmp_path, capsys, model):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "x.npy").write_bytes(_npy_header((10**6, 4, 500, 500)) + b"\0" * 64)
    line = refused(capsys, tmp_path, 2, model, "--structured", "0.5", "--data", folder)
    assert "claims shape [1000000, 4, 500, 500]" in line and "memory available" in line


def test_an_npz_member_claiming_10_12_elements_is_refused(tmp_path, capsys, model):
    import zipfile

    path = tmp_path / "data.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", _npy_header((10**6, 4, 500, 500)) + b"\0" * 64)
    line = refused(capsys, tmp_path, 2, model, "--structured", "0.5", "--data", path)
    assert "x.npy claims shape" in line


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels (its image data is one empty chunk)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [30000, 12000])  # past Pillow's hard limit; past its warning only
def test_an_image_claiming_too_many_pixels_is_an_error(tmp_path, capsys, model, side):
    pytest.importorskip("PIL")
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "bomb.png").write_bytes(_png_header(side, side))
    line = refused(capsys, tmp_path, 2, model, "--structured", "0.5", "--data", folder, "--image-size", "8,8")
    assert "decompression-bomb" in line


def _resized_initializer(tmp_path: Path, delta: int) -> Path:
    m = small_cnn()
    t = next(t for t in m.graph.initializer if t.raw_data)
    t.raw_data = t.raw_data + b"\0" * delta if delta > 0 else t.raw_data[:delta]
    path = tmp_path / "sized.onnx"
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("delta", [4, -4, 3])
def test_an_initializer_whose_data_does_not_match_its_shape_is_invalid(tmp_path, capsys, delta):
    path = _resized_initializer(tmp_path, delta)
    line = refused(capsys, tmp_path, 3, path, "--structured", "0.5", "-o", tmp_path / "out.onnx")
    assert "bytes" in line and ("need" in line or "required" in line)  # ours, or onnx.checker's (too short)


def test_an_initializer_with_too_many_typed_values_is_invalid(tmp_path, capsys):
    """(onnx.checker refuses too few values; too many pass it.)"""
    m = small_cnn()
    t = m.graph.initializer[0]
    values = onnx.numpy_helper.to_array(t).ravel()
    t.ClearField("raw_data")
    t.float_data.extend(values.tolist() + [0.0])
    path = tmp_path / "typed.onnx"
    onnx.save(m, str(path))
    line = refused(capsys, tmp_path, 3, path, "--structured", "0.5", "-o", tmp_path / "out.onnx")
    assert "values in float_data" in line


@pytest.mark.parametrize("fill", [np.nan, np.inf, "one-nan", 1e39])  # 1e39 overflows float32
def test_non_finite_calibration_data_is_a_clear_error(tmp_path, capsys, model, fill):
    x = np.random.default_rng(0).standard_normal((8, 4, 8, 8))
    if fill == "one-nan":
        x[3, 1, 2, 2] = np.nan
    else:
        x[:] = fill
    np.savez(tmp_path / "data.npz", x=x)
    line = refused(capsys, tmp_path, 2, model, "--structured", "0.5", "--data", tmp_path / "data.npz",
                   "-o", tmp_path / "out.onnx")
    assert "NaN or infinite" in line and "must be finite" in line


NUMERIC_FLAGS = [
    (["--mean", "nan,0,0"], "--mean"), (["--mean", "inf,0,0"], "--mean"), (["--std", "nan,1,1"], "--std"),
    (["--std", "0,1,1"], "--std"), (["--seed", "-1"], "--seed"), (["--seed", str(2**40)], "--seed"),
    (["--batch-size", "0"], "--batch-size"), (["--epochs", "0", "--distill"], "--epochs"),
    (["--lr", "nan", "--distill"], "--lr"), (["--lr", "-1", "--distill"], "--lr"),
]


@pytest.mark.parametrize("flags, named", NUMERIC_FLAGS, ids=[" ".join(f) for f, _ in NUMERIC_FLAGS])
def test_numeric_options_out_of_range_are_usage_errors(tmp_path, capsys, model, flags, named):
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(0).standard_normal((8, 4, 8, 8)).astype(np.float32))
    line = refused(capsys, tmp_path, 2, model, "--structured", "0.5", "--data", tmp_path / "data.npz",
                   "-o", tmp_path / "out.onnx", *flags)
    assert named in line


@pytest.mark.parametrize("flags", [["--seed", "-1"], ["--mean", "nan,0,0"], ["--std", "0,1,1"]])
def test_sensitivity_numeric_options_out_of_range_are_usage_errors(tmp_path, capsys, model, flags):
    np.savez(tmp_path / "data.npz", x=np.zeros((4, 4, 8, 8), np.float32))
    line = refused(capsys, tmp_path, 2, "sensitivity", model, "--data", tmp_path / "data.npz", *flags)
    assert flags[0] in line


def test_the_library_checks_the_seed_too(tmp_path, model):
    import onnxprune

    for seed in (-1, 2**40, 1.5):
        with pytest.raises(onnxprune.UsageError, match="`seed`"):
            onnxprune.prune_file(model, tmp_path / "out.onnx", 0.5, seed=seed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


# ---------------------------------------------------------------- outputs never replace inputs

def _external(tmp_path: Path) -> tuple[Path, Path]:
    path = tmp_path / "ext.onnx"
    onnx.save(small_cnn(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.data", size_threshold=0)
    return path, tmp_path / "ext.data"


def _data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((4, 4, 8, 8)).astype(np.float32))
    return path


def _data_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "x.npy", np.random.default_rng(0).standard_normal((4, 4, 8, 8)).astype(np.float32))
    return folder


CLASHES = {  # name -> builder(tmp_path, model) -> command line (each also tried with --force)
    "report-onto-ratios": lambda t, m: (t / "r.json").write_text('{"conv": 0.5}') and
    [m, "--ratios", t / "r.json", "--report", t / "r.json", "-o", t / "out.onnx"],
    "report-onto-data": lambda t, m: [m, "--structured", "0.5", "--data", _data_file(t), "--report", t / "data.npz",
                                      "-o", t / "out.onnx"],
    "plan-out-onto-a-file-of-the-data-folder": lambda t, m: [
        m, "--structured", "0.5", "--data", _data_folder(t), "--plan-out", t / "npy" / "x.npy", "-o", t / "out.onnx"],
    "report-onto-external-data": lambda t, m: [_external(t)[0], "--structured", "0.5", "--report", t / "ext.data",
                                               "-o", t / "out.onnx"],
    "output-onto-external-data": lambda t, m: [_external(t)[0], "--structured", "0.5", "-o", t / "ext.data"],
    "output-onto-input": lambda t, m: [m, "--structured", "0.5", "-o", m],
    "bench-json-onto-model": lambda t, m: ["bench", m, "--json", m, "--iters", "1", "--warmup", "0"],
    "sensitivity-json-onto-model": lambda t, m: ["sensitivity", m, "--data", _data_file(t), "--json", m],
    "sensitivity-json-onto-data": lambda t, m: ["sensitivity", m, "--data", _data_file(t), "--json", t / "data.npz"],
    "info-json-through-a-hard-link": lambda t, m: os.link(m, t / "link.json") or ["info", m, "--json", t / "link.json"],
}


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("name", list(CLASHES))
def test_an_output_never_replaces_an_input(tmp_path, capsys, model, name, force):
    args = CLASHES[name](tmp_path, model) + (["--force"] if force and args_take_force(name) else [])
    line = refused(capsys, tmp_path, 2, *args)
    assert "would overwrite" in line, line


def args_take_force(name: str) -> bool:
    return not name.startswith(("bench", "sensitivity", "info"))


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _symlink(path: Path) -> Path:
    (path.parent / "elsewhere.json").write_text("precious")
    path.symlink_to(path.parent / "elsewhere.json")
    return path


@pytest.mark.parametrize("flag", ["-o", "--report", "--plan-out"])
@pytest.mark.parametrize("kind", ["fifo", "symlink", "dangling-symlink", "directory"])
def test_non_regular_destinations_are_refused_even_with_force(tmp_path, capsys, model, flag, kind):
    target = tmp_path / "target"
    {"fifo": _fifo, "symlink": _symlink, "dangling-symlink": lambda p: p.symlink_to(tmp_path / "nowhere") or p,
     "directory": lambda p: p.mkdir() or p}[kind](target)
    extra = [] if flag == "-o" else ["-o", tmp_path / "out.onnx"]
    line = refused(capsys, tmp_path, 2, model, "--structured", "0.5", flag, target, *extra, "--force")
    assert "link" in line or "regular file" in line or "directory" in line
    assert not (tmp_path / "nowhere").exists()


def test_a_device_is_never_a_destination(tmp_path, capsys, model):
    line = refused(capsys, tmp_path, 2, model, "--structured", "0.5", "-o", "/dev/null", "--force")
    assert "regular file" in line


def test_force_replaces_an_existing_regular_output(tmp_path, capsys, model):
    (tmp_path / "r.json").write_text("old")
    code, _, err = run_main(capsys, model, "--structured", "0.5", "-o", tmp_path / "out.onnx", "--report",
                            tmp_path / "r.json")
    assert code == 2 and "exists" in one_error_line(err) and (tmp_path / "r.json").read_text() == "old"
    code, _, err = run_main(capsys, model, "--structured", "0.5", "-o", tmp_path / "out.onnx", "--report",
                            tmp_path / "r.json", "--force")
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["output"] == str(tmp_path / "out.onnx")


def test_a_dash_writes_json_to_stdout(tmp_path, capsys, model):
    code, out, err = run_main(capsys, model, "--structured", "0.5", "-o", tmp_path / "out.onnx", "--report", "-")
    assert code == 0, err
    assert json.loads(out)["output"] == str(tmp_path / "out.onnx")  # the JSON alone: no summary mixed in
    code, out, err = run_main(capsys, "info", model, "--json", "-")
    assert code == 0 and "prunable" in json.loads(out)
    assert not (tmp_path / "-").exists() and not Path("-").exists()


def test_a_dash_is_not_a_model_destination(tmp_path, capsys, model):
    line = refused(capsys, tmp_path, 2, model, "--structured", "0.5", "-o", "-")
    assert "JSON only" in line
    line = refused(capsys, tmp_path, 2, model, "--structured", "0.5", "--report", "-", "--plan-out", "-")
    assert "standard output" in line


def test_a_failed_verification_leaves_no_plan_and_no_model(tmp_path, capsys, model, monkeypatch):
    import onnxprune.pipeline.run
    from onnxprune.errors import VerificationFailed

    def failing(*args, **kwargs):
        raise VerificationFailed("the pruned model deviates (simulated)")

    monkeypatch.setattr(onnxprune.pipeline.run, "verify_file", failing)
    refused(capsys, tmp_path, 5, model, "--structured", "0.5", "-o", tmp_path / "out.onnx",
            "--plan-out", tmp_path / "plan.json", "--report", tmp_path / "r.json")


# ---------------------------------------------------------------- staged outputs

def _prune_args(model: Path, tmp_path: Path, report: str = "r.json") -> list:
    return [model, "--structured", "0.5", "-o", tmp_path / "out.onnx", "--report", tmp_path / report,
            "--plan-out", tmp_path / f"plan-{report}"]


@pytest.mark.parametrize("swapped_file, code", [("r.json", 2), ("out.onnx", 5)])
def test_a_name_swapped_for_a_symlink_while_staged_writes_nothing_through_it(tmp_path, capsys, model,
                                                                             monkeypatch, swapped_file, code):
    """The race made deterministic: right after a staged file is created, its name is swapped
    for a link to a victim file. Writes go through the descriptor, so the victim keeps its
    bytes; the model is then verified from its staged name, which reads the victim (exit 5),
    and a swapped side file is refused when published (exit 2)."""
    from onnxprune.model import publish

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    create = publish.Staging._create

    def swapped(self, final, name=None, rank=0):
        staged, f = create(self, final, name, rank)
        if staged.name == swapped_file:
            os.rename(staged, staged.with_name("moved-away"))
            staged.symlink_to(victim)
        return staged, f

    monkeypatch.setattr(publish.Staging, "_create", swapped)
    line = refused(capsys, tmp_path, code, *_prune_args(model, tmp_path))
    assert victim.read_text() == "precious"
    assert code != 2 or "replaced while staged" in line


def test_two_runs_onto_one_new_path_the_second_is_refused(tmp_path, capsys, model, monkeypatch):
    """The concurrent no-clobber race made deterministic: a second run to the same new output
    starts after the first has checked its paths and finishes before the first publishes."""
    from onnxprune.cli import main
    from onnxprune.model import publish

    publish_all, raced = publish.Staging.publish, []

    def racing(self):
        if not raced:
            raced.append(None)  # (before the second run, which publishes through here too)
            raced[0] = main([str(a) for a in _prune_args(model, tmp_path, "second.json")] + ["-q"])
        return publish_all(self)

    monkeypatch.setattr(publish.Staging, "publish", racing)
    code, _, err = run_main(capsys, *_prune_args(model, tmp_path, "first.json"))
    assert raced == [0] and code == 2, err
    assert "appeared while this run worked" in one_error_line(err)
    report = json.loads((tmp_path / "second.json").read_text())  # the second run's files, whole
    assert report["output"] == str(tmp_path / "out.onnx")
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["model.onnx", "out.onnx", "plan-second.json", "second.json"]  # none of the first's


class _FullDisk:
    """A file whose writes fail as on a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_writing_the_report_leaves_no_model(tmp_path, capsys, model, monkeypatch):
    from onnxprune.model import publish

    create = publish.Staging._create

    def full_for_the_report(self, final, name=None, rank=0):
        staged, f = create(self, final, name, rank)
        return staged, (_FullDisk(f) if Path(final).name == "r.json" else f)

    monkeypatch.setattr(publish.Staging, "_create", full_for_the_report)
    line = refused(capsys, tmp_path, 2, *_prune_args(model, tmp_path))
    assert "No space left" in line


def test_a_failure_part_way_through_publishing_puts_replaced_files_back(tmp_path, monkeypatch):
    from onnxprune.model import publish

    (tmp_path / "a.json").write_text("old a")
    (tmp_path / "b.onnx").write_text("old b")
    place, calls = publish.Staging._place, []

    def failing_second(self, final, staged):
        calls.append(final.name)
        if len(calls) == 2:
            raise OSError("simulated failure")
        return place(self, final, staged)

    monkeypatch.setattr(publish.Staging, "_place", failing_second)
    with pytest.raises(OSError, match="simulated"):
        with publish.Staging(force=True) as stage:
            stage.text(tmp_path / "a.json", "new a")
            stage.bytes(tmp_path / "b.onnx", b"new b", rank=2)
    assert calls == ["a.json", "b.onnx"]  # side files first, the model last
    assert (tmp_path / "a.json").read_text() == "old a" and (tmp_path / "b.onnx").read_text() == "old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.onnx"]  # no staging folder


def test_staged_files_are_published_together_and_the_staging_folder_removed(tmp_path):
    from onnxprune.model import publish

    with publish.Staging() as stage:
        stage.text(tmp_path / "a.json", "a")
        stage.bytes(tmp_path / "b.bin", b"b")
        staging = stage.staged(tmp_path / "a.json").parent
        assert staging.name.startswith(".onnxprune-") and oct(staging.stat().st_mode & 0o777) == "0o700"
        assert sorted(p.name for p in tmp_path.iterdir()) == [staging.name]  # nothing under a final name yet
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"]
    assert (tmp_path / "a.json").read_text() == "a" and (tmp_path / "b.bin").read_bytes() == b"b"


def test_sigterm_in_process_unwinds_like_ctrl_c(tmp_path, capsys, model, monkeypatch):
    """SIGTERM raised during verification: exit 143, nothing written, no staging folder."""
    import signal

    import onnxprune.pipeline.run

    verify = onnxprune.pipeline.run.verify_file

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return verify(*args, **kwargs)

    monkeypatch.setattr(onnxprune.pipeline.run, "verify_file", terminated)
    before = snapshot(tmp_path)
    code, _, err = run_main(capsys, *_prune_args(model, tmp_path))
    assert code == 143 and err.strip() == "onnxprune: stopped by SIGTERM; nothing written", err
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- fuzzing the graph's structure

def _structural_mutation(model: onnx.ModelProto, rng: np.random.Generator) -> tuple[onnx.ModelProto, str]:
    """One of: a node input renamed to nothing that exists, a node output duplicated, a node
    removed, an initializer's dims changed (data kept), a graph input's rank or dtype changed, a
    node made to read its own output (a cycle), an op type renamed to an unknown one, a weight
    dropped, or two nodes swapped (topological order broken)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    kind = int(rng.integers(9))
    node = g.node[int(rng.integers(len(g.node)))]
    if kind == 0 and node.input:
        node.input[int(rng.integers(len(node.input)))] = "nowhere"
    elif kind == 1:
        other = g.node[int(rng.integers(len(g.node)))]
        node.output[0] = other.output[0]
    elif kind == 2:
        g.node.remove(node)
    elif kind == 3:
        t = g.initializer[int(rng.integers(len(g.initializer)))]
        dims = list(t.dims)
        dims[int(rng.integers(len(dims)))] = int(rng.choice([0, 1, 3, 2**31, 2**40]))
        del t.dims[:]
        t.dims.extend(dims)
    elif kind == 4:
        shape = g.input[0].type.tensor_type.shape
        if rng.random() < 0.5:
            shape.dim.add().dim_value = 2
        else:
            g.input[0].type.tensor_type.elem_type = int(rng.choice([onnx.TensorProto.INT64, onnx.TensorProto.STRING]))
    elif kind == 5 and node.input:
        node.input[0] = node.output[0]
    elif kind == 6:
        node.op_type = "NoSuchOp"
    elif kind == 7:
        g.initializer.remove(g.initializer[int(rng.integers(len(g.initializer)))])
    else:
        i, j = sorted(rng.choice(len(g.node), 2, replace=False))
        a, b = onnx.NodeProto(), onnx.NodeProto()
        a.CopyFrom(g.node[i])
        b.CopyFrom(g.node[j])
        g.node[i].CopyFrom(b)
        g.node[j].CopyFrom(a)
    return m, f"mutation {kind} at {node.name or node.op_type}"


@pytest.mark.parametrize("case", range(60))
def test_fuzzed_graph_structure_ends_in_a_documented_outcome(tmp_path, capsys, case):
    """Property: a documented exit code other than 1, no traceback, the input unchanged, and
    nothing written unless the run succeeded (then a model that passes the full check)."""
    mutated, change = _structural_mutation(small_cnn(), np.random.default_rng(5000 + case))
    path = tmp_path / "fuzzed.onnx"
    path.write_bytes(mutated.SerializeToString())
    before = snapshot(tmp_path)
    code, _, err = run_main(capsys, *_prune_args(path, tmp_path))
    assert "Traceback" not in err and "internal error" not in err, (change, err)
    assert code in (0, 2, 3, 4, 5), (change, err)
    if code == 0:
        onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)
        assert {k: v for k, v in snapshot(tmp_path).items() if k in before} == before, change
    else:
        one_error_line(err)
        assert snapshot(tmp_path) == before, change


def test_a_pickled_data_file_is_refused_unloaded(tmp_path, capsys, model):
    """np.load runs without allow_pickle: an object array (a pickle) is not unpickled."""
    np.savez(tmp_path / "data.npz", x=np.array([{"a": 1}] * 4, dtype=object))
    line = refused(capsys, tmp_path, 2, model, "--structured", "0.5", "--data", tmp_path / "data.npz")
    assert "not a readable .npz file" in line or "numeric" in line


def test_array_names_from_a_data_file_are_quoted_within_bounds(tmp_path, capsys, model):
    arrays = {f"{'n' * 5000}{i}": np.zeros((2, 4, 8, 8), np.float32) for i in range(50)}
    np.savez(tmp_path / "data.npz", **arrays)
    line = refused(capsys, tmp_path, 2, model, "--structured", "0.5", "--data", tmp_path / "data.npz")
    assert "no array for model input 'x'" in line and "and 42 more" in line and len(line) < 1000, line
