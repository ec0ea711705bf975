"""DRESS nested subnets vs K separately pruned models (thesis Table 3.1/3.2), on Fashion-MNIST
by default or on any dataset the agent takes (--dataset: a name, an .npz or a class folder).

For each model (the CNN and the MLP): dense pre-training; DRESS (Alg. 3.1) from the dense
weights; the baseline [RFC20] (one model per sparsity, iterative global magnitude pruning with
learning-rate rewinding) from the same dense weights with the same number of epochs per subnet.
Reported per subnet: test accuracy (both methods), theoretical MACs, storage (DRESS-CSR for
DRESS, CSR for each pruned model), batch-1 CPU latency of the DRESS runner vs the dense
``nn.Module`` (torch.set_num_threads(1)), and the subnet switch time. Writes
bench/results/dress.json and bench/results/dress.png.

    .venv/bin/python bench/dress.py --quick                 # CPU smoke run, ~1-2 min
    .venv/bin/python bench/dress.py --device cuda           # full run (training on the GPU)
    .venv/bin/python bench/dress.py --kernels               # the kernel timings behind runner.py
    .venv/bin/python bench/dress.py --quick --dataset digits --val-samples 200

Training runs on ``--device``; latency is always measured on the CPU. The validation set
(--val-samples) is split off the dataset's train split per class; --train-samples and
--test-samples cap how much of the train and test splits is used.
"""

from __future__ import annotations

import argparse
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

