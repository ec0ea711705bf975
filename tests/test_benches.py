"""Every benchmark takes ``--dataset`` as the agent does (a name, an .npz, a class folder), runs
its smallest setting on real tiny files, and refuses a split too small for its setting with
exit status 2 and a message naming the split and its size."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CLASSES, SIDE = 3, 8


def _bench(name: str):
    """Import bench/<name>.py as a module (registered: dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 8x8 uint8 images of CLASSES classes, each class a bright band at its own rows."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % CLASSES
    x = (rng.random((n, SIDE, SIDE)) * 60).astype(np.uint8)
    for k in range(CLASSES):
        x[y == k, 2 * k : 2 * k + 3, :] += 150
    return x, y.astype(np.int64)


@pytest.fixture
def tiny_npz(tmp_path) -> Path:
    """60 images, no test arrays: the loader splits 20% per class off as the test split."""
    x, y = _images(60)
    path = tmp_path / "tiny.npz"
    np.savez(path, images=x, labels=y)
    return path


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    """The same kind of images as PNG files in one sub-folder per class."""
    from PIL import Image

    x, y = _images(60, seed=1)
    root = tmp_path / "folder"
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        (root / f"class{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / f"class{label}" / f"{i:03d}.png")
    return root


@pytest.fixture
def no_test_npz(tmp_path) -> Path:
    """Training images and an explicitly empty test split."""
    x, y = _images(60)
    path = tmp_path / "no_test.npz"
    np.savez(path, images=x, labels=y, images_test=x[:0], labels_test=y[:0])
    return path


@pytest.fixture(params=["npz", "folder"])
def tiny_dataset(request) -> Path:
    return request.getfixturevalue("tiny_npz" if request.param == "npz" else "tiny_folder")


DPU_SMALL = ["--quick", "--rounds", "2", "--initial", "20", "--per-round", "10", "--epochs", "1",
             "--n-val", "5", "--n-test", "7", "--only", "full-scratch,dpu@0.01"]  # fmt: skip


def test_dpu_bench_on_a_tiny_dataset(tmp_path, tiny_dataset):
    out = tmp_path / "dpu.json"
    summary = _bench("dpu_multiround").main([*DPU_SMALL, "--dataset", str(tiny_dataset), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert saved["meta"]["setting"]["dataset"] == str(tiny_dataset)
    assert set(saved["runs"]) == {"full-scratch", "dpu@0.01"} == set(summary)
    for run in saved["runs"].values():
        assert [r["round"] for r in run["rounds"]] == [1, 2]
        assert [r["n_train"] for r in run["rounds"]] == [20, 30]
        # 7 test images: every accuracy is a count of them, never the 0.0 of an empty split.
        assert all(round(r["test_accuracy"] * 7, 6).is_integer() for r in run["rounds"])
    # The MLP was built for the dataset: 64 inputs, 3 classes (a 10-class head is larger).
    full = saved["runs"]["full-scratch"]["full_model_bytes"]
    assert full == 4 * (64 * 512 + 512 + 512 * 512 + 512 + 512 * CLASSES + CLASSES)


def test_dpu_bench_refuses_a_test_split_smaller_than_the_setting(tiny_npz, tmp_path, capsys):
    # 60 images, no test arrays: 12 go to the test split; the quick preset takes 500 + 1000.
    args = ["--quick", "--rounds", "2", "--initial", "10", "--per-round", "10",
            "--dataset", str(tiny_npz), "--out", str(tmp_path / "d.json")]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        _bench("dpu_multiround").main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "the test split has 12 samples" in err and "--n-val" in err
    assert not (tmp_path / "d.json").exists()


def test_dpu_bench_exits_2_on_an_empty_test_split(no_test_npz, tmp_path):
    """As a real command: the exit status and message a user sees."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "dpu_multiround.py"), *DPU_SMALL,
         "--dataset", str(no_test_npz), "--out", str(tmp_path / "d.json")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "no_test: the test split has 0 samples" in proc.stderr


def test_dpu_bench_refuses_a_train_split_smaller_than_the_rounds(tiny_npz, tmp_path, capsys):
    args = [*DPU_SMALL, "--rounds", "5", "--dataset", str(tiny_npz), "--out", str(tmp_path / "d.json")]
    with pytest.raises(SystemExit) as exc:
        _bench("dpu_multiround").main(args)
    assert exc.value.code == 2
    assert "the train split has 48 samples but" in capsys.readouterr().err


def test_dress_bench_on_a_tiny_dataset(tmp_path, tiny_dataset):
    out = tmp_path / "dress.json"
    _bench("dress").main(["--quick", "--dataset", str(tiny_dataset), "--val-samples", "6",
                          "--dress-epochs", "1", "--models", "mlp", "--out", str(out)])  # fmt: skip
    saved = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert saved["config"]["dataset"] == str(tiny_dataset)
    mlp = saved["models"]["mlp"]
    assert mlp["spec"]["input_shape"] == [1, SIDE, SIDE] and mlp["spec"]["num_classes"] == CLASSES
    assert len(mlp["subnets"]) == len(mlp["sparsities"]) > 1
    for subnet in mlp["subnets"]:
        assert 0.0 <= subnet["accuracy"] <= 1.0 and subnet["macs"] > 0
    # Fewer weights in sparser subnets.
    macs = [s["macs"] for s in mlp["subnets"]]
    assert macs == sorted(macs, reverse=True)


def test_dress_bench_refuses_too_small_or_empty_splits(tiny_npz, no_test_npz, tmp_path, capsys):
    dress = _bench("dress")
    with pytest.raises(SystemExit) as exc:  # the quick preset's 1000 validation samples
        dress.main(["--quick", "--dataset", str(tiny_npz), "--out", str(tmp_path / "a.json")])
    assert exc.value.code == 2
    assert "the train split has 48 samples but --val-samples 1000" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        dress.main(["--quick", "--dataset", str(no_test_npz), "--val-samples", "6",
                    "--out", str(tmp_path / "b.json")])  # fmt: skip
    assert exc.value.code == 2
    assert "the test split has 0 samples" in capsys.readouterr().err


def test_codec_bench_on_a_tiny_dataset(tmp_path, tiny_dataset):
    out = tmp_path / "codec.json"
    results = _bench("codec").main(["--quick", "--dataset", str(tiny_dataset), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert saved["mlp_name"] == results["mlp_name"] == f"MLP 64-512-512-{CLASSES}"
    assert saved["train_samples"] == 48  # all of the train split: fewer than the quick cap
    assert [row["k"] for row in saved["mlp"]] == [0.001, 0.01, 0.1]
    for row in saved["mlp"]:
        for measured in row["codec"].values():
            assert 0.0 <= measured["accuracy"] <= 1.0 and measured["bytes"] > 0


def test_codec_bench_refuses_bad_datasets(tmp_path, no_test_npz, tiny_npz, capsys):
    codec = _bench("codec")
    with pytest.raises(SystemExit) as exc:
        codec.main(["--quick", "--dataset", str(no_test_npz), "--out", str(tmp_path / "c.json")])
    assert exc.value.code == 2
    assert "the test split has 0 samples" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        codec.main(["--quick", "--dataset", str(tiny_npz), "--train-samples", "100",
                    "--out", str(tmp_path / "c.json")])  # fmt: skip
    assert exc.value.code == 2
    assert "the train split has 48 samples but --train-samples 100" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        codec.main(["--quick", "--dataset", str(tmp_path / "missing"), "--out", str(tmp_path / "c.json")])
    assert exc.value.code == 2
    assert "unknown dataset" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()


def test_fleet_scale_bench_refuses_bad_sizes(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _bench("fleet_scale").main(["--agents", "0", "--out", str(tmp_path / "f.json")])
    assert exc.value.code == 2
    assert "must be positive" in capsys.readouterr().err


@pytest.mark.slow  # a real server and 200 real-protocol agents: ~1-2 min
def test_fleet_scale_bench_quick_mode_delivers_a_round_to_every_agent(tmp_path, tiny_npz):
    out = tmp_path / "fleet.json"
    results = _bench("fleet_scale").main(["--quick", "--agents", "200", "--samples-per-agent", "2",
                                          "--dataset", str(tiny_npz), "--steady-s", "3", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    (r,) = saved["results"]
    assert [x["agents"] for x in results] == [200]
    assert r["tls"] and r["ramp"]["ready"] == 200 and r["round"]["status"] == "done"
    assert r["delivery"]["verified"] == 200 and r["delivery"]["missed"] == 0 and r["delivery"]["s"] is not None
    # Every agent checked what it received; each distinct artefact was decoded once (version 0, the diff).
    assert r["harness"]["verify_failures"] == 0 and r["harness"]["decodes"] == 2
    assert r["harness"]["channels"] == 200  # one connection per agent
    assert not any(code.startswith("verify") for rpc in r["errors"].values() for code in rpc)
    assert r["heartbeat"]["after_ramp"]["count"] > 0 and r["rest"]["round"]["count"] > 0
    assert r["server"]["rss_mb_max"] > 0 and r["server"]["threads_max"] > 0 and r["steady"]["cpu_pct"] is not None


def test_alq_bench_on_a_tiny_dataset(tmp_path, tiny_npz):
    out = tmp_path / "alq.json"
    res = _bench("alq").main(["--quick", "--dataset", str(tiny_npz), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert saved["dataset"] == tiny_npz.name and saved["train_samples"] == 48
    rows = {r["name"]: r for r in saved["models"]}
    assert set(rows) == {"fp32", "int8", "alq@2", "uniform@2"} == {r["name"] for r in res["models"]}
    assert rows["alq@2"]["bits"] <= 2.0 and rows["uniform@2"]["bits"] == 2.0
    assert rows["fp32"]["bytes"] > 3.5 * rows["int8"]["bytes"]
    assert rows["int8"]["bytes"] > 2.5 * rows["alq@2"]["bytes"]  # 8 vs ~2 bits, biases at fp32
    assert set(saved["runner"]) == {"expanded", "packed", "bitplane", "fp32 model", "of"}
    for mode in ("expanded", "packed", "bitplane"):
        assert saved["runner"][mode]["max_abs_diff_vs_model"] < 1e-3  # float sums in another order
    for fmt in ("fp32", "int8", "alq"):
        assert 0.0 <= saved["dpu_diff"][0][fmt]["accuracy"] <= 1.0
    assert saved["dpu_diff"][0]["alq"]["bytes"] < saved["dpu_diff"][0]["fp32"]["bytes"]
