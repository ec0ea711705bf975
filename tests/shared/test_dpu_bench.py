"""The multi-round DPU benchmark runs end to end in its --quick setting."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from shared.data import DatasetUnavailableError, load_fashion_mnist

BENCH = Path(__file__).resolve().parents[2] / "bench" / "dpu_multiround.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("dpu_multiround", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_end_to_end(tmp_path):
    try:
        load_fashion_mnist()
    except DatasetUnavailableError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "dpu.json"
    summary = _bench_module().main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    expected = {"full-scratch", "full-warm"} | {
        f"{m}@0.01" for m in ("dpu", "dpu-int8", "gcpu", "rpu", "magnitude")
    }
    assert set(saved["runs"]) == expected == set(summary)
    full = saved["runs"]["full-scratch"]
    for name in expected:
        rounds = saved["runs"][name]["rounds"]
        assert [r["round"] for r in rounds] == [1, 2, 3]
        assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rounds)
        assert all((r["bytes"] > 0) == r["shipped"] for r in rounds)
    dpu = saved["runs"]["dpu@0.01"]
    shipped = [r for r in dpu["rounds"] if r["shipped"]]
    assert shipped
    # A k=0.01 update is a small fraction of a raw fp32 model, and int8 values are smaller still.
    assert all(r["bytes"] < 0.05 * full["full_model_bytes"] for r in shipped)
    assert summary["dpu-int8@0.01"]["bytes_total"] < summary["dpu@0.01"]["bytes_total"]
    assert all(r["nnz"] == round(0.01 * dpu["num_partial"]) for r in shipped)
    # Resuming with the same setting reuses the saved runs instead of retraining.
    again = _bench_module().main(["--quick", "--out", str(out)])
    assert again == summary
