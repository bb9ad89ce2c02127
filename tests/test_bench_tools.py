"""The accuracy benchmarks' own logic: skipping without data, intervals, the targets' verdicts,
and the text model's corpus split and perplexity (tools/bench_pretrained.py, tools/bench_quantized.py,
tools/make_text_model.py, tools/bench_depth.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tools import bench_depth, bench_quantized
from tools import bench_pretrained as bench
from tools import make_text_model as text


def test_the_pretrained_benchmark_skips_with_its_reason_when_the_photos_are_absent(tmp_path, capsys):
    assert bench.main(["--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("skipped: ") and "imagenet-500 not found" in out


def test_the_quantization_benchmark_skips_with_its_reason_when_the_photos_are_absent(tmp_path, capsys):
    assert bench_quantized.main(["--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("skipped: ") and "imagenet-500 not found" in out


def test_the_quantization_table_gives_ratios_to_each_models_float_row():
    rows = [{"model": m, "variant": v, "macs": macs, "size": size, "ms_1t": ms, "top1": top1}
            for m, top1 in (("lite1", 80.0), ("resnet50", None))
            for v, macs, size, ms in (("float", 6e8, 2e7, 40.0), ("pruned + int8", 3e8, 5e6, 10.0))]
    lines = bench_quantized.table(rows, [1]).splitlines()
    assert lines[0] == "| model | variant | MACs | size MB | batch 1, 1 thread ms | held-out top-1 |"
    assert lines[3] == "| lite1 | pruned + int8 | 0.300G (2.00x fewer) | 5.00 | 10.0 (4.00x) | 80.0% |"
    assert lines[4].endswith("| 40.0 (1.00x) | n/a (random weights) |")


def test_bootstrap_interval_brackets_the_mean_and_is_paired():
    hits = np.array([1.0] * 150 + [0.0] * 100)
    lo, hi = bench.interval(hits)
    assert lo < 60.0 < hi and hi - lo < 15
    row = {"top1": 60.0, "_hits": hits}
    assert bench.difference(row, row) == "+0.0 points [+0.0, +0.0]"  # the same resamples for both


def test_targets_pass_and_fail_as_measured():
    def row(top1, macs):
        hits = np.zeros(250)
        hits[: int(round(top1 * 2.5))] = 1.0
        return {"top1": 100 * hits.mean(), "_hits": hits, "macs": macs, "macs_ratio": 1000 / macs}

    rows = {"original": row(84, 1000), "data": row(80, 700), "distill": row(80, 700),
            "tp": row(70, 705), "tp-distill": row(82, 700)}
    verdicts = {t["target"]: t["pass"] for t in bench.targets(rows)}
    assert verdicts["reconstruction alone within 5 points of the original"] is True
    assert verdicts["with distillation within 3 points of the original"] is False
    assert verdicts["reconstruction >= Torch-Pruning without recovery, MACs within 2%"] is True
    assert verdicts["distillation >= Torch-Pruning with the same loop, MACs within 2%"] is False
    assert all(v for k, v in verdicts.items() if "1.4x" in k)


def test_the_text_corpus_holds_out_every_tenth_file_and_windows_predict_the_next_byte(tmp_path):
    for i in range(25):
        (tmp_path / f"m{i:02d}.py").write_text(f"x = {i}\n" * 40)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "t.py").write_text("excluded\n")
    files = text.corpus_files(tmp_path)
    assert len(files) == 25 and all("test" not in f.parts for f in files)
    train, held = text.split_files(files)
    assert len(held) == 2 and not set(train) & set(held)
    stream = text.byte_stream(train)
    pair = text.windows(stream, np.array([0, 7]))
    np.testing.assert_array_equal(pair["labels"][:, :-1], pair["input_ids"][:, 1:])


def test_perplexity_is_the_exponent_of_the_mean_next_byte_cross_entropy(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = text.build_model(layers=1, hidden=16, heads=2).eval()
    path = tmp_path / "lm.onnx"
    text.export(model, path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, text.VOCAB, size=(3, text.CONTEXT + 1))
    data = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    with torch.no_grad():
        logits = model(torch.from_numpy(data["input_ids"]))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, text.VOCAB),
                                                 torch.from_numpy(data["labels"]).reshape(-1))
    assert text.perplexity(path, data, batch_size=2) == pytest.approx(math.exp(float(loss)), rel=1e-4)


def test_the_scaling_benchmark_model_couples_every_block_into_one_group():
    """tools/bench_analysis_scaling.py: the chain it times is what its docstring says (the
    residual Adds tie every conv's output channels together), and its table prints."""
    import onnx

    import onnxprune
    from tools import bench_analysis_scaling as scaling

    model = scaling.residual_chain(300)
    onnx.checker.check_model(model, full_check=True)
    assert len(model.graph.node) == 300
    groups = onnxprune.analyse(model).groups
    coupled = max(groups, key=lambda g: len(g.sources))
    assert len(coupled.sources) == 100 and coupled.size == 4
    assert scaling.time_analysis(model, repeat=1) > 0


def test_the_cost_table_gives_ratios_to_the_model_and_the_io_floor_and_fits_seconds_per_gb():
    from tools import bench_cost

    rows = [bench_cost._row("a", 10**9, {"cli": [{"seconds": 4.0, "cpu_seconds": 5.0, "peak_rss_bytes": 2 * 10**9},
                                                 {"seconds": 6.0, "cpu_seconds": 7.0, "peak_rss_bytes": 3 * 10**9},
                                                 {"seconds": 5.0, "cpu_seconds": 6.0, "peak_rss_bytes": 2.5e9}],
                                         "floor": [{"seconds": 2.0}], "torch_pruning": [{"error": "exit 1: boom"}]}),
            bench_cost._row("b", 2 * 10**9, {"cli": [{"seconds": 9.0, "cpu_seconds": 9.0, "peak_rss_bytes": 4e9}],
                                             "floor": [{"seconds": 3.0}],
                                             "torch_pruning": [{"prune_seconds": 1.0, "export_seconds": 2.5}]})]
    text = bench_cost.table(rows)
    # medians: a's CLI 5 s against a 2 s floor, 2.5e9 bytes of RSS for a 1e9-byte model
    assert "| a | 1000 | 5.00 | 6.00 | 2384 | 2.50x | 2.00 | 2.50x | - | - |" in text
    assert "| b | 2000 | 9.00 | 9.00 | 3815 | 2.00x | 3.00 | 3.00x | 1.00 | 3.50 |" in text
    assert "4.0 s per GB of model" in text and "a: exit 1: boom" in text


def test_the_depth_benchmarks_accuracy_part_skips_with_its_reason_when_the_photos_are_absent(tmp_path, capsys):
    assert bench_depth.main(["--part", "accuracy", "--data-dir", str(tmp_path)]) == 0
    assert "accuracy part skipped: " in capsys.readouterr().out


@pytest.mark.parametrize("valid,blocks,speedup,passed", [
    (True, 3, 1.25, True),  # MACs fell 20%, latency 20%: 1.0x the MACs' fall
    (True, 3, 1.2, False),  # latency fell 16.7% < 0.9 x 20%
    (True, 2, 1.5, False),  # fewer than 3 blocks
    (False, 3, 1.5, False),  # not valid or not the same IO
    (True, 3, None, False),  # not timed
])
def test_the_point_6_verdict_compares_the_latency_fall_with_the_macs_fall(valid, blocks, speedup, passed):
    verdict = bench_depth.point6_verdict(valid, blocks, 0.8, speedup)
    assert verdict["pass"] is passed and verdict["macs_fall"] == pytest.approx(0.2)


def test_the_depth_latency_table_gives_ratios_and_efficiency_against_the_base():
    base = bench_depth.Row("m", "base", "b.onnx", macs=2e9, speedup={"cpu": {1: 1.0}}, median_ms={"cpu": {1: 10.0}})
    depth = bench_depth.Row("m", "depth", "d.onnx", macs=1e9, blocks=4, speedup={"cpu": {1: 1.6}},
                            median_ms={"cpu": {1: 6.25}})
    failed = bench_depth.Row("m", "width", error="UsageError: no")
    lines = bench_depth.latency_table([base, depth, failed], [1])
    assert lines[0] == "| model | MACs | MACs ratio | blocks removed | channel ratio | bs1 ms | bs1 speedup | bs1 eff |"
    assert lines[3] == "| depth | 1.00G | 2.00x | 4 | - | 6.2 | 1.60x | 0.80 |"
    assert lines[4].startswith("| width | failed: UsageError: no |")
