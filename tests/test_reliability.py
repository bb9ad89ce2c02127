"""Reliability of the command line (issue 7): bad input, fuzzed models, interrupts.

- Bad input that tests/test_cli.py does not already cover, as one table run
  in-process through ``onnxprune.cli.main``: each case ends with its
  documented exit code (README's table), one ``onnxprune: error:`` line on
  stderr, no traceback, and the directory exactly as it was (no output, no
  temp file, the input byte for byte unchanged).
- Fuzzing: seeded mutations of a small valid model's bytes (bit flips,
  truncations, insertions) and of its node attributes (wrong types,
  out-of-range values, wrong lengths, removal). Every outcome is success, with
  an output that passes onnx.checker's full check, or a documented typed
  error; never an internal error (exit 1).
- Interrupts: the CLI in a subprocess on a ~200 MB model, stopped with SIGINT,
  SIGTERM or SIGHUP at several points of its work (exit 128 + the signal, nothing
  left behind) and with SIGKILL (the output is absent or complete; only a
  staging folder may remain).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import AttributeProto, helper

import onnxprune
from onnxprune import cli

from graphs import retyped, small_cnn, write_mlp

TYPED_ERRORS = {2, 3, 4, 5}  # README's exit codes for user-facing errors (1 is a bug)


# ---------------------------------------------------------------- helpers

def snapshot(directory: Path) -> dict[str, str]:
    """Every file and folder under ``directory`` with a digest of its bytes."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


