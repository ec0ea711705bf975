"""bench/pmeta.py end to end on a tiny class-labelled dataset, and its RSS child in-process."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_pmeta", ROOT / "bench" / "pmeta.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_classes(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 6)
    x = (rng.random((60, 16, 16)) * 50).astype(np.uint8)
    for k in range(10):
        x[y == k, k : k + 4, :] += 180
    path = tmp_path / "tiny.npz"
    np.savez(path, images=x, labels=y)
    return path


def test_pmeta_bench_quick_on_a_tiny_dataset(tmp_path, tiny_classes, capsys):
    out = tmp_path / "pmeta.json"
    torch_threads = torch.get_num_threads()
    results = _bench().main(["--quick", "--dataset", str(tiny_classes), "--cross", "none", "--no-rss", "--ways", "3",
                             "--queries", "2", "--channels", "4", "--test-tasks", "3", "--ablation", "1", "--device-tasks", "1",
                             "--memory-tasks", "1",
                             "--methods", "anil", "pmeta_att", "--out", str(out)])  # fmt: skip
    torch.set_num_threads(torch_threads)
    saved = json.loads(out.read_text())
    table = saved["tables"]["3way_1shot"]
    assert set(table) == {"anil", "pmeta_att"} and saved["test_classes"] == 3
    assert 0.0 <= table["pmeta_att"]["in_domain"]["accuracy"] <= 1.0
    assert table["anil"]["memory"]["saved_bytes"] < table["pmeta_att"]["memory"]["saved_bytes"]
    assert out.with_suffix(".png").stat().st_size > 1000 and "p-Meta (4.4.2+4.4.3)" in capsys.readouterr().out
    assert results["ablation"]


def test_rss_child_reports_growth(tmp_path, capsys):
    from safetensors.torch import save_file

    from shared.models import build_model, init_weights_from_seed
    from shared.pmeta import pmeta_spec

    model = build_model(pmeta_spec((16, 16), 3, channels=4))
    init_weights_from_seed(model, 0)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "spec.json").write_text(model.arch_spec.to_json())
    np.savez(tmp_path / "support.npz", x=np.random.rand(3, 16, 16).astype(np.float32), y=np.arange(3))
    threads = torch.get_num_threads()
    _bench().main(["--rss-child", str(tmp_path), "--rss-batch", "1"])
    torch.set_num_threads(threads)
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["rss_bytes"] >= 0 and report["saved_bytes"] > 0 and report["sample_batch"] == 1


def test_pmeta_bench_refuses_too_few_classes(tmp_path, tiny_classes):
    with pytest.raises(SystemExit) as exc:
        _bench().main(["--quick", "--dataset", str(tiny_classes), "--cross", "none", "--no-rss",
                       "--out", str(tmp_path / "p.json")])  # 5-way tasks from 3 test classes  # fmt: skip
    assert exc.value.code == 2
