"""Sensitivity analysis, --ratios files and --allocate sensitivity, on graphs with known answers."""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import onnx
import pytest

from onnxprune.api import analyse, prune
from onnxprune.cli import main
from onnxprune.data import Dataset
from onnxprune.errors import UsageError
from onnxprune.metrics import Reference
from onnxprune.pipeline.sensitivity import measure_sensitivity
from onnxprune.planning.allocation import allocation_grid, choose_allocation
from onnxprune.planning.plan import Plan
from onnxprune.planning.ratios import resolve_ratios
from onnxprune.report.sensitivity import GroupSensitivity, Sensitivity

from graphs import GraphBuilder, run

C = 8  # channels of a1 and b1
A1, B1, SUM = "a1_out", "b1_out", "a2_out"  # group ids: the first source's output
HEAD = "head_out"  # reaches the graph output: blocked


def two_branch_model(a_scale: float = 0.0, ramp: bool = True) -> onnx.ModelProto:
    """x(N,3,6,6) -> two branches added -> Relu -> GAP -> Flatten -> Gemm "head" (5 -> 4 classes).

    branch a: Conv3x3 "a1" (3->C) -> Relu -> Conv1x1 "a2" (C->5), a2's weights times ``a_scale``
              (0: a1's channels reach nothing, so cutting them changes nothing)
    branch b: Conv3x3 "b1" (3->C) -> Relu -> Conv1x1 "b2" (C->5); with ``ramp`` b1's filter k is
              scaled by 2**k, so each channel removed (smallest first) weighs more than all before it
    Groups: a1 (C), b1 (C), {a2, b2} (5, tied by the Add); head is blocked.
    """
    b = GraphBuilder(seed=1)
    x = b.input("x", ["N", 3, 6, 6])
    a = b.op("Relu", [b.conv(x, 3, C, name="a1")], name="a_relu")
    a2_w = (b.rng.standard_normal((5, C, 1, 1)) / np.sqrt(C) * a_scale).astype(np.float32)
    a = b.conv(a, C, 5, k=1, name="a2", w=b.const(a2_w, "a2.W"))
    b1_w = (b.rng.standard_normal((C, 3, 3, 3)) / np.sqrt(27)).astype(np.float32)
    b1_b = (b.rng.standard_normal(C) / 2).astype(np.float32)
    b2_w = b.rng.standard_normal((5, C, 1, 1)).astype(np.float32)
    if ramp:  # b2's columns all of one magnitude, so l1 ranks b1's channels by the ramp
        scale = (2.0 ** np.arange(C) / 2 ** C).astype(np.float32)
        b1_w, b1_b = b1_w * scale[:, None, None, None], b1_b * scale
        b2_w = np.sign(b2_w) / np.float32(np.sqrt(C))
    h = b.conv(x, 3, C, name="b1", w=b.const(b1_w, "b1.W"), b=b.const(b1_b, "b1.B"))
    h = b.conv(b.op("Relu", [h], name="b_relu"), C, 5, k=1, name="b2", w=b.const(b2_w, "b2.W"))
    y = b.op("Relu", [b.op("Add", [a, h], name="sum")], name="relu")
    y = b.op("Flatten", [b.op("GlobalAveragePool", [y], name="gap")], name="flat")
    return b.build(b.gemm(y, 5, 4, name="head"))


def dataset(model: onnx.ModelProto, n: int = 48, seed: int = 0) -> Dataset:
    """Random inputs labelled with the model's own predictions (so its accuracy is exactly 1)."""
    x = np.random.default_rng(seed).standard_normal((n, 3, 6, 6)).astype(np.float32)
    labels = run(model, {"x": x})[0].argmax(1).astype(np.int64)
    return Dataset({"x": x}, labels, "memory")


def by_id(result: Sensitivity) -> dict[str, GroupSensitivity]:
    return {g.id: g for g in result.groups}


