"""DRESS nested subnets vs K separately pruned models on Fashion-MNIST (thesis Table 3.1/3.2).

For each model (the CNN and the MLP): dense pre-training; DRESS (Alg. 3.1) from the dense
weights; the baseline [RFC20] (one model per sparsity, iterative global magnitude pruning with
learning-rate rewinding) from the same dense weights with the same number of epochs per subnet.
Reported per subnet: test accuracy (both methods), theoretical MACs, storage (DRESS-CSR for
DRESS, CSR for each pruned model), batch-1 CPU latency of the DRESS runner vs the dense
``nn.Module`` (torch.set_num_threads(1)), and the subnet switch time. Writes
bench/results/dress.json and bench/results/dress.png.

    .venv/bin/python bench/dress.py --quick                 # CPU smoke run, ~1-2 min
    .venv/bin/python bench/dress.py --device cuda           # full run (training on the GPU)

Training runs on ``--device``; latency is always measured on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.data import load_dataset, stratified_split  # noqa: E402
from shared.dress import (  # noqa: E402
    DressConfig,
    DressRunner,
    build_dress_tables,
    csr_storage_bytes,
    default_sparsities,
    measure_switch,
    peak_memory_estimate,
    prune_with_rewinding,
    storage_bytes,
    subnet_flops,
    subnet_tables,
    train_dress,
)
from shared.dress.baseline import RFC20_SCHEDULE, dense_storage_bytes  # noqa: E402
from shared.dress.train import TensorData, accuracy_on, cross_entropy, sgd_epochs  # noqa: E402
from shared.models import ArchSpec, build_model, default_spec, init_weights_from_seed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"accuracy_gap_pp": 0.5, "storage_ratio": 0.60, "sparsest_speedup": 3.0, "switch_ms": 1.0}

FULL = {
    "train_samples": None,  # all 55k after the validation split
    "test_samples": None,
    "val_samples": 5000,
    "pretrain_epochs": 10,
    "dress_epochs": 30,
    "norm_epochs": 2,
    "prune_epochs_per_round": 6,  # 5 rounds x 6 = 30 epochs per pruned model = DRESS epochs
    "latency_reps": 400,
    "specs": {"cnn": None, "mlp": None},  # None: shared.models.default_spec
}
QUICK = {
    "train_samples": 3000,
    "test_samples": 2000,
    "val_samples": 1000,
    "pretrain_epochs": 3,
    "dress_epochs": 5,
    "norm_epochs": 1,
    "prune_epochs_per_round": 1,
    "latency_reps": 100,
    # A narrower CNN keeps the CPU smoke run short; the full run uses the default spec.
    "specs": {"cnn": {"channels": [8, 16, 32], "hidden": [64]}, "mlp": None},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def spec_for(kind: str, override: dict | None, input_shape: tuple[int, ...], classes: int) -> ArchSpec:
    spec = default_spec(kind, input_shape, classes)
    if override:
        spec = ArchSpec(kind, input_shape, classes, hidden=tuple(override.get("hidden", spec.hidden)),
                        channels=tuple(override.get("channels", spec.channels)))  # fmt: skip
    return spec


def test_accuracy(state: dict, spec: ArchSpec, test: TensorData) -> float:
    model = build_model(spec).to(test.y.device)
    model.load_state_dict(state)
    return accuracy_on(model, test)


def latency_table(dense: torch.nn.Module, runner: DressRunner, input_shape, reps: int, rounds: int = 8) -> dict:
    """Batch-1 latencies, interleaving dense and every subnet in ``rounds`` so that machine
    load drifts affect all of them alike; returns p50/p95 in ms."""
    x = torch.rand(1, *input_shape, generator=torch.Generator().manual_seed(0))
    k_all = list(range(runner.num_subnets))
    samples: dict[str, list[float]] = {"dense": [], **{str(k): [] for k in k_all}}
    per_round = max(1, reps // rounds)
    dense.eval()
    with torch.inference_mode():
        for _ in range(10):
            dense(x)
        for _ in range(rounds):
            for key in ["dense", *map(str, k_all)]:
                if key == "dense":
                    fn = dense
                else:
                    runner.set_subnet(int(key))
                    fn = runner
                for _ in range(3):  # warm-up after the switch
                    fn(x)
                for _ in range(per_round):
                    start = time.perf_counter()
                    fn(x)
                    samples[key].append(time.perf_counter() - start)
    out = {}
    for key, ts in samples.items():
        ts.sort()
        out[key] = {
            "p50_ms": statistics.median(ts) * 1e3,
            "p95_ms": ts[min(len(ts) - 1, int(round(0.95 * (len(ts) - 1))))] * 1e3,
            "reps": len(ts),
        }
    return out


def run_model(kind: str, args, cfg: dict, data: dict) -> dict:
    device = args.device
    shape, classes = data["input_shape"], data["num_classes"]
    spec = spec_for(kind, cfg["specs"][kind], shape, classes)
    sparsities = tuple(args.sparsities) if args.sparsities else default_sparsities(kind)
    config = DressConfig(
        sparsities=sparsities, gamma=args.gamma, pretrain_epochs=0, epochs=cfg["dress_epochs"],
        norm_epochs=cfg["norm_epochs"], batch_size=args.batch_size, lr=args.lr, seed=args.seed,
    )  # fmt: skip
    x_tr, y_tr, x_val, y_val = data["train"] + data["val"]
    test = TensorData(*data["test"], device)
    log(f"{kind}: spec {spec.to_json()}, sparsities {list(sparsities)}, device {device}")

    t0 = time.time()
    model = init_weights_from_seed(build_model(spec), args.seed).to(device)
    sgd_epochs(model, cross_entropy, TensorData(x_tr, y_tr, device), cfg["pretrain_epochs"], config)
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dense_acc = accuracy_on(model, test)
    t_pre = time.time() - t0
    log(f"{kind}: dense test accuracy {dense_acc:.4f} ({t_pre:.0f}s)")

    t0 = time.time()
    result = train_dress(model, x_tr, y_tr, x_val, y_val, config, device=device,
                         progress=lambda s, e, m: log(f"{kind}: DRESS {s} epoch {e} {m}"))  # fmt: skip
    t_dress = time.time() - t0
    tables = build_dress_tables(result.state, spec, sparsities, allocation=result.allocation,
                                norm_states=result.norm_states)  # fmt: skip
    runner = DressRunner(tables)
    x_test = torch.as_tensor(data["test"][0], dtype=torch.float32) / 255.0
    dress_acc = []
    for k in range(len(sparsities)):
        runner.set_subnet(k)
        with torch.inference_mode():
            pred = torch.cat([runner(x_test[i : i + 512]) for i in range(0, len(x_test), 512)]).argmax(1)
        dress_acc.append(float((pred.numpy() == data["test"][1]).mean()))
    log(f"{kind}: DRESS test accuracy {[round(a, 4) for a in dress_acc]} ({t_dress:.0f}s)")

    t0 = time.time()
    pruned = []
    for s in sparsities:
        m = build_model(spec).to(device)
        m.load_state_dict(dense_state)
        state, _ = prune_with_rewinding(m, x_tr, y_tr, x_val, y_val, s, config,
                                        epochs_per_round=cfg["prune_epochs_per_round"], device=device)  # fmt: skip
        acc = test_accuracy(state, spec, test)
        pruned.append({"sparsity": s, "accuracy": acc, "storage_bytes": csr_storage_bytes(state, spec)})
        log(f"{kind}: pruned s={s} test accuracy {acc:.4f}")
    t_prune = time.time() - t0

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dense_cpu = build_model(spec)
    dense_cpu.load_state_dict({k: v.cpu() for k, v in dense_state.items()})
    lat = latency_table(dense_cpu, runner, spec.input_shape, cfg["latency_reps"])
    switch_ms = measure_switch(runner, reps=400) * 1e3
    torch.set_num_threads(threads)

    total = storage_bytes(tables)
    prune_total = sum(p["storage_bytes"] for p in pruned)
    subnets = []
    for k, s in enumerate(sparsities):
        subnets.append({
            "sparsity": s,
            "realised_sparsity": result.allocation.realised_sparsity(k),
            "layer_counts": list(result.allocation.counts[k]),
            "accuracy": dress_acc[k],
            "val_accuracy": result.val_accuracy[k],
            "pruned_accuracy": pruned[k]["accuracy"],
            "macs": subnet_flops(tables, k)["macs"],
            "storage_bytes_alone": storage_bytes(subnet_tables(tables, k)),
            "pruned_storage_bytes": pruned[k]["storage_bytes"],
            "latency_ms": lat[str(k)],
            "speedup_p50": lat["dense"]["p50_ms"] / lat[str(k)]["p50_ms"],
            "peak_memory_bytes": peak_memory_estimate(runner),
        })  # fmt: skip
    avg_dress = float(np.mean(dress_acc))
    avg_pruned = float(np.mean([p["accuracy"] for p in pruned]))
    densest_alone = subnets[0]["storage_bytes_alone"]
    summary = {
        "avg_accuracy_dress": avg_dress,
        "avg_accuracy_pruned": avg_pruned,
        "accuracy_gap_pp": 100 * (avg_pruned - avg_dress),
        "storage_dress_bytes": total,
        "storage_pruned_total_bytes": prune_total,
        "storage_ratio": total / prune_total,
        "storage_vs_densest_subnet": total / densest_alone,
        "sparsest_speedup": subnets[-1]["speedup_p50"],
        "switch_ms": switch_ms,
    }
    summary["targets_met"] = {
        "accuracy_gap_pp": summary["accuracy_gap_pp"] <= TARGETS["accuracy_gap_pp"],
        "storage_ratio": summary["storage_ratio"] <= TARGETS["storage_ratio"],
        "sparsest_speedup": summary["sparsest_speedup"] >= TARGETS["sparsest_speedup"],
        "switch_ms": switch_ms <= TARGETS["switch_ms"],
    }
    log(f"{kind}: {json.dumps(summary)}")
    return {
        "spec": json.loads(spec.to_json()),
        "sparsities": list(sparsities),
        "dense": {
            "accuracy": dense_acc,
            "macs": subnet_flops(tables, None)["macs"],
            "storage_bytes": dense_storage_bytes(dense_state),
            "latency_ms": lat["dense"],
        },
        "subnets": subnets,
        "summary": summary,
        "history": result.history,
        "train_seconds": {"pretrain": t_pre, "dress": t_dress, "pruning": t_prune},
        "latency_threads": 1,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(results["models"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        r = results["models"][kind]
        lat = [s["latency_ms"]["p50_ms"] for s in r["subnets"]]
        ax.plot(lat, [100 * s["accuracy"] for s in r["subnets"]], "o-", label="DRESS subnets (one table)")
        ax.plot(lat, [100 * s["pruned_accuracy"] for s in r["subnets"]], "s:",
                label="separate pruning [RFC20], same sparsity")  # fmt: skip
        for s, x in zip(r["subnets"], lat):
            ax.annotate(f"{s['sparsity']:.0%}", (x, 100 * s["accuracy"]), textcoords="offset points", xytext=(4, -10))
        ax.plot([r["dense"]["latency_ms"]["p50_ms"]], [100 * r["dense"]["accuracy"]], "k*", ms=10, label="dense nn.Module")
        ax.set_xlabel("batch-1 CPU latency p50 (ms, 1 thread)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{kind}: Fashion-MNIST")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def load_data(cfg: dict, seed: int) -> dict:
    ds = load_dataset("fashion-mnist")
    x_tr, y_tr, x_val, y_val = stratified_split(ds.x_train, ds.y_train, cfg["val_samples"] / len(ds.y_train), seed)
    rng = np.random.Generator(np.random.PCG64(seed))
    if cfg["train_samples"]:
        keep = np.sort(rng.permutation(len(y_tr))[: cfg["train_samples"]])
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    x_te, y_te = ds.x_test, ds.y_test
    if cfg["test_samples"]:
        keep = np.sort(rng.permutation(len(y_te))[: cfg["test_samples"]])
        x_te, y_te = x_te[keep], y_te[keep]
    return {"train": (x_tr, y_tr), "val": (x_val, y_val), "test": (x_te, y_te),
            "input_shape": ds.input_shape, "num_classes": ds.num_classes}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small CPU run (~1-2 min)")
    parser.add_argument("--device", default="cpu", help="training device, e.g. cuda")
    parser.add_argument("--models", default="cnn,mlp", help="comma-separated: cnn,mlp")
    parser.add_argument("--sparsities", type=float, nargs="+", help="override the per-model defaults")
    parser.add_argument("--gamma", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="CPU training threads (0: torch default)")
    parser.add_argument("--dress-epochs", type=int, help="override the mode's DRESS epochs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dress.json")
    args = parser.parse_args()
    cfg = dict(QUICK if args.quick else FULL)
    if args.dress_epochs:
        cfg["dress_epochs"] = args.dress_epochs
        cfg["prune_epochs_per_round"] = max(1, args.dress_epochs // len(RFC20_SCHEDULE))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    torch.manual_seed(args.seed)
    data = load_data(cfg, args.seed)
    log(f"data: train {len(data['train'][1])}, val {len(data['val'][1])}, test {len(data['test'][1])}")
    start = time.time()
    results = {
        "benchmark": "dress",
        "mode": "quick" if args.quick else "full",
        "config": {k: v for k, v in cfg.items()} | {"device": args.device, "lr": args.lr,
                                                    "batch_size": args.batch_size, "gamma": args.gamma,
                                                    "seed": args.seed, "prune_schedule": list(RFC20_SCHEDULE)},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                        "cuda": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None},
        "targets": TARGETS,
        "models": {},
    }  # fmt: skip
    for kind in args.models.split(","):
        results["models"][kind] = run_model(kind.strip(), args, copy.deepcopy(cfg), data)
    results["wall_seconds"] = time.time() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    png = args.out.with_suffix(".png")
    plot(results, png)
    log(f"wrote {args.out} and {png} in {results['wall_seconds']:.0f}s")
    print("\nmodel  subnet  sparsity  acc(DRESS)  acc(pruned)  MACs       bytes(alone)  p50 ms  speedup")
    for kind, r in results["models"].items():
        d = r["dense"]
        print(f"{kind:5}  dense   0.00      {d['accuracy']:.4f}      -            {d['macs']:<9}  "
              f"{d['storage_bytes']:<12}  {d['latency_ms']['p50_ms']:.3f}   1.00")
        for k, s in enumerate(r["subnets"]):
            print(f"{kind:5}  {k:<6}  {s['sparsity']:.2f}      {s['accuracy']:.4f}      {s['pruned_accuracy']:.4f}"
                  f"       {s['macs']:<9}  {s['storage_bytes_alone']:<12}  {s['latency_ms']['p50_ms']:.3f}   "
                  f"{s['speedup_p50']:.2f}")
        sm = r["summary"]
        print(f"{kind:5}  avg acc DRESS {sm['avg_accuracy_dress']:.4f} vs pruned {sm['avg_accuracy_pruned']:.4f} "
              f"(gap {sm['accuracy_gap_pp']:+.2f} pp); storage {sm['storage_dress_bytes']} vs "
              f"{sm['storage_pruned_total_bytes']} (ratio {sm['storage_ratio']:.3f}); switch "
              f"{sm['switch_ms']:.3f} ms; targets {sm['targets_met']}")


if __name__ == "__main__":
    main()