from bench.bench_data import add_dataset_argument, fail, load_bench_dataset, require_split  # noqa: E402
from shared.data import stratified_split  # noqa: E402
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
    tables_from_bytes,
    tables_to_bytes,
    train_dress,
)
from shared.dress.baseline import RFC20_SCHEDULE, dense_storage_bytes  # noqa: E402
from shared.dress.kernels import choose_kernels  # noqa: E402
from shared.dress.loops import TensorData, accuracy_on, cross_entropy, sgd_epochs  # noqa: E402
from shared.models import ArchSpec, build_model, default_spec, init_weights_from_seed  # noqa: E402
from shared.tensors import to_model_input  # noqa: E402

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
    # ":uniform" = the same CNN with equal layer-wise sparsity (not in the thesis): global
    # magnitude keeps the costly 28x28 convolutions dense, uniform trades accuracy for latency.
    "models": "cnn,cnn:uniform,mlp",
}
QUICK = {
    "train_samples": 2000,
    "test_samples": 2000,
    "val_samples": 1000,
    "pretrain_epochs": 3,
    "dress_epochs": 5,
    "norm_epochs": 1,
    "prune_epochs_per_round": 1,
    "latency_reps": 100,
    # A narrower CNN keeps the CPU smoke run short; the full run uses the default spec.
    "specs": {"cnn": {"channels": [8, 16, 32], "hidden": [64]}, "mlp": None},
    "models": "cnn,mlp",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def spec_for(
    kind: str, override: dict | None, input_shape: tuple[int, ...], classes: int
) -> ArchSpec:
    spec = default_spec(kind, input_shape, classes)
    if override:
        spec = ArchSpec(
            kind,
            input_shape,
            classes,
            hidden=tuple(override.get("hidden", spec.hidden)),
            channels=tuple(override.get("channels", spec.channels)),
        )
    return spec


def state_accuracy(state: dict, spec: ArchSpec, test: TensorData) -> float:
    model = build_model(spec).to(test.y.device)
    model.load_state_dict(state)
    return accuracy_on(model, test)


def latency_table(
    dense: torch.nn.Module,
    runner: DressRunner,
    input_shape,
    reps: int,
    rounds: int = 8,
    batch: int = 1,
) -> dict:
    """Latencies at ``batch``, interleaving dense and every subnet in ``rounds`` so that machine
    load drifts affect all of them alike; returns p50/p95 in ms."""
    x = torch.rand(batch, *input_shape, generator=torch.Generator().manual_seed(0))
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


def time_variant(spec: ArchSpec, dense_state: dict, tables, reps: int) -> dict:
    """Kernels chosen by measurement (as the agent does at profile time), then batch-1 and
    batch-32 latencies of every subnet against the dense module, interleaved, 1 thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dense = build_model(spec)
        dense.load_state_dict({k: v.cpu() for k, v in dense_state.items()})
        runner = DressRunner(tables)
        t0 = time.time()
        plan = choose_kernels(runner)
        choose_s = time.time() - t0
        out: dict = {"kernel_choice_s": choose_s, "kernel_plan": plan.to_dict()}
        out["kernels"] = [list(plan.codes(k)) for k in range(tables.num_subnets)]
        for batch, n in ((1, reps), (32, max(16, reps // 8))):
            lat = latency_table(dense, runner, spec.input_shape, n, batch=batch)
            out[f"latency_b{batch}"] = lat
            out[f"speedup_b{batch}"] = [
                lat["dense"]["p50_ms"] / lat[str(k)]["p50_ms"] for k in range(tables.num_subnets)
            ]
        out["switch_ms"] = measure_switch(runner, reps=400) * 1e3
        return out
    finally:
        torch.set_num_threads(threads)


def retime(paths: list[Path], reps: int, out: Path) -> None:
    """Re-time saved variants (``--save-tables``): kernels, batch 1 and 32, storage ratio."""
    results = {}
    for path in paths:
        tables = tables_from_bytes(path.read_bytes())
        from safetensors.torch import load_file

        dense_state = load_file(str(path.with_suffix(".dense.safetensors")))
        r = time_variant(tables.spec, dense_state, tables, reps)
        r["storage_bytes_v2"] = storage_bytes(tables)
        r["storage_bytes_v1"] = len(tables_to_bytes(tables, version=1))
        r["macs"] = [subnet_flops(tables, k)["macs"] for k in range(tables.num_subnets)]
        r["dense_macs"] = subnet_flops(tables, None)["macs"]
        results[path.stem] = r
        log(
            f"{path.stem}: kernels {r['kernels']}; speed-up b1 "
            f"{[round(v, 2) for v in r['speedup_b1']]} b32 {[round(v, 2) for v in r['speedup_b32']]}"
            f" (choice {r['kernel_choice_s']:.1f}s)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    log(f"wrote {out}")


def make_config(kind: str, allocation: str, args, cfg: dict) -> DressConfig:
    sparsities = tuple(args.sparsities) if args.sparsities else default_sparsities(kind)
    return DressConfig(
        sparsities=sparsities,
        gamma=args.gamma,
        allocation=allocation,
        pretrain_epochs=0,
        epochs=cfg["dress_epochs"],
        norm_epochs=cfg["norm_epochs"],
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
    )


def prepare_kind(kind: str, args, cfg: dict, data: dict) -> dict:
    """Dense pre-training (stage 1, shared by DRESS and the baseline) and the K pruned models."""
    device = args.device
    spec = spec_for(kind, cfg["specs"][kind], data["input_shape"], data["num_classes"])
    config = make_config(kind, "global", args, cfg)
    x_tr, y_tr, x_val, y_val = data["train"] + data["val"]
    test = TensorData(*data["test"], device)
    log(f"{kind}: spec {spec.to_json()}, sparsities {list(config.sparsities)}, device {device}")
    t0 = time.time()
    model = init_weights_from_seed(build_model(spec), args.seed).to(device)
    sgd_epochs(model, cross_entropy, TensorData(x_tr, y_tr, device), cfg["pretrain_epochs"], config)
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dense_acc = accuracy_on(model, test)
    t_pre = time.time() - t0
    log(f"{kind}: dense test accuracy {dense_acc:.4f} ({t_pre:.0f}s)")
    t0 = time.time()
    pruned = []
    for s in config.sparsities:
        m = build_model(spec).to(device)
        m.load_state_dict(dense_state)
        state, _ = prune_with_rewinding(
            m,
            x_tr,
            y_tr,
            x_val,
            y_val,
            s,
            config,
            epochs_per_round=cfg["prune_epochs_per_round"],
            device=device,
        )
        acc = state_accuracy(state, spec, test)
        pruned.append(
            {"sparsity": s, "accuracy": acc, "storage_bytes": csr_storage_bytes(state, spec)}
        )
        log(f"{kind}: pruned s={s} test accuracy {acc:.4f}")
    return {
        "spec": spec,
        "dense_state": dense_state,
        "dense_acc": dense_acc,
        "pruned": pruned,
        "seconds": {"pretrain": t_pre, "pruning": time.time() - t0},
    }


def run_variant(kind: str, allocation: str, prep: dict, args, cfg: dict, data: dict) -> dict:
    """DRESS (stages 2-3) from the shared dense weights, then accuracy, costs and latency."""
    device, spec, pruned = args.device, prep["spec"], prep["pruned"]
    config = make_config(kind, allocation, args, cfg)
    sparsities = config.sparsities
    name = kind if allocation == "global" else f"{kind}:{allocation}"
    x_tr, y_tr, x_val, y_val = data["train"] + data["val"]
    model = build_model(spec).to(device)
    model.load_state_dict(prep["dense_state"])
    t0 = time.time()
    result = train_dress(
        model,
        x_tr,
        y_tr,
        x_val,
        y_val,
        config,
        device=device,
        progress=lambda s, e, m: log(f"{name}: DRESS {s} epoch {e} {m}"),
    )
    t_dress = time.time() - t0
    tables = build_dress_tables(
        result.state, spec, sparsities, allocation=result.allocation, norm_states=result.norm_states
    )
    if args.save_tables:  # for re-timing the same trained subnets later (--retime)
        stem = f"dress_{Path(args.dataset).name}_{name.replace(':', '_')}"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_name(stem + ".tables").write_bytes(tables_to_bytes(tables))
        from safetensors.torch import save_file

        save_file(
            {k: v.detach().cpu().contiguous() for k, v in prep["dense_state"].items()},
            str(args.out.with_name(stem + ".dense.safetensors")),
        )
    runner = DressRunner(tables)
    x_test = to_model_input(data["test"][0])  # uint8 scaled to [0, 1], float32 as it is
    dress_acc = []
    for k in range(len(sparsities)):
        runner.set_subnet(k)
        pred = torch.cat([runner(x_test[i : i + 512]) for i in range(0, len(x_test), 512)]).argmax(
            1
        )
        dress_acc.append(float((pred.numpy() == data["test"][1]).mean()))
    log(f"{name}: DRESS test accuracy {[round(a, 4) for a in dress_acc]} ({t_dress:.0f}s)")

    timing = time_variant(spec, prep["dense_state"], tables, cfg["latency_reps"])
    lat, switch_ms = timing["latency_b1"], timing["switch_ms"]

    total = storage_bytes(tables)
    prune_total = sum(p["storage_bytes"] for p in pruned)
    subnets = []
    for k, s in enumerate(sparsities):
        subnets.append(
            {
                "sparsity": s,
                "realised_sparsity": result.allocation.realised_sparsity(k),
                "layer_counts": dict(
                    zip(result.allocation.layers, result.allocation.counts[k], strict=True)
                ),
                "accuracy": dress_acc[k],
                "val_accuracy": result.val_accuracy[k],
                "pruned_accuracy": pruned[k]["accuracy"],
                "macs": subnet_flops(tables, k)["macs"],
                "storage_bytes_alone": storage_bytes(subnet_tables(tables, k)),
                "pruned_storage_bytes": pruned[k]["storage_bytes"],
                "latency_ms": lat[str(k)],
                "speedup_p50": lat["dense"]["p50_ms"] / lat[str(k)]["p50_ms"],
                "latency_ms_b32": timing["latency_b32"][str(k)],
                "speedup_p50_b32": timing["speedup_b32"][k],
                "kernels": timing["kernels"][k],
            }
        )
    avg_dress = float(np.mean(dress_acc))
    avg_pruned = float(np.mean([p["accuracy"] for p in pruned]))
    summary = {
        "avg_accuracy_dress": avg_dress,
        "avg_accuracy_pruned": avg_pruned,
        "accuracy_gap_pp": 100 * (avg_pruned - avg_dress),
        "storage_dress_bytes": total,
        "storage_pruned_total_bytes": prune_total,
        "storage_ratio": total / prune_total,
        "storage_vs_densest_subnet": total / subnets[0]["storage_bytes_alone"],
        "sparsest_speedup": subnets[-1]["speedup_p50"],
        "min_speedup_b1": min(timing["speedup_b1"]),
        "min_speedup_b32": min(timing["speedup_b32"]),
        "switch_ms": switch_ms,
        "peak_memory_bytes": peak_memory_estimate(runner),
    }
    summary["targets_met"] = {
        "accuracy_gap_pp": summary["accuracy_gap_pp"] <= TARGETS["accuracy_gap_pp"],
        "storage_ratio": summary["storage_ratio"] <= TARGETS["storage_ratio"],
        "sparsest_speedup": summary["sparsest_speedup"] >= TARGETS["sparsest_speedup"],
        "switch_ms": switch_ms <= TARGETS["switch_ms"],
    }
    log(f"{name}: {json.dumps(summary)}")
    return {
        "kind": kind,
        "allocation": allocation,
        "spec": json.loads(spec.to_json()),
        "sparsities": list(sparsities),
        "dense": {
            "accuracy": prep["dense_acc"],
            "macs": subnet_flops(tables, None)["macs"],
            "storage_bytes": dense_storage_bytes(prep["dense_state"]),
            "latency_ms": lat["dense"],
        },
        "subnets": subnets,
        "summary": summary,
        "history": result.history,
        "train_seconds": dict(prep["seconds"], dress=t_dress),
        "latency_threads": 1,
    }


def plot(results: dict, path: Path, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(results["models"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        r = results["models"][kind]
        lat = [s["latency_ms"]["p50_ms"] for s in r["subnets"]]
        ax.plot(
            lat,
            [100 * s["accuracy"] for s in r["subnets"]],
            "o-",
            label="DRESS subnets (one table)",
        )
        ax.plot(
            lat,
            [100 * s["pruned_accuracy"] for s in r["subnets"]],
            "s:",
            label="separate pruning [RFC20], same sparsity",
        )
        for s, x in zip(r["subnets"], lat, strict=True):
            ax.annotate(
                f"{s['sparsity']:.0%}",
                (x, 100 * s["accuracy"]),
                textcoords="offset points",
                xytext=(4, -10),
            )
        ax.plot(
            [r["dense"]["latency_ms"]["p50_ms"]],
            [100 * r["dense"]["accuracy"]],
            "k*",
            ms=10,
            label="dense nn.Module",
        )
        ax.set_xlabel("batch-1 CPU latency p50 (ms, 1 thread)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{kind}: {dataset}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _median_us(reps: int, fn, *args) -> float:
    for _ in range(10):
        fn(*args)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


# Candidate batch-1 kernels for one layer (``idx``/``val``: (G, n) columns and weights).
def _conv_dense(x, w):
    return torch.nn.functional.conv2d(x, w, padding=1)


def _conv_unfold_bmm(x, idx, val):
    cols = torch.nn.functional.unfold(x, 3, padding=1)[0]
    return torch.bmm(val.unsqueeze(1), cols.index_select(0, idx.view(-1)).view(*idx.shape, -1))


def _conv_unfold_bag(x, idx, val):
    cols = torch.nn.functional.unfold(x, 3, padding=1)[0]
    return torch.nn.functional.embedding_bag(idx, cols, per_sample_weights=val, mode="sum")


def _conv_padded_bag(cols, windows, idx32, offsets, val):  # what DressRunner does
    cols.view(windows.shape).copy_(windows)
    return torch.embedding_bag(cols, idx32, offsets, False, 0, False, val.view(-1), False, None)[0]


def _fc_dense(x, w):
    return torch.nn.functional.linear(x, w)


def _fc_gather_dot(x, idx32, val):  # what DressRunner does at batch 1
    return (x.view(-1).index_select(0, idx32).view(val.shape) * val).sum(1)


def _fc_bag(x, idx, val):
    return torch.nn.functional.embedding_bag(
        idx, x.t().contiguous(), per_sample_weights=val, mode="sum"
    )


def _fc_scatter_dense(x, idx, val, d):
    return torch.zeros(len(idx), d).scatter_(1, idx, val) @ x[0]


def _prefix_copies(index, values, n, slot_major):
    if slot_major:  # (n_max, G) tables: the subnet is a contiguous prefix of rows
        index, values = index[:n].t(), values[:n].t()
    else:
        index, values = index[:, :n], values[:, :n]
    return index.to(torch.int32, memory_format=torch.contiguous_format), values.contiguous()


def kernel_comparison(reps: int) -> dict:
    """The measurements behind the runner's kernel choices (docs/dress.md), batch 1, 1 thread:
    candidate sparse kernels for the default CNN's conv shapes and the MLP/CNN fc shapes at
    several densities, against torch's dense kernels, plus the table-layout copy costs."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    out: dict[str, list] = {"conv": [], "fc": [], "layout": []}
    for c, g, h in [(32, 32, 28), (64, 64, 14), (128, 128, 7)]:
        n_all, wp = c * 9, h + 2
        x = torch.rand(1, c, h, h, generator=gen)
        flat = torch.zeros(c * wp * wp + wp)
        flat[: c * wp * wp].view(c, wp, wp)[:, 1:-1, 1:-1] = x[0]
        windows = flat.as_strided((c, 3, 3, h * wp), (wp * wp, wp, 1, 1))
        cols = torch.empty(n_all, h * wp)
        for density in (0.05, 0.2, 0.5):
            n = max(1, round(density * n_all))
            idx = torch.stack([torch.randperm(n_all, generator=gen)[:n] for _ in range(g)])
            val = torch.randn(g, n, generator=gen)
            w = torch.zeros(g, n_all).scatter_(1, idx, val).view(g, c, 3, 3)
            idx32 = idx.to(torch.int32).view(-1)
            offsets = torch.arange(0, g * n, n, dtype=torch.int32)
            out["conv"].append(
                {
                    "shape": [c, g, h],
                    "density": density,
                    "dense_conv2d_us": _median_us(reps, _conv_dense, x, w),
                    "unfold_gather_bmm_us": _median_us(reps, _conv_unfold_bmm, x, idx, val),
                    "unfold_embedding_bag_us": _median_us(reps, _conv_unfold_bag, x, idx, val),
                    "padded_im2col_embedding_bag_us": _median_us(
                        reps, _conv_padded_bag, cols, windows, idx32, offsets, val
                    ),
                }
            )
    for d, g in [(784, 512), (1152, 256)]:
        x = torch.rand(1, d, generator=gen)
        for density in (0.05, 0.2, 0.5):
            n = max(1, round(density * d))
            idx = torch.stack([torch.randperm(d, generator=gen)[:n] for _ in range(g)])
            val = torch.randn(g, n, generator=gen)
            w = torch.zeros(g, d).scatter_(1, idx, val)
            out["fc"].append(
                {
                    "shape": [d, g],
                    "density": density,
                    "dense_linear_us": _median_us(reps, _fc_dense, x, w),
                    "gather_dot_us": _median_us(
                        reps, _fc_gather_dot, x, idx.to(torch.int32).view(-1), val
                    ),
                    "embedding_bag_us": _median_us(reps, _fc_bag, x, idx, val),
                    "scatter_dense_us": _median_us(reps, _fc_scatter_dense, x, idx, val, d),
                }
            )
    for g, n_max, n in [(128, 576, 576), (128, 576, 58), (512, 392, 39)]:
        index = torch.randint(0, 1000, (g, n_max), dtype=torch.int16, generator=gen)
        values = torch.randn(g, n_max, generator=gen)
        slots, slot_values = index.t().contiguous(), values.t().contiguous()
        out["layout"].append(
            {
                "rows": g,
                "n_max": n_max,
                "n": n,
                "row_major_copy_us": _median_us(reps, _prefix_copies, index, values, n, False),
                "slot_major_copy_us": _median_us(reps, _prefix_copies, slots, slot_values, n, True),
            }
        )
    for section, rows in out.items():
        for row in rows:
            text = ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
            )
            log(f"kernels {section}: {text}")
    return out