def write_case(tmp_path, model=None, **data_options):
    model = model or two_branch_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    data = dataset(model, **data_options)
    np.savez(tmp_path / "d.npz", x=data.inputs["x"], labels=data.labels)
    return path, tmp_path / "d.npz"


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- measuring -----------------------------------------------------------------------------

def test_silent_group_has_zero_error_and_a_weighty_group_rising_error():
    model = two_branch_model()
    before = model.SerializeToString()
    result = measure_sensitivity(model, dataset(model), [0.0, 0.25, 0.5, 0.75], compensate=False)
    groups = by_id(result)
    assert set(groups) == {A1, B1, SUM}  # the blocked head is not measured
    assert groups[A1].removed == [0, 2, 4, 6]
    assert max(groups[A1].error) < 1e-6
    assert groups[A1].accuracy == [1.0] * 4
    b1 = groups[B1].error
    assert b1[0] == 0.0 and 0 < b1[1] < b1[2] < b1[3]
    assert result.baseline_accuracy == 1.0
    assert all(g.error[0] == 0.0 for g in result.groups)
    assert model.SerializeToString() == before


def test_labels_that_do_not_fit_give_no_accuracy():
    model = two_branch_model()
    data = dataset(model)
    data.labels = data.labels.astype(np.float32)  # not class indices
    result = measure_sensitivity(model, data, [0.5])
    assert result.baseline_accuracy is None and all(g.accuracy is None for g in result.groups)


def test_table_lists_groups_by_source_with_a_column_per_ratio():
    model = two_branch_model()
    table = measure_sensitivity(model, dataset(model), [0.25, 0.5]).table().splitlines()
    assert table[0].split()[-2:] == ["0.25", "0.5"]
    row = next(line for line in table if line.startswith("a2, b2"))
    assert row.split()[2] == "5"  # channels
    assert "original 100.00%" in table[-1]


def test_bad_ratios_to_try():
    model = two_branch_model()
    with pytest.raises(UsageError, match=r"\[0, 1\)"):
        measure_sensitivity(model, dataset(model), [0.5, 1.0])


# --- allocation ------------------------------------------------------------------------------

def synthetic(errors: dict[str, list[float]], channels: int = 10) -> Sensitivity:
    ratios = [0.2, 0.4, 0.6]
    groups = [GroupSensitivity(gid, [gid], channels, [int(r * channels) for r in ratios], e)
              for gid, e in errors.items()]
    return Sensitivity(ratios, "l1", 8, False, None, groups)


def test_allocation_cuts_the_cheap_group_first_and_meets_the_target():
    allocation = choose_allocation(synthetic({"cheap": [0.01, 0.02, 0.03], "dear": [0.5, 0.8, 0.9]}), 0.3)
    assert allocation.ratios == {"cheap": 0.6, "dear": 0.0}
    assert allocation.removed == 6 and allocation.removed / allocation.channels >= 0.3


def test_allocation_looks_past_a_costly_first_step():
    # "late" costs 0.2 at the first step, then nothing more: per channel the best deal overall
    allocation = choose_allocation(synthetic({"late": [0.2, 0.2, 0.2], "even": [0.1, 0.2, 0.3]}), 0.3)
    assert allocation.ratios["late"] == 0.6


def test_allocation_that_cannot_reach_the_target_is_a_usage_error():
    with pytest.raises(UsageError, match="short of 0.7"):
        choose_allocation(synthetic({"a": [0.1, 0.2, 0.3], "b": [0.1, 0.2, 0.3]}), 0.7)


def test_allocation_grid_reaches_twice_the_target_and_holds_it():
    assert allocation_grid(0.3) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert allocation_grid(0.25)[-1] == 0.5 and 0.25 in allocation_grid(0.25)
    assert allocation_grid(0.6)[-1] == 0.9


