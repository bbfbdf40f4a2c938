"""benchmarks/memory.py in its CPU smoke mode: every row, its JSON fields, the plot; over-cap rows."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("memory_benchmark", ROOT / "benchmarks" / "memory.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_memory_benchmark_cpu_smoke(tmp_path):
    script = load_script()
    out = tmp_path / "memory_test"
    small = ["--vocab-size", "512", "--seq-len", "32", "--rank", "8", "--steps", "2"]
    assert script.main(["--device", "cpu", "--presets", "test", "--out", str(out), *small]) == 0
    table = out.with_suffix(".md").read_text()
    for label in [row[0] for row in script.ROWS.values()]:
        assert f"| test | 1 | {label} |" in table
    rows = {r["optimizer"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert list(rows) == list(script.ROWS)
    for name, row in rows.items():
        assert row["status"] == "ok", row
        assert row["weights"] == 2 * row["parameters"]  # bf16 weights
        assert row["state"] > 0 and row["peak"] is None and row["activations"] is None  # no CUDA stats
        assert (row["gradients"] == 0) == ("layerwise" in name or "recipe" in name)  # freed in each hook
    # the recipes' states are the smallest: 8-bit AdamW moments (and SUMO's bf16 Q and M)
    assert rows["sumo-recipe"]["state"] < rows["sumo-layerwise"]["state"] / 2
    assert rows["galore8bit-recipe"]["state"] < rows["galore-layerwise"]["state"] / 2
    # torch's AdamW keeps bf16 moments (2 bytes each, plus its step counters); the library float32
    assert rows["adamw"]["state"] < 2 * 2 * rows["adamw"]["parameters"] + 1024
    # 8-bit AdamW: a byte per moment and value, and a float32 absmax per 256 values of each
    parameters = rows["adamw8bit"]["parameters"]
    assert 2 * parameters < rows["adamw8bit"]["state"] < 2 * parameters * (1 + 4 / 256) + 64 * 1024
    assert out.with_suffix(".png").stat().st_size > 5_000
    sizes = tmp_path / "memory_sizes"  # a list of micro-batch sizes: one row each
    only_recipe = ["--optimizers", "sumo-recipe", "--batch", "1,2", "--out", str(sizes)]
    assert script.main(["--device", "cpu", "--presets", "test", *only_recipe, *small]) == 0
    found = json.loads(sizes.with_suffix(".json").read_text())["rows"]
    assert [(r["batch"], r["status"]) for r in found] == [(1, "ok"), (2, "ok")]
    assert "| test | 2 | SUMO, 7B recipe |" in sizes.with_suffix(".md").read_text()


def test_over_cap_and_failed_rows_are_reported_not_raised():
    script = load_script()
    rows = [
        {"preset": "7b", "batch": 1, "label": "AdamW", "status": "over cap", "error": "CUDA out of memory"},
        {"preset": "7b", "batch": 1, "label": "SUMO", "status": "failed", "error": "boom"},
        {"preset": "7b", "batch": 1, "label": "SUMO layer-wise", "status": "ok", "peak": 15 * 2**30}
        | dict.fromkeys(script.PARTS, 2**30),
    ]
    table = script.table(rows, cap_gib=16)
    assert "over cap (16 GiB)" in table and "failed: boom" in table and "| 15.00 | ok |" in table


def test_a_stopped_sweep_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    """A time limit stops a sweep (here after two rows); its table and JSON hold those rows."""
    script = load_script()
    done = []

    def measured_then_stopped(preset, row, options):
        if len(done) == 2:
            raise KeyboardInterrupt  # what `timeout --signal=INT` delivers
        done.append(row)
        return {"status": "ok", "peak": (len(done) + 14) * 2**30} | dict.fromkeys(script.PARTS, 2**30)

    monkeypatch.setattr(script, "run_isolated", measured_then_stopped)
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        script.main(
            ["--device", "cpu", "--optimizers", "sumo-recipe,galore8bit-recipe", "--batch", "1,8", "--out", str(out)]
        )
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [(r["batch"], r["optimizer"]) for r in saved["rows"]] == [(1, "sumo-recipe"), (1, "galore8bit-recipe")]
    assert saved["config"]["batches"] == [1, 8] and saved["config"]["date"]
    assert "| 16.00 | ok |" in out.with_suffix(".md").read_text()


def test_layerwise_transients_cpu_smoke(tmp_path):
    """benchmarks/layerwise_transients.py on a small matrix: the three peaks, in MiB."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs")
    spec = importlib.util.spec_from_file_location("transients", ROOT / "benchmarks" / "layerwise_transients.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "transients.json"
    assert script.main(["--rows", "64", "--cols", "160", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["shape"] == [64, 160] and list(record["peak_mib"]) == list(script.STEPS)
    assert all(isinstance(peak, float) for peak in record["peak_mib"].values())  # clamped at 0: see worker()


def test_a_stopped_sweep_keeps_its_rows_table_and_plot(tmp_path, monkeypatch):
    """Each row is written (table, JSON, plot) as it finishes: a sweep stopped by a time limit
    keeps what it measured."""
    script = load_script()
    measured = {"status": "ok", "weights": 2**30, "gradients": 2**30, "state": 2**29, "activations": 2**28}
    calls = []

    def one_row_then_stopped(preset, row, options):
        calls.append(row)
        if len(calls) > 1:
            raise KeyboardInterrupt  # the call's time limit
        return {**measured, "peak": sum(measured[part] for part in script.PARTS)}

    monkeypatch.setattr(script, "run_isolated", one_row_then_stopped)
    out = tmp_path / "memory_stopped"
    with pytest.raises(KeyboardInterrupt):
        script.main(["--presets", "7b", "--optimizers", "sumo,galore", "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["optimizer"] for r in rows] == ["sumo"]
    assert "| 7b | 1 | SUMO | 1.00 | 1.00 | 0.50 | 0.25 | 2.75 | ok |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0