def load_data(cfg: dict, seed: int, dataset: str) -> dict:
    """Train / validation / test arrays; exits (status 2) when a split is empty or cannot give
    the validation set and still leave samples to train on."""
    ds = load_bench_dataset(dataset)
    n_train, n_val = len(ds.y_train), cfg["val_samples"]
    fix = "lower --val-samples or use a dataset with more training samples"
    require_split(ds, "train", n_train, n_val + 1, f"--val-samples {n_val} (and training)", fix)
    require_split(ds, "test", len(ds.y_test), 1, "scoring the subnets")
    x_tr, y_tr, x_val, y_val = stratified_split(ds.x_train, ds.y_train, n_val / n_train, seed)
    if len(y_tr) == 0:  # the split keeps at least one sample of every class for validation
        fail(f"{ds.name}: --val-samples {n_val} leaves none of the {n_train} training samples; {fix}")
    rng = np.random.Generator(np.random.PCG64(seed))
    if cfg["train_samples"]:
        keep = np.sort(rng.permutation(len(y_tr))[: cfg["train_samples"]])
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    x_te, y_te = ds.x_test, ds.y_test
    if cfg["test_samples"]:
        keep = np.sort(rng.permutation(len(y_te))[: cfg["test_samples"]])
        x_te, y_te = x_te[keep], y_te[keep]
    return {
        "train": (x_tr, y_tr),
        "val": (x_val, y_val),
        "test": (x_te, y_te),
        "input_shape": ds.input_shape,
        "num_classes": ds.num_classes,
    }


