"""The default kept-width rounding ("auto", planning/plan.py): multiples of 8, halved while >12.5% off."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnxprune.planning.plan import _keep_count


class Group:
    """What the kept-count rule reads of a channel group: its width and its units."""

    def __init__(self, size: int, unit: int = 1):
        self.size = size
        self.members = [np.arange(i, i + unit) for i in range(0, size, unit)]

    def unit_members(self):
        return self.members


@pytest.mark.parametrize("size, ratio, kept", [
    (256, 0.3, 176),  # 179.2 asked: 176 is 1.8% off
    (64, 0.3, 48),  # 44.8: 48 is 7% off
    (2048, 0.5, 1024),
    (16, 0.3, 12),  # 11.2: 8 is 29% off, 12 (a multiple of 4) 7%
    (16, 0.4, 10),  # 9.6: 8 and 8 are 17% off (multiples of 8, 4), 10 is 4%
    (10, 0.3, 7),  # 7: 8 (a multiple of 8, 4 and 2) is 14% off: exact
    (3, 0.5, 2),  # narrower than any multiple: never left whole for it
])
def test_auto_takes_the_largest_multiple_within_an_eighth(size, ratio, kept):
    target = size * (1 - ratio)
    assert _keep_count(Group(size), target, "auto", 1) == kept
    assert abs(kept - target) <= 0.125 * target or kept == round(target)


def test_auto_never_goes_below_min_channels():
    assert _keep_count(Group(64), 64 * 0.1, "auto", 12) == 12  # 6.4 asked, 12 the floor: 16 (of 8) is further off
    assert _keep_count(Group(64), 64 * 0.1, "auto", 1) == 6


def test_auto_leaves_head_counts_alone():
    # 12 heads of 64 at ratio 0.3: 8.4 heads asked; rounded to 8 heads' worth of channels it would be 8 heads
    # either way, but 7 heads of 6 (42) must stay 7 heads, not become 8 or 6.
    assert _keep_count(Group(12 * 64, unit=64), 12 * 64 * 0.7, "auto", 1) == 8 * 64
    assert _keep_count(Group(7 * 6, unit=6), 7 * 6 * (1 - 1 / 7), "auto", 1) == 6 * 6


def test_an_explicit_multiple_is_exact_and_one_opts_out():
    assert _keep_count(Group(16), 11.2, 8, 1) == 8  # the fixed rule: nearest multiple, however far
    assert _keep_count(Group(256), 179.2, 1, 1) == 179


def test_the_command_line_default_rounds_and_says_so(tmp_path, capsys):
    from test_cli import run_main, tiny_cnn, weights

    model = tmp_path / "model.onnx"
    onnx.save(tiny_cnn(), model)
    code, out, err = run_main(capsys, model, "--structured", "0.4", "-o", tmp_path / "out.onnx",
                              "--report", tmp_path / "r.json")
    assert code == 0, err
    w = weights(tmp_path / "out.onnx")
    assert [w["conv1.weight"].shape[0], w["conv2.weight"].shape[0]] == [10, 20]  # 9.6 -> 10 (of 2), 19.2 -> 20 (of 4)
    assert "widths multiples of 8 where within 12.5% (--round-to 1: exact)" in out
    assert json.loads((tmp_path / "r.json").read_text())["round_to"] == "auto"
    code, _, err = run_main(capsys, model, "--structured", "0.4", "--round-to", "auto", "-o", tmp_path / "a.onnx")
    assert code == 0, err
    assert weights(tmp_path / "a.onnx")["conv2.weight"].shape[0] == 20


def test_round_to_rejects_other_words(tmp_path, capsys):
    from test_cli import run_main, tiny_cnn

    model = tmp_path / "model.onnx"
    onnx.save(tiny_cnn(), model)
    code, _, err = run_main(capsys, model, "--structured", "0.4", "--round-to", "fast", "-o", tmp_path / "o.onnx")
    assert code == 2 and "--round-to" in err and "not an integer" in err
    assert not (tmp_path / "o.onnx").exists()


def test_bench_latency_verdict_compares_the_default_with_the_best_torch_pruning_variant():
    from tools.bench_latency import Row, _round_list, verdict_lines

    assert _round_list("default,none,8") == [None, 1, 8]
    base = Row("m", "base", None, None, path="b", macs=100)
    ours = Row("m", "onnxprune", 0.3, None, path="o", macs=50, speedup={"cpu": {1: 1.9}})
    tp8 = Row("m", "Torch-Pruning", 0.3, 8, path="t8", macs=50, speedup={"cpu": {1: 2.0}})
    tp1 = Row("m", "Torch-Pruning", 0.3, 1, path="t1", macs=40, speedup={"cpu": {1: 2.0}})
    (line,) = verdict_lines([base, ours, tp8, tp1], "cpu", [1])
    # efficiencies: ours 1.9 / 2 = 0.95, TP r8 2.0 / 2 = 1.0 (its best), TP r1 2.0 / 2.5 = 0.8
    assert "Torch-Pruning 0.3 r8" in line and "0.95x" in line and "meets" in line
