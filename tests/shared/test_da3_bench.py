"""bench/da3.py end to end on tiny real files: the JSON and PNG it writes, the RSS subprocess,
and a clear exit (status 2) on a split too small for it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_da3", ROOT / "bench" / "da3.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _npz(path: Path, n: int, seed: int, empty_test: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = (rng.random((n, 8, 8)) * 60).astype(np.uint8)
    for k in range(3):
        x[y == k, 2 * k : 2 * k + 3, :] += 150
    extra = {"images_test": x[:0], "labels_test": y[:0]} if empty_test else {}
    np.savez(path, images=x, labels=y.astype(np.int64), **extra)
    return path


SMALL = ["--quick", "--size", "8", "--pretrain-samples", "40", "--train-samples", "30",
         "--test-samples", "12", "--epochs", "1", "--channels", "4,8", "--blocks", "1,1"]  # fmt: skip


def test_da3_bench_without_rss_on_tiny_datasets(tmp_path):
    """The fast sibling of the slow test below: two methods, no RSS subprocess."""
    source, domain = _npz(tmp_path / "src.npz", 60, 0), _npz(tmp_path / "dom.npz", 60, 1)
    out = tmp_path / "da3.json"
    _bench().main([*SMALL, "--dataset", str(source), "--domains", str(domain), "--rss-domains", "0",
                   "--methods", "finetune,da3", "--out", str(out)])  # fmt: skip
    saved = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    rows = saved["domains"]["dom"]["methods"]
    assert rows["da3"]["saved_bytes"] < rows["finetune"]["saved_bytes"]
    assert "rss_peak_bytes" not in rows["da3"]
    assert "saved_memory_le_tenth_of_finetune" in saved["targets"]


def test_rss_of_one_training_run_in_a_fresh_process():
    import torch

    bench = _bench()
    from shared.da3 import DA3TrainConfig
    from shared.models import ArchSpec, build_model, init_weights_from_seed

    backbone = ArchSpec("resnet", (1, 8, 8), 3, hidden=(1,), channels=(4,))
    state = init_weights_from_seed(build_model(backbone), 0).state_dict()
    x = np.zeros((6, 1, 8, 8), np.uint8)
    y = np.arange(6) % 3
    rss = bench.measure_rss(backbone, state, "da3", 3, x, y, DA3TrainConfig(epochs=1, batch=3), 0)
    assert rss["rss_peak_bytes"] >= rss["rss_setup_bytes"] > 10_000_000  # a real interpreter with torch
    assert isinstance(state["head.weight"], torch.Tensor)


@pytest.mark.slow
def test_da3_bench_on_tiny_datasets(tmp_path):
    source, domain = _npz(tmp_path / "src.npz", 60, 0), _npz(tmp_path / "dom.npz", 60, 1)
    out = tmp_path / "da3.json"
    _bench().main([*SMALL, "--dataset", str(source), "--domains", str(domain),
                   "--methods", "finetune,tinytl,da3", "--out", str(out)])  # fmt: skip
    saved = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    rows = saved["domains"]["dom"]["methods"]
    assert set(rows) == {"finetune", "tinytl", "da3"}
    for row in rows.values():
        assert 0 <= row["accuracy"] <= 1 and row["saved_bytes"] > 0 and row["analytic_bytes"] > 0
        assert row["rss_peak_bytes"] >= row["rss_setup_bytes"] > 0  # measured in a fresh process
        assert row["seconds_per_epoch"] > 0 and row["flops"] > 0
    assert rows["da3"]["saved_bytes"] < rows["finetune"]["saved_bytes"]
    assert rows["da3"]["trainable_params"] < rows["finetune"]["trainable_params"]
    assert {"accuracy_ge_tinytl", "saved_memory_le_tenth_of_finetune", "gate_skips_30pct_at_le_half_pt"} <= set(saved["targets"])


def test_da3_bench_refuses_an_empty_test_split(tmp_path, capsys):
    source = _npz(tmp_path / "src.npz", 60, 0)
    empty = _npz(tmp_path / "empty.npz", 60, 1, empty_test=True)
    with pytest.raises(SystemExit) as exc:
        _bench().main([*SMALL, "--dataset", str(source), "--domains", str(empty), "--methods", "da3",
                       "--out", str(tmp_path / "x.json")])  # fmt: skip
    assert exc.value.code == 2
    assert "the test split has 0 samples" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