def run_main(capsys, *args) -> tuple[int, str]:
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_one_error_line(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got: {err!r}"
    assert lines[0].startswith("onnxprune: error: "), lines[0]
    assert "Traceback" not in err


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def save_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def edited(model: onnx.ModelProto, node: str, **attrs) -> onnx.ModelProto:
    """A copy of ``model`` with attributes of ``node`` replaced (None removes one)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    target = next(n for n in copy.graph.node if n.name == node)
    for name, value in attrs.items():
        kept = [a for a in target.attribute if a.name != name]
        del target.attribute[:]
        target.attribute.extend(kept)
        if value is not None:
            target.attribute.append(helper.make_attribute(name, value))
    return copy


# ---------------------------------------------------------------- bad input: builders
# Each builder gets the directory and a valid model in it, writes what it needs
# there and returns the command line.

def _bytes_case(mutate):
    def build(tmp: Path, model: Path) -> list:
        return [save_bytes(tmp / "bad.onnx", mutate(model.read_bytes())), "--structured", "0.4"]
    return build


def _model_case(change):
    def build(tmp: Path, model: Path) -> list:
        return [save(change(onnx.load(str(model))), tmp / "bad.onnx"), "--structured", "0.4"]
    return build


def _no_nodes(m):
    del m.graph.node[:]
    return m


def _only_custom_opset(m):
    del m.opset_import[:]
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    return m


def _newer_opset(m):
    m.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
    return m


def _binary_string_attribute(m):
    """A custom op carrying a binary blob as a string attribute (legal ONNX; gs cannot edit it)."""
    m.graph.node.append(helper.make_node("Blob", ["x"], ["blob"], name="blob", domain="com.example",
                                         payload=b"\xff\xfe\x00binary"))
    m.graph.output.append(helper.make_tensor_value_info("blob", onnx.TensorProto.FLOAT, [1, 4, 8, 8]))
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    return m


def _external_data(location: str | None):
    """The model with its weights in ``ext.data``; ``location`` rewrites where it points, None deletes it."""
    def build(tmp: Path, model: Path) -> list:
        path = tmp / "ext.onnx"
        onnx.save(onnx.load(str(model)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="ext.data", size_threshold=0)
        if location is None:
            (tmp / "ext.data").unlink()
        else:
            m = onnx.load(str(path), load_external_data=False)
            for t in m.graph.initializer:
                for entry in t.external_data:
                    if entry.key == "location":
                        entry.value = location
            onnx.save(m, str(path))
        return [path, "--structured", "0.4"]
    return build


def _plan(tmp: Path, model: Path) -> Path:
    path = tmp / "plan.json"
    onnxprune.prune(onnx.load(str(model)), 0.4).plan.save(path)
    return path


def _flags(*flags):
    return lambda tmp, model: [model, *flags]


def _hardlink_output(tmp: Path, model: Path) -> list:
    os.link(model, tmp / "link.onnx")
    return [model, "--structured", "0.4", "-o", tmp / "link.onnx"]


def _output_spelled_differently(tmp: Path, model: Path) -> list:
    (tmp / "sub").mkdir()
    return [model, "--structured", "0.4", "-o", tmp / "sub" / ".." / model.name]


def _side_files(*flags):
    """``-o out.onnx`` plus ``flags``, where "MODEL", "OUT", "PLAN" (a saved plan) stand for those files."""
    def build(tmp: Path, model: Path) -> list:
        names = {"MODEL": model, "OUT": tmp / "out.onnx"}
        if "PLAN" in flags:
            names["PLAN"] = _plan(tmp, model)
        args = [names.get(f, tmp / f if f.endswith(".json") else f) for f in flags]
        return [model, "-o", tmp / "out.onnx", *args]
    return build


def _info_json_is_input(tmp: Path, model: Path) -> list:
    return ["info", model, "--json", model]


BAD_INPUTS = [
    # unreadable or not a model (exit 3)
    pytest.param(_bytes_case(lambda b: b"\xff" + b[1:]), 3, id="first-byte-corrupted"),
    pytest.param(_bytes_case(lambda b: b[:-1]), 3, id="last-byte-cut"),
    pytest.param(_bytes_case(lambda b: b + b"\x00\x00garbage"), 3, id="trailing-garbage"),
    pytest.param(_bytes_case(lambda b: onnx.load_from_string(b).graph.SerializeToString()), 3, id="graph-not-model"),
    pytest.param(_model_case(_no_nodes), 3, id="graph-without-nodes"),
    pytest.param(_model_case(_only_custom_opset), 3, id="no-default-opset"),
    pytest.param(_external_data(None), 3, id="external-data-missing"),
    pytest.param(_external_data("../ext.data"), 3, id="external-data-outside-directory"),
    pytest.param(_external_data("/etc/hostname"), 3, id="external-data-absolute-path"),
    pytest.param(_bytes_case(lambda b: b.replace(b"gconv", b"\xe3conv")), 3, id="names-not-utf8"),
    # attributes that contradict the weights: onnx.checker's full check, or the group check (exit 3)
    pytest.param(_model_case(lambda m: edited(m, "fc", transB=1)), 3, id="gemm-transB-contradicts-weights"),
    pytest.param(_model_case(lambda m: edited(m, "conv", pads=[1, 1])), 3, id="conv-pads-too-few"),
    pytest.param(_model_case(lambda m: edited(m, "conv", strides=[1, 1, 1])), 3,
                 id="conv-strides-wrong-length"),
    pytest.param(_model_case(lambda m: edited(m, "gconv", group=0)), 3, id="conv-group-zero"),
    pytest.param(_model_case(lambda m: edited(m, "gconv", group=4)), 3, id="conv-group-mismatch"),
    pytest.param(_model_case(lambda m: edited(m, "split", axis=5)), 3, id="split-axis-out-of-range"),
    # data types (exit 3: not allowed by ONNX; exit 4: onnxruntime has no kernel)
    pytest.param(_model_case(lambda m: retyped(m, np.int32)), 3, id="int32-conv"),
    pytest.param(_model_case(lambda m: retyped(m, np.float64)), 4, id="float64-conv-no-runtime-kernel"),
    pytest.param(_model_case(_binary_string_attribute), 4, id="binary-string-attribute"),
    pytest.param(_model_case(_newer_opset), 4, id="opset-newer-than-known"),
    # flags (exit 2)
    pytest.param(_flags("--structured", "0.4", "--global", "--max-group-ratio", "nan"), 2, id="max-group-ratio-nan"),
    pytest.param(_flags("--structured", "0.4", "--global", "--max-group-ratio", "0"), 2, id="max-group-ratio-0"),
    pytest.param(_flags("--structured", "0.4", "--min-channels", "-1"), 2, id="min-channels-negative"),
    pytest.param(_flags("--structured", "0.4", "--seed", "x"), 2, id="seed-not-integer"),
    pytest.param(_flags("--structured", "0.4", "--input-shape", "x:0,4,8,8"), 2, id="input-shape-zero-dim"),
    pytest.param(_flags("--structured", "0.4", "--input-shape", "x:1,4,8"), 2, id="input-shape-wrong-rank"),
    pytest.param(_flags("--structured", "0.4", "--input-shape", "x:2,4,8,8"), 2, id="input-shape-conflicts"),
    pytest.param(lambda tmp, model: [model, "--plan-in", _plan(tmp, model), "--round-to=4"], 2,
                 id="plan-in-with-round-to="),
    # outputs that would overwrite something (exit 2)
    pytest.param(_hardlink_output, 2, id="output-hardlink-to-input"),
    pytest.param(_output_spelled_differently, 2, id="output-is-input-spelled-differently"),
    pytest.param(lambda tmp, model: [model, "--structured", "0.4", "-o", model / "out.onnx"], 2,
                 id="output-under-a-file"),
    pytest.param(_side_files("--structured", "0.4", "--report", "MODEL"), 2, id="report-is-input"),
    pytest.param(_side_files("--structured", "0.4", "--plan-out", "MODEL"), 2, id="plan-out-is-input"),
    pytest.param(_side_files("--structured", "0.4", "--report", "OUT"), 2, id="report-is-output"),
    pytest.param(_side_files("--structured", "0.4", "--report", "side.json", "--plan-out", "side.json"), 2,
                 id="report-is-plan-out"),
    pytest.param(_side_files("--plan-in", "PLAN", "--plan-out", "PLAN"), 2, id="plan-out-is-plan-in"),
    pytest.param(_info_json_is_input, 2, id="info-json-is-input"),
]


@pytest.mark.parametrize("build, code", BAD_INPUTS)
def test_bad_input(tmp_path, capsys, build, code):
    model = save(small_cnn(), tmp_path / "model.onnx")
    args = build(tmp_path, model)
    before = snapshot(tmp_path)
    exit_code, err = run_main(capsys, *args)
    assert exit_code == code, err
    assert_one_error_line(err)
    assert snapshot(tmp_path) == before  # no output, no temp file, every input as it was


def test_check_outputs_refuses_every_clash(tmp_path):
    """What api.prune_file and the commands call: one clash per output, then a clean set."""
    from onnxprune.model.save import check_outputs

    model = save(small_cnn(), tmp_path / "model.onnx")
    out, plan = tmp_path / "out.onnx", tmp_path / "plan.json"
    plan.write_text("{}")
    reads = {"the input model": model, "--plan-in": plan}
    clashes = [
        {"--report": model}, {"--plan-out": tmp_path / "." / "model.onnx"},
        {"-o": out, "--report": out}, {"--report": tmp_path / "r.json", "--plan-out": tmp_path / "r.json"},
        {"--plan-out": plan},
    ]
    for writes in clashes:
        for force in (False, True):
            with pytest.raises(onnxprune.UsageError, match="would overwrite"):
                check_outputs(writes, reads, force)
    check_outputs({"--report": tmp_path / "r.json", "--plan-out": tmp_path / "p.json"}, reads)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "plan.json"]


# ---------------------------------------------------------------- fuzzing

def assert_typed_outcome(capsys, directory: Path, model: Path) -> int:
    """Prune ``model``: success with a valid output, or a typed error that leaves nothing behind."""
    out = directory / "out.onnx"
    before = snapshot(directory)
    code, err = run_main(capsys, model, "--structured", "0.4", "-o", out)
    assert "Traceback" not in err and "internal error" not in err, err
    assert code == 0 or code in TYPED_ERRORS, err
    if code == 0:
        onnx.checker.check_model(str(out), full_check=True)
    else:
        assert_one_error_line(err)
        assert snapshot(directory) == before
    return code


def mutate_bytes(data: bytes, rng: np.random.Generator, kind: int) -> bytes:
    """Bit flips (kind 0), a truncation (1) or inserted random bytes (2)."""
    b = bytearray(data)
    if kind == 0:
        for _ in range(rng.integers(1, 8)):
            b[rng.integers(len(b))] ^= 1 << int(rng.integers(8))
    elif kind == 1:
        del b[rng.integers(1, len(b)):]
    else:
        for _ in range(rng.integers(1, 4)):
            at = int(rng.integers(len(b) + 1))
            b[at:at] = rng.integers(0, 256, rng.integers(1, 5), dtype=np.uint8).tobytes()
    return bytes(b)


@pytest.fixture(scope="module")
def valid_bytes() -> bytes:
    return small_cnn().SerializeToString()


@pytest.mark.parametrize("case", range(200))
def test_fuzzed_bytes_end_in_a_typed_outcome(tmp_path, capsys, valid_bytes, case):
    data = mutate_bytes(valid_bytes, np.random.default_rng(case), kind=case % 3)
    model = save_bytes(tmp_path / "fuzzed.onnx", data)
    assert_typed_outcome(capsys, tmp_path, model)
    assert model.read_bytes() == data


FUZZED_ATTRIBUTES = ("kernel_shape", "group", "axis", "perm", "pads", "strides")
_ODD_INTS = [-2**31, -100, -9, -1, 0, 1, 3, 7, 64, 2**40]


def mutate_attribute(model: onnx.ModelProto, rng: np.random.Generator) -> tuple[onnx.ModelProto, str]:
    """One attribute of ``FUZZED_ATTRIBUTES`` given a wrong type, odd values, a wrong length, or removed."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    targets = [(n, a) for n in copy.graph.node for a in n.attribute if a.name in FUZZED_ATTRIBUTES]
    node, attr = targets[rng.integers(len(targets))]
    name, kind = attr.name, int(rng.integers(5))
    listed = attr.type == AttributeProto.INTS
    if kind == 0:  # wrong type
        new = helper.make_attribute(name, [0.5, -1.0, "abc", b"\xff"][rng.integers(4)])
    elif kind == 1:  # a list for a scalar, a scalar for a list
        new = (helper.make_attribute(name, int(rng.choice(_ODD_INTS))) if listed
               else _ints(name, rng.choice(_ODD_INTS, rng.integers(0, 4))))
    elif kind == 2:  # odd values, same shape
        values = list(attr.ints) if listed else [attr.i]
        values[rng.integers(len(values))] = int(rng.choice(_ODD_INTS))
        new = _ints(name, values) if listed else helper.make_attribute(name, values[0])
    elif kind == 3:  # a list of another length, or shuffled with a repeat
        values = list(attr.ints) if listed else []
        rng.shuffle(values)
        new = _ints(name, values + values[:1] if values and rng.random() < 0.5
                    else rng.integers(-2, 6, rng.integers(0, 7)))
    else:
        node.attribute.remove(attr)
        return copy, f"{node.name}.{name} removed"
    attr.CopyFrom(new)
    return copy, f"{node.name}.{name} = {helper.get_attribute_value(attr)!r}"


def _ints(name: str, values) -> AttributeProto:
    return helper.make_attribute(name, [int(v) for v in values], attr_type=AttributeProto.INTS)


@pytest.mark.parametrize("case", range(100))
def test_fuzzed_attributes_end_in_a_typed_outcome(tmp_path, capsys, case):
    mutated, change = mutate_attribute(small_cnn(), np.random.default_rng(1000 + case))
    model = save(mutated, tmp_path / "fuzzed.onnx")
    data = model.read_bytes()
    code = assert_typed_outcome(capsys, tmp_path, model)
    assert model.read_bytes() == data, change
    if code == 0:  # the change was harmless (a default spelled out, a removed default): still prunable
        assert onnxprune.count_macs(onnx.load(str(tmp_path / "out.onnx"))) < onnxprune.count_macs(mutated), change


def test_fuzzing_reaches_every_outcome_class(tmp_path, valid_bytes):
    """The bit flips are not all rejected at parsing: some load, some fail the later checks."""
    from onnxprune.model.load import load_model

    outcomes = set()
    for case in range(0, 60, 3):  # the bit-flip cases of test_fuzzed_bytes_end_in_a_typed_outcome
        path = save_bytes(tmp_path / f"{case}.onnx", mutate_bytes(valid_bytes, np.random.default_rng(case), kind=0))
        try:
            onnx.load(str(path))
        except Exception:
            outcomes.add("unparsable")
            continue
        try:
            load_model(path)
            outcomes.add("loads")
        except onnxprune.OnnxPruneError:
            outcomes.add("parses, then rejected")
    assert outcomes == {"unparsable", "parses, then rejected", "loads"}, outcomes


# ---------------------------------------------------------------- interrupts

def _cli_command(*args) -> list[str]:
    script = Path(sys.executable).with_name("onnxprune")
    prefix = [str(script)] if script.exists() else [sys.executable, "-m", "onnxprune"]
    return prefix + [str(a) for a in args]


@pytest.fixture(scope="module")
def mlp_200mb(tmp_path_factory):
    """A ~200 MB MLP (4 layers of 4096 x 4096 float32): writing it takes a noticeable moment."""
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    write_mlp(path, 4096, 4)
    yield path, path.stat().st_size
    path.unlink()  # pytest keeps old tmp dirs: leave no 200 MB behind


def _bytes_read(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def _loading_numpy(pid: int) -> bool:
    """Whether the process has started loading its heavy modules (numpy's extension is mapped)."""
    with open(f"/proc/{pid}/maps") as f:
        return "numpy" in f.read()


def _temps(directory: Path) -> list[Path]:
    # model/publish.Staging writes the output under its name in a ".onnxprune-XXXXXXXX" folder
    # beside it and links it into place last: nothing carries the final name before that.
    return sorted(directory.glob(".onnxprune-*/out.onnx"))


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the moment to stop it"
        assert time.monotonic() < deadline, "the moment to stop the run never came"
        time.sleep(0.001)


# When to stop the run: after it has read the model (analysis and surgery
# start), half a second later, when the temp file appears (writing), when the temp
# file holds the model (verification), and a little later.
MOMENTS = {
    "starting": (lambda proc, out, size: _loading_numpy(proc.pid), 0.0),
    "analysing": (lambda proc, out, size: _bytes_read(proc.pid) >= size, 0.0),
    "cutting": (lambda proc, out, size: _bytes_read(proc.pid) >= size, 0.5),
    "writing": (lambda proc, out, size: bool(_temps(out)), 0.0),
    "verifying": (lambda proc, out, size: any(t.stat().st_size for t in _temps(out)), 0.0),
    "verifying-later": (lambda proc, out, size: any(t.stat().st_size for t in _temps(out)), 0.05),
}


def _default_sigint() -> None:
    """In the child before it starts: SIGINT back to its default. A suite run in the background
    by a shell without job control inherits SIGINT ignored, and Python (so the CLI) keeps an
    ignored SIGINT ignored: the runs would finish and exit 0."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # (a nohup run ignores SIGHUP)
        signal.signal(sig, signal.SIG_DFL)


def _interrupted_run(model: Path, size: int, out_dir: Path, moment: str, sig: int) -> tuple[int, str]:
    """Exit status and stderr of a run stopped with ``sig`` at ``moment``."""
    proc = subprocess.Popen(_cli_command(model, "--structured", "0.5", "-o", out_dir / "out.onnx"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    ready, delay = MOMENTS[moment]
    try:
        _wait_for(proc, lambda: ready(proc, out_dir, size))
        time.sleep(delay)
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the signal"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


def _assert_absent_or_complete(path: Path) -> None:
    if path.exists():
        onnx.checker.check_model(str(path), full_check=True)
        onnx.load(str(path))


STOPS = [(moment, signal.SIGINT) for moment in MOMENTS] + [
    ("analysing", signal.SIGTERM), ("writing", signal.SIGTERM), ("verifying", signal.SIGTERM),
    ("verifying", signal.SIGHUP)]


@pytest.mark.slow
@pytest.mark.parametrize("moment, sig", STOPS, ids=[f"{m}-{s.name}" for m, s in STOPS])
def test_a_stopping_signal_leaves_nothing_half_written(mlp_200mb, tmp_path, moment, sig):
    model, size = mlp_200mb
    before = hashlib.sha256(model.read_bytes()).hexdigest()
    code, err = _interrupted_run(model, size, tmp_path, moment, sig)
    assert code == 128 + sig, err
    what = "interrupted" if sig == signal.SIGINT else f"stopped by {sig.name}"
    assert err.strip() == f"onnxprune: {what}; nothing written", err
    assert not list(tmp_path.glob(".onnxprune-*"))  # no staging folder either
    assert not _temps(tmp_path)
    _assert_absent_or_complete(tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["out.onnx"])
    assert hashlib.sha256(model.read_bytes()).hexdigest() == before


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["cutting", "writing", "verifying"])
def test_sigkill_never_leaves_a_partial_output(mlp_200mb, tmp_path, moment):
    model, size = mlp_200mb
    code, _ = _interrupted_run(model, size, tmp_path, moment, signal.SIGKILL)
    assert code == -signal.SIGKILL
    _assert_absent_or_complete(tmp_path / "out.onnx")
    leftovers = {p.name for p in tmp_path.iterdir()} - {"out.onnx"}
    assert leftovers == {t.parent.name for t in _temps(tmp_path)}  # only staging, never the final name
    if moment != "cutting":
        assert leftovers, "killed while writing: the temp file is expected to remain"
    for p in tmp_path.iterdir():  # up to 100 MB each: pytest keeps old tmp dirs
        shutil.rmtree(p) if p.is_dir() else p.unlink()