def print_summary(results: dict) -> None:
    header = [
        "model",
        "subnet",
        "sparsity",
        "acc DRESS",
        "acc pruned",
        "MACs",
        "bytes alone",
        "p50 ms",
        "speed-up",
    ]
    print("\n" + "  ".join(f"{h:>11}" for h in header))
    for name, r in results["models"].items():
        d = r["dense"]
        rows = [
            [
                name,
                "dense",
                0.0,
                d["accuracy"],
                float("nan"),
                d["macs"],
                d["storage_bytes"],
                d["latency_ms"]["p50_ms"],
                1.0,
            ]
        ]
        rows += [
            [
                name,
                k,
                s["sparsity"],
                s["accuracy"],
                s["pruned_accuracy"],
                s["macs"],
                s["storage_bytes_alone"],
                s["latency_ms"]["p50_ms"],
                s["speedup_p50"],
            ]
            for k, s in enumerate(r["subnets"])
        ]
        for row in rows:
            print("  ".join(f"{v:>11.4g}" if isinstance(v, float) else f"{v!s:>11}" for v in row))
        sm = r["summary"]
        print(
            f"{name}: avg accuracy DRESS {sm['avg_accuracy_dress']:.4f} vs pruned "
            f"{sm['avg_accuracy_pruned']:.4f} (gap {sm['accuracy_gap_pp']:+.2f} pp); storage "
            f"{sm['storage_dress_bytes']} vs {sm['storage_pruned_total_bytes']} bytes (ratio "
            f"{sm['storage_ratio']:.3f}); switch {sm['switch_ms']:.3f} ms; "
            f"targets met {sm['targets_met']}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small CPU run (~1-2 min)")
    parser.add_argument("--device", default="cpu", help="training device, e.g. cuda")
    parser.add_argument(
        "--models", help="comma-separated cnn|mlp[:global|:uniform|:latency] (default per mode)"
    )
    parser.add_argument(
        "--sparsities", type=float, nargs="+", help="override the per-model defaults"
    )
    parser.add_argument("--gamma", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU training threads (0: torch default; --quick uses 1)",
    )
    parser.add_argument("--dress-epochs", type=int, help="override the mode's DRESS epochs")
    add_dataset_argument(parser)
    parser.add_argument("--val-samples", type=int, help="override the validation set size")
    parser.add_argument("--train-samples", type=int, help="cap the training samples used")
    parser.add_argument("--test-samples", type=int, help="cap the test samples used")
    parser.add_argument(
        "--default-cnn", action="store_true", help="--quick with the default (full-width) CNN"
    )
    parser.add_argument(
        "--save-tables", action="store_true", help="also write each variant's tables"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dress.json")
    parser.add_argument(
        "--kernels",
        action="store_true",
        help="only time the candidate CPU kernels (~1 min) into dress_kernels.json",
    )
    parser.add_argument(
        "--retime", type=Path, nargs="+", help="re-time saved .tables files (no training)"
    )
    args = parser.parse_args(argv)
    if args.retime:
        retime(args.retime, 200, args.out)
        return
    if args.kernels:
        kernels = {
            "benchmark": "dress-kernels",
            "threads": 1,
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            **kernel_comparison(200),
        }
        path = args.out.with_name("dress_kernels.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(kernels, indent=2))
        log(f"wrote {path}")
        return
    cfg = dict(QUICK if args.quick else FULL)
    if args.default_cnn:
        cfg["specs"] = {"cnn": None, "mlp": None}  # both default specs
    if args.dress_epochs:
        cfg["dress_epochs"] = args.dress_epochs
        cfg["prune_epochs_per_round"] = max(1, args.dress_epochs // len(RFC20_SCHEDULE))
    for key in ("val_samples", "train_samples", "test_samples"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)  # small models: extra threads only contend
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    torch.manual_seed(args.seed)
    data = load_data(cfg, args.seed, args.dataset)
    log(
        f"data: train {len(data['train'][1])}, val {len(data['val'][1])}, "
        f"test {len(data['test'][1])}"
    )
    start = time.time()
    results = {
        "benchmark": "dress",
        "mode": "quick" if args.quick else "full",
        "config": {k: v for k, v in cfg.items()}
        | {
            "device": args.device,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "gamma": args.gamma,
            "seed": args.seed,
            "dataset": args.dataset,
            "prune_schedule": list(RFC20_SCHEDULE),
        },
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
        },
        "targets": TARGETS,
        "models": {},
    }
    prepared: dict[str, dict] = {}
    for entry in [m.strip() for m in (args.models or cfg["models"]).split(",") if m.strip()]:
        kind, _, allocation = entry.partition(":")
        if kind not in ("cnn", "mlp") or allocation not in ("", "global", "uniform", "latency"):
            parser.error(f"unknown model entry {entry!r}; use cnn|mlp[:global|:uniform|:latency]")
        if kind not in prepared:
            prepared[kind] = prepare_kind(kind, args, cfg, data)
        allocation = allocation or "global"
        name = kind if allocation == "global" else f"{kind}:{allocation}"
        results["models"][name] = run_variant(kind, allocation, prepared[kind], args, cfg, data)
    results["wall_seconds"] = time.time() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    png = args.out.with_suffix(".png")
    plot(results, png, Path(args.dataset).name)
    log(f"wrote {args.out} and {png} in {results['wall_seconds']:.0f}s")
    print_summary(results)


if __name__ == "__main__":
    main()