def test_allocate_sensitivity_beats_uniform_on_a_lopsided_model():
    model = two_branch_model(a_scale=0.02, ramp=False)  # a1 barely matters, b1 and the Add group do
    data = dataset(model, n=64)
    total = 2 * C + 5
    uniform = prune(model, 0.3, data=data)
    allocated = prune(model, 0.3, data=data, allocate="sensitivity")
    kept = {gid: len(keep) for gid, keep in allocated.plan.keep.items()}
    removed = total - sum(kept.values())
    assert removed >= 0.3 * total
    assert removed >= total - sum(len(k) for k in uniform.plan.keep.values())
    assert C - kept[A1] > C - kept[B1]  # the quiet group gives the most
    reference = Reference(model, data, 32)
    errors = {name: reference.measure(m).output_error for name, m in
              (("uniform", uniform.model), ("allocated", allocated.model))}
    assert errors["allocated"] < 0.7 * errors["uniform"]
    report = allocated.report.to_json()["allocation"]
    assert report["removed_fraction"] == removed / total and report["target"] == 0.3
    assert {g["id"]: g["ratio"] for g in report["groups"]}[A1] == max(allocation_grid(0.3))


def test_allocation_measures_its_cuts_on_a_seeded_subset(monkeypatch):
    """Each of an allocation's cuts runs on at most ALLOCATION_SAMPLES samples, the same ones
    for every cut; the statistics the cut's compensation and refit use still come from all."""
    from onnxprune.pipeline import sensitivity

    model = two_branch_model(a_scale=0.02, ramp=False)
    data = dataset(model, n=40)
    monkeypatch.setattr(sensitivity, "ALLOCATION_SAMPLES", 24)
    seen = []
    measure = sensitivity.measure_sensitivity

    def spy(model, data, *args, **kwargs):
        seen.append(data.inputs["x"])
        return measure(model, data, *args, **kwargs)

    monkeypatch.setattr(sensitivity, "measure_sensitivity", spy)
    first = prune(model, 0.3, data=data, allocate="sensitivity")
    again = prune(model, 0.3, data=data, allocate="sensitivity")
    assert [len(x) for x in seen] == [24, 24]
    np.testing.assert_array_equal(seen[0], seen[1])  # seeded: the same subset, the same plan
    assert first.plan.keep == again.plan.keep


# --- ratio files ---------------------------------------------------------------------------------

def test_ratios_by_id_and_glob_with_later_keys_winning():
    groups = analyse(two_branch_model()).groups
    assert resolve_ratios(groups, {"*": 0.1, A1: 0.5, "b?": 0.25, "a2": 0.4}) == {A1: 0.5, B1: 0.25, SUM: 0.4}


@pytest.mark.parametrize("mapping, message", [
    ({"nothing*": 0.5}, "matches no group id or source node"),
    ({HEAD: 0.5}, "cannot be pruned (reaches graph output"),
    ({A1: 1.0}, "must be a number in [0, 1)"),
    ({A1: "half"}, "must be a number in [0, 1)"),
    ({A1: True}, "must be a number in [0, 1)"),
    ({}, "non-empty mapping"),
])
def test_bad_ratio_mappings(mapping, message):
    with pytest.raises(UsageError) as caught:
        resolve_ratios(analyse(two_branch_model()).groups, mapping)
    assert message in str(caught.value)


def test_cli_ratios_file_is_applied_exactly(tmp_path, capsys):
    path, _ = write_case(tmp_path)
    before = digest(path)
    (tmp_path / "r.json").write_text(json.dumps({A1: 0.5, "b1": 0.25}))
    for extra, whole in (([], 5), (["--structured", "0.4"], 3)):
        code = main([str(path), "--ratios", str(tmp_path / "r.json"), "--plan-out", str(tmp_path / "p.json"),
                     "--dry-run", "-q", "--force"] + extra)  # --force: the second run replaces the first's plan
        assert code == 0, capsys.readouterr().err
        kept = {gid: len(k) for gid, k in Plan.load(tmp_path / "p.json").keep.items()}
        assert kept == {A1: 4, B1: 6, SUM: whole}
    assert digest(path) == before


