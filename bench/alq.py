"""ALQ (thesis ch. 2, Alg. 2.5): LeNet5 quantised to multi-bit weights, on offline data.

Tables in the shape of the thesis's Table 2.1 (uniform vs adaptive bitwidth at the same
average) and Table 2.2 (weights' bytes and compression ratio vs accuracy), against the fp32
model and per-tensor int8; the three runners of shared.alq.runner timed at batch 1 and 32;
and one DPU-style diff (Alg. 5.1 top-k of a retrained LeNet5) coded with fp32, int8 and alq
values (bytes vs accuracy).

    .venv/bin/python bench/alq.py                          # mnist5k, a few CPU-minutes
    .venv/bin/python bench/alq.py --dataset fashion-mnist  # first 4000 training images
    .venv/bin/python bench/alq.py --quick                  # smoke test

Writes bench/results/alq-<dataset>.json and .png (--out moves both).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_data import add_dataset_argument, load_bench_dataset, require_split  # noqa: E402
from shared.alq import ALQConfig, alq_quantize, model_bytes, pack  # noqa: E402
from shared.alq.runner import build_runner, resident_weight_bytes  # noqa: E402
from shared.codec import encode_update, make_update  # noqa: E402
from shared.models import ArchSpec  # noqa: E402
from shared.tensors import clone_state, to_model_input  # noqa: E402
from shared.training import TrainConfig, accuracy, train_supervised  # noqa: E402

RESULTS = ROOT / "bench" / "results"
# The thesis's LeNet5 structures (§2.6.5.1): kernelwise, kernelwise, subchannelwise(2), channelwise.
STRUCTURES = {"conv1.weight": "kernelwise", "conv2.weight": "kernelwise",
              "fc1.weight": "subchannelwise(2)", "fc2.weight": "channelwise"}  # fmt: skip
HASH_ARCH = ArchSpec(kind="mlp", input_shape=(1,), num_classes=2)  # the codec hashes, never builds
TARGET_BITS, TARGET_POINTS, TARGET_RATIO = 2.0, 1.0, 12.0


class LeNet5(nn.Module):
    """The modified LeNet5 of [HMD16] (20-50-500-10); "same" padding below 16 pixels so any
    image size runs (28x28 gives the original 800 inputs to fc1)."""

    def __init__(self, shape: tuple[int, ...], classes: int) -> None:
        super().__init__()
        c, h, w = shape if len(shape) == 3 else (1, *shape)
        pad = 0 if min(h, w) >= 16 else 2
        self.conv1 = nn.Conv2d(c, 20, 5, padding=pad)
        self.conv2 = nn.Conv2d(20, 50, 5, padding=pad)
        for _ in range(2):
            h, w = (h - 4 + 2 * pad) // 2, (w - 4 + 2 * pad) // 2
        self.fc1 = nn.Linear(50 * h * w, 500)
        self.fc2 = nn.Linear(500, classes)
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def int8_model(state: dict, names: list[str]) -> tuple[dict, int]:
    """Per-tensor symmetric int8 of the conv/fc weights: (dequantised state, bytes)."""
    out, nbytes = dict(state), 0
    for n, t in state.items():
        if n in names:
            scale = float(t.abs().max()) / 127 or 1.0
            out[n] = torch.clamp(torch.round(t / scale), -127, 127) * scale
            nbytes += t.numel() + 4
        else:
            nbytes += t.numel() * t.element_size()
    return out, nbytes


def time_forward(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds per forward pass."""
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def quantise(base: LeNet5, x: np.ndarray, y: np.ndarray, cfg: ALQConfig) -> tuple[nn.Module, dict, list]:
    model = LeNet5(tuple(x.shape[1:]), base.classes)
    model.load_state_dict(base.state_dict())
    yt = torch.as_tensor(y, dtype=torch.long)
    trace: list = []

    def fetch(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return to_model_input(x[idx]), yt[idx]

    mbs = alq_quantize(model, fetch, len(y), cfg, log=lambda p, m: trace.append({"phase": p, **m}))
    return model, {n: pack(mb) for n, mb in mbs.items()}, trace


def dpu_diffs(base: dict, retrained: dict, ks: tuple[float, ...], model: nn.Module,
              xt: np.ndarray, yt: np.ndarray) -> list[dict]:  # fmt: skip
    """Alg. 5.1 diffs of the conv/fc weights at each k, coded with fp32, int8 and alq values."""
    delta = {n: retrained[n] - base[n] for n in base}
    flat = torch.cat([d.flatten().abs() for d in delta.values()])
    rows = []
    for k in ks:
        thr = flat.topk(max(1, round(k * flat.numel()))).values[-1]
        target = {n: torch.where(delta[n].abs() >= thr, retrained[n], base[n]) for n in base}
        row: dict = {"k": k}
        for fmt in ("fp32", "int8", "alq"):
            upd = make_update(base, target, fmt, arch=HASH_ARCH)
            blob = encode_update(upd, upd.base_hash)
            model.load_state_dict(upd.target)
            err = math.sqrt(sum(float(((upd.target[n] - target[n]) ** 2).sum()) for n in base)
                            / max(1, upd.nnz))  # fmt: skip
            row[fmt] = {"bytes": len(blob), "accuracy": accuracy(model, xt, yt), "rmse": err}
        rows.append(row)
    return rows


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in res["models"]:
        a.scatter(row["bytes"] / 1e3, 100 * row["accuracy"], label=row["name"])
    a.set(xscale="log", xlabel="model bytes (kB)", ylabel="test accuracy (%)",
          title=f"LeNet5 on {res['dataset']}")  # fmt: skip
    a.legend(fontsize=7)
    a.grid(alpha=0.3, which="both")
    for fmt in ("fp32", "int8", "alq"):
        b.plot([r[fmt]["bytes"] / 1e3 for r in res["dpu_diff"]],
               [100 * r[fmt]["accuracy"] for r in res["dpu_diff"]], "o-", label=fmt)  # fmt: skip
    b.set(xscale="log", xlabel="diff bytes (kB)", ylabel="test accuracy (%)",
          title="one DPU diff (top-k of a retrained LeNet5)")  # fmt: skip
    b.legend()
    b.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_dataset_argument(p)
    p.set_defaults(dataset="mnist5k")
    p.add_argument("--quick", action="store_true", help="smoke-test setting")
    p.add_argument("--train-samples", type=int, help="training samples (default: up to 4000)")
    p.add_argument("--epochs", type=int, help="fp32 training epochs (default 6; quick 1)")
    p.add_argument("--target-bits", default="2.0", help="ALQ average bitwidths to reach")
    p.add_argument("--schedule", default="1,2,2,1,2",
                   help="ALQ epochs: init,outer R,bases per R,alpha per R,final (quick: 1,2,1,1,1)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON path (PNG beside it)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ds = load_bench_dataset(args.dataset)
    n_train = len(ds.y_train)
    want = args.train_samples if args.train_samples is not None else min(n_train, 4000)
    require_split(ds, "train", n_train, want, f"--train-samples {want}", "lower --train-samples")
    require_split(ds, "train", n_train, 2, "training LeNet5")
    require_split(ds, "test", len(ds.y_test), 1, "scoring LeNet5")
    # A seeded shuffle first: some splits are sorted by class (mnist5k), and a prefix of
    # them would hold only a few classes.
    pick = np.random.Generator(np.random.PCG64(args.seed)).permutation(n_train)[:want]
    x, y = ds.x_train[pick], ds.y_train[pick]
    xt, yt = ds.x_test, ds.y_test
    epochs = args.epochs if args.epochs is not None else (1 if args.quick else 6)
    name = Path(args.dataset).name
    out = args.out or RESULTS / f"alq-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    base = LeNet5(tuple(ds.input_shape), ds.num_classes)
    half = max(1, want // 2)
    # The DPU diff needs a model on half the data and its retrained successor.
    train_supervised(base, x[:half], y[:half], TrainConfig(epochs=epochs, batch_size=64, seed=args.seed))
    half_state = clone_state(base.state_dict())
    train_supervised(base, x, y, TrainConfig(epochs=max(1, epochs // 2), batch_size=64, seed=args.seed + 1))
    fp_state = clone_state(base.state_dict())
    names = list(STRUCTURES)
    fp_bytes = sum(t.numel() * 4 for t in fp_state.values())
    fp_weight_bytes = sum(fp_state[n].numel() * 4 for n in names)
    fp_acc = accuracy(base, xt, yt)
    rows: list[dict[str, Any]] = [{"name": "fp32", "bits": 32.0, "bytes": fp_bytes, "weight_bytes": fp_weight_bytes,
             "accuracy": fp_acc}]  # fmt: skip
    i8, i8_bytes = int8_model(fp_state, names)
    m8 = LeNet5(tuple(ds.input_shape), ds.num_classes)
    m8.load_state_dict(i8)
    rows.append({"name": "int8", "bits": 8.0, "bytes": i8_bytes,
                 "weight_bytes": i8_bytes - (fp_bytes - fp_weight_bytes), "accuracy": accuracy(m8, xt, yt)})  # fmt: skip
    print(f"fp32 {fp_acc:.4f} ({fp_bytes} B), int8 {rows[1]['accuracy']:.4f} ({i8_bytes} B)", flush=True)

    sched = [int(v) for v in ("1,2,1,1,1" if args.quick else args.schedule).split(",")]
    if len(sched) != 5:
        p.error("--schedule takes five comma-separated epoch counts")
    q: dict[str, Any] = dict(zip(("init_epochs", "outer", "bases_epochs", "alpha_epochs", "final_epochs"),
                                 sched, strict=True))  # fmt: skip
    runners: dict = {}
    traces: dict = {}
    for bits in [float(b) for b in args.target_bits.split(",")]:
        variants = [(f"alq@{bits:g}", ALQConfig(target_bits=bits, i_max=6, structures=STRUCTURES, **q))]
        if float(bits).is_integer() and bits >= 1:
            # Table 2.1's baseline: uniform bitwidth, the same epochs, no pruning.
            variants.append((f"uniform@{bits:g}", ALQConfig(target_bits=bits, i_max=int(bits),
                                                             structures=STRUCTURES, **q)))  # fmt: skip
        for label, cfg in variants:
            t1 = time.perf_counter()
            model, packed, trace = quantise(base, x, y, cfg)
            sizes = model_bytes(packed, model.state_dict())
            n_w = sum(pt.numel for pt in packed.values())
            avg = sum(int(pt.widths.astype(np.int64) @ np.full(len(pt.widths), pt.group_size))
                      for pt in packed.values()) / n_w  # fmt: skip
            acc = accuracy(model, xt, yt)
            rows.append({"name": label, "bits": avg, "bytes": sizes["total"],
                         "weight_bytes": sizes["quantised"], "accuracy": acc,
                         "per_layer_bits": {n: float(pt.widths.astype(np.int64).sum() / len(pt.widths))
                                            for n, pt in packed.items()},
                         "seconds": time.perf_counter() - t1})  # fmt: skip
            traces[label] = trace
            print(f"{label}: {avg:.3f} bits, {sizes['total']} B ({fp_bytes / sizes['total']:.1f}x), "
                  f"acc {acc:.4f}, {time.perf_counter() - t1:.0f} s", flush=True)  # fmt: skip
            if label == f"alq@{TARGET_BITS:g}" or not runners:
                runners = {"label": label, "model": model, "packed": packed}

    timing: dict[str, Any] = {}
    if runners:
        for mode in ("expanded", "packed", "bitplane"):
            r = build_runner(runners["model"], runners["packed"], mode)
            entry: dict[str, float] = {"resident_weight_bytes": resident_weight_bytes(r)}
            for batch in (1, 32):
                xb = to_model_input(xt[:batch])
                entry[f"batch{batch}_ms"] = 1e3 * time_forward(r, xb, 10 if args.quick else 50)
            with torch.no_grad():
                xb = to_model_input(xt[:64])
                entry["max_abs_diff_vs_model"] = float((r(xb) - runners["model"](xb)).abs().max())
            timing[mode] = entry
        dense = LeNet5(tuple(ds.input_shape), ds.num_classes).eval()
        dense.load_state_dict(runners["model"].state_dict())
        timing["fp32 model"] = {"resident_weight_bytes": fp_weight_bytes,
                                **{f"batch{b}_ms": 1e3 * time_forward(dense, to_model_input(xt[:b]), 10 if args.quick else 50)
                                   for b in (1, 32)}}  # fmt: skip
        timing["of"] = runners["label"]

    dpu_model = LeNet5(tuple(ds.input_shape), ds.num_classes)
    diff_rows = dpu_diffs(half_state, fp_state, (0.005, 0.01, 0.05) if not args.quick else (0.01,),
                          dpu_model, xt, yt)  # fmt: skip
    dpu_model.load_state_dict(half_state)
    res = {"dataset": name, "train_samples": want, "fp32_epochs": epochs, "schedule": q, "models": rows,
           "runner": timing, "dpu_diff": diff_rows, "dpu_base_accuracy": accuracy(dpu_model, xt, yt),
           "dpu_retrained_accuracy": fp_acc, "traces": traces,
           "seconds": time.perf_counter() - t0}  # fmt: skip
    alq_row: dict[str, Any] | None = next((r for r in rows if r["name"] == f"alq@{TARGET_BITS:g}"), None)
    if alq_row is not None:
        res["targets"] = {
            "alq_bits": alq_row["bits"],
            "accuracy_points_vs_fp32": 100 * (alq_row["accuracy"] - fp_acc),
            "compression_vs_fp32": fp_bytes / alq_row["bytes"],
            "pass": bool(alq_row["bits"] <= TARGET_BITS + 1e-9
                         and 100 * (fp_acc - alq_row["accuracy"]) <= TARGET_POINTS
                         and fp_bytes / alq_row["bytes"] >= TARGET_RATIO),
        }  # fmt: skip
    out.write_text(json.dumps(res, indent=1))
    plot(res, out.with_suffix(".png"))
    print_tables(res)
    print(f"saved {out} and {out.with_suffix('.png')}")
    return res


def print_tables(res: dict) -> None:
    fp = res["models"][0]
    print(f"\n{'model':>12} {'bits':>6} {'bytes':>9} {'CR':>6} {'weights CR':>10} {'acc':>7}")
    for r in res["models"]:
        print(f"{r['name']:>12} {r['bits']:6.3f} {r['bytes']:9d} {fp['bytes'] / r['bytes']:6.1f} "
              f"{fp['weight_bytes'] / r['weight_bytes']:10.1f} {r['accuracy']:7.4f}")  # fmt: skip
    for mode, t in res["runner"].items():
        if isinstance(t, dict):
            print(f"runner {mode:>10}: {t['resident_weight_bytes']:8d} B, batch 1 {t['batch1_ms']:.3f} ms, "
                  f"batch 32 {t['batch32_ms']:.3f} ms")  # fmt: skip
    for r in res["dpu_diff"]:
        print(f"diff k={r['k']}: " + ", ".join(f"{f} {r[f]['bytes']} B acc {r[f]['accuracy']:.4f}"
                                               for f in ("fp32", "int8", "alq")))  # fmt: skip
    if "targets" in res:
        print(f"targets: {res['targets']}")


if __name__ == "__main__":
    main()