def test_cli_ratios_yaml(tmp_path, capsys):
    pytest.importorskip("yaml")
    path, _ = write_case(tmp_path)
    (tmp_path / "r.yaml").write_text(f"{A1}: 0.5\n'a2': 0.4\n")
    code = main([str(path), "--ratios", str(tmp_path / "r.yaml"), "--plan-out", str(tmp_path / "p.json"),
                 "--dry-run", "-q"])
    assert code == 0, capsys.readouterr().err
    kept = {gid: len(k) for gid, k in Plan.load(tmp_path / "p.json").keep.items()}
    assert kept[A1] == 4 and kept[SUM] == 3 and kept[B1] == C


def test_yaml_without_pyyaml_says_use_json(tmp_path, capsys, monkeypatch):
    path, _ = write_case(tmp_path)
    (tmp_path / "r.yml").write_text(f"{A1}: 0.5\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml -> ImportError
    code = main([str(path), "--ratios", str(tmp_path / "r.yml"), "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "PyYAML" in err[0] and "JSON" in err[0]


@pytest.mark.parametrize("content, extra, message", [
    ('{"zzz": 0.5}', [], "matches no group id or source node"),
    ('{"a1_out": 1.5}', [], "must be a number in [0, 1)"),
    ("{not json", [], "not valid JSON"),
    ('[0.5]', [], "non-empty mapping"),
    (None, [], "cannot read"),
    ('{"a1_out": 0.5}', ["--allocate", "sensitivity", "--structured", "0.3", "--data", "D"], "exclusive"),
    ('{"a1_out": 0.5}', ["--steps", "2", "--structured", "0.3"], "--steps"),
])
def test_cli_ratio_file_errors(tmp_path, capsys, content, extra, message):
    path, data = write_case(tmp_path)
    ratios = tmp_path / "r.json"
    if content is not None:
        ratios.write_text(content)
    extra = [str(data) if a == "D" else a for a in extra]
    code = main([str(path), "--ratios", str(ratios), "--dry-run"] + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("extra, message", [
    (["--structured", "0.3"], "give --data"),
    (["--data", "D"], "--structured R"),
    (["--structured", "0.3", "--data", "D", "--global"], "exclusive"),
    (["--plan-in", "P", "--data", "D"], "--plan-in"),
    (["--structured", "0.3", "--data", "D", "--allocate", "even"], "invalid choice"),
])
def test_cli_allocate_errors(tmp_path, capsys, extra, message):
    path, data = write_case(tmp_path)
    Plan(keep={A1: [0, 1]}, sizes={A1: C}).save(tmp_path / "p.json")
    extra = [{"D": str(data), "P": str(tmp_path / "p.json")}.get(a, a) for a in extra]
    if "even" not in extra:
        extra = ["--allocate", "sensitivity"] + extra
    code = main([str(path), "--dry-run"] + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_cli_allocate_reports_the_chosen_ratios(tmp_path, capsys):
    path, data = write_case(tmp_path, two_branch_model(a_scale=0.02, ramp=False))
    before = digest(path)
    code = main([str(path), "--structured", "0.3", "--allocate", "sensitivity", "--data", str(data), "-v",
                 "--report", str(tmp_path / "r.json"), "-o", str(tmp_path / "out.onnx")])
    out = capsys.readouterr().out
    assert code == 0
    allocation = json.loads((tmp_path / "r.json").read_text())["allocation"]
    assert allocation["method"] == "sensitivity" and allocation["removed_fraction"] >= 0.3
    assert [g["id"] for g in allocation["groups"]] == [A1, B1, SUM]
    assert "allocation  by sensitivity" in out and "a1" in out.split("allocation", 1)[1]
    assert (tmp_path / "out.onnx").exists() and digest(path) == before


# --- the sensitivity command -------------------------------------------------------------------

def test_cli_sensitivity_writes_table_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path, data = write_case(tmp_path)
    before = digest(path)
    code = main(["sensitivity", str(path), "--data", str(data), "--ratios-to-try", "0.25,0.5",
                 "--calib-samples", "32", "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")])
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[0].split()[-2:] == ["0.25", "0.5"] and "a1" in out
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["ratios"] == [0.25, 0.5] and saved["samples"] == 32
    assert {g["id"]: g["removed"] for g in saved["groups"]}[A1] == [2, 4]
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert digest(path) == before


def test_cli_sensitivity_quiet_prints_nothing(tmp_path, capsys):
    path, data = write_case(tmp_path)
    assert main(["sensitivity", str(path), "--data", str(data), "--ratios-to-try", "0.5", "-q"]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("extra, message", [
    ([], "give --data"),
    (["--data", "D", "--ratios-to-try", "0.2,1"], "must be in [0, 1)"),
    (["--data", "D", "--ratios-to-try", "x"], "not a number"),
    (["--data", "D", "--json", "/nonexistent/dir/s.json"], "does not exist"),
    (["--data", "D", "--importance", "magic"], "invalid choice"),
])
def test_cli_sensitivity_errors(tmp_path, capsys, extra, message):
    path, data = write_case(tmp_path)
    code = main(["sensitivity", str(path)] + [str(data) if a == "D" else a for a in extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_cli_plot_without_matplotlib_fails_before_measuring(tmp_path, capsys, monkeypatch):
    path, data = write_case(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code = main(["sensitivity", str(path), "--data", str(data), "--plot", str(tmp_path / "s.png"),
                 "--json", str(tmp_path / "s.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "needs matplotlib" in err[0]
    assert not (tmp_path / "s.json").exists()


# --- the KL of a classifier's logits -----------------------------------------------------------

def test_kl_divergence_of_logits_is_zero_for_equal_rows_and_matches_its_definition():
    from onnxprune.metrics import kl_divergences

    rng = np.random.default_rng(0)
    p, q = rng.standard_normal((3, 5)) * 4, rng.standard_normal((3, 5))
    assert np.allclose(kl_divergences(p, p + 7.0), 0.0, atol=1e-12)  # a shift leaves softmax as it is
    sp, sq = np.exp(p) / np.exp(p).sum(1, keepdims=True), np.exp(q) / np.exp(q).sum(1, keepdims=True)
    assert np.allclose(kl_divergences(p, q), np.sum(sp * np.log(sp / sq), 1), rtol=1e-9)
    q[1, 2] = np.nan
    assert np.isinf(kl_divergences(p, q)).all()


def test_sensitivity_of_a_classifier_records_the_kl_of_each_cut():
    model = two_branch_model(a_scale=0.02, ramp=False)
    result = measure_sensitivity(model, dataset(model, n=16), [0.25, 0.5])
    by_id = {g.id: g for g in result.groups}
    # every cut disturbs the logits, the quiet branch's far less than the loud one's
    assert all(len(g.divergence) == 2 and min(g.divergence) >= 0 for g in result.groups)
    assert by_id[A1].divergence[1] < by_id[B1].divergence[1]
    assert by_id[B1].divergence[1] > by_id[B1].divergence[0] > 0
    assert json.loads(json.dumps(result.to_json()))["groups"][0]["divergence"] == result.groups[0].divergence


def test_allocation_takes_its_steps_by_the_kl_only_when_asked(monkeypatch):
    from onnxprune.planning import allocation

    sensitivity = synthetic({"a": [0.01, 0.02, 0.03], "b": [0.5, 0.8, 0.9]})
    sensitivity.groups[0].divergence, sensitivity.groups[1].divergence = [0.5, 0.8, 0.9], [0.001, 0.002, 0.003]
    assert choose_allocation(sensitivity, 0.3).ratios == {"a": 0.6, "b": 0.0}  # by the error: the default
    monkeypatch.setattr(allocation, "DAMAGE", "divergence")
    chosen = choose_allocation(sensitivity, 0.3)
    assert chosen.ratios == {"a": 0.0, "b": 0.6}
    assert chosen.chosen_error == {"a": 0.0, "b": 0.9}  # the report still gives the output error
