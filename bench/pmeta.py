"""p-Meta benchmark: thesis Tables 4.3/4.4 (5-way 1/5-shot, in-domain and cross-domain) and the
rho ablation of Table 4.6, for MAML, ANIL, BOIL, MAML++, p-Meta (4.4.2) and p-Meta (4.4.2+4.4.3)
on the 4Conv backbone with group normalisation, plus a PNG of accuracy against measured memory.

Data: ``--dataset glyphs`` (default) renders the glyph dataset in memory (shared/data/glyphs.py;
``edgeloop data glyphs --out FILE.npz`` writes the same data) and splits its classes into
disjoint meta-train and test classes (in-domain); ``--cross`` (default fashion-mnist) gives the
cross-domain test tasks (meta-trained on the glyphs, few-shot learned on its classes, like the
thesis's CUB column). Any ``--dataset`` shared.data.load_dataset takes works (train and test
splits are pooled, then split by class).

Per method and shot setting: accuracy ± 95% CI over ``--test-tasks`` tasks (the full-batch
inner loop, which equals on-device gradient accumulation without attention; p-Meta with
attention is also scored through ``adapt`` with sample batch 1 on ``--device-tasks`` tasks),
GFLOPs (Eq. 4.21) and memory of on-device adaptation with sample batch 1: analytic (Eq. 4.19,
shared/pmeta/memory.py), bytes saved for backward (saved-tensors hook) and the peak-RSS growth
of an adaptation in a fresh subprocess (``--rss``; the child is this file with --rss-child).

    python bench/pmeta.py --quick                      # smoke run (~1 min)
    python bench/pmeta.py --iterations 300 --test-tasks 1000   # the documented medium run
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.bench_data import fail, load_bench_dataset  # noqa: E402
from shared.data.tasks import TaskError, TaskSampler, class_split  # noqa: E402
from shared.models import build_model, init_weights_from_seed  # noqa: E402
from shared.pmeta import (  # noqa: E402
    AdaptConfig,
    MetaTrainConfig,
    adapt,
    backbone_layers,
    evaluate_tasks,
    inference_flops,
    meta_train,
    pmeta_spec,
)

METHODS = ("maml", "anil", "boil", "mamlpp", "pmeta", "pmeta_att")
LABELS = {"maml": "MAML", "anil": "ANIL", "boil": "BOIL", "mamlpp": "MAML++", "pmeta": "p-Meta (4.4.2)",
          "pmeta_att": "p-Meta (4.4.2+4.4.3)"}  # fmt: skip
ABLATION = ((0.0, 0.0), (0.3, 0.0), (0.0, 0.3), (0.3, 0.3), (0.5, 0.5))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _glyph_data(seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    from shared.data.glyphs import GlyphError, build_glyphs

    try:
        x, y, _ = build_glyphs(seed=seed)
    except GlyphError as exc:
        fail(f"--dataset glyphs: {exc}")
    return x[:, None], y, "glyphs"


def _pooled(spec: str, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    if spec == "glyphs":
        return _glyph_data(seed)
    ds = load_bench_dataset(spec)
    if ds.x_train.dtype != np.uint8 or ds.x_train.ndim != 4:
        fail(f"--dataset {spec}: p-Meta's conv4 needs images (N, C, H, W), got {ds.x_train.shape} {ds.x_train.dtype}")
    return np.concatenate([ds.x_train, ds.x_test]), np.concatenate([ds.y_train, ds.y_test]), ds.name


def _sampler(x: np.ndarray, y: np.ndarray, classes: np.ndarray | None, ways: int, shots: int, queries: int,
             seed: int, what: str) -> TaskSampler:  # fmt: skip
    try:
        return TaskSampler(x, y, ways=ways, shots=shots, queries=queries, seed=seed, classes=classes)
    except TaskError as exc:
        fail(f"{what}: {exc}")


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _memory(model: torch.nn.Module, sampler: TaskSampler, tasks: int) -> dict[str, float]:
    saved, analytic, flops, secs, inputs = [], [], [], [], []
    for _ in range(tasks):
        task = sampler.sample()
        r = adapt(model, task.support_x, task.support_y, AdaptConfig(sample_batch=1))
        saved.append(r.saved_bytes)
        analytic.append(r.analytic_bytes)
        flops.append(r.flops)
        secs.append(r.seconds)
        inputs.append(r.predicted_saved_bytes)
    return {"saved_bytes": _mean(saved), "analytic_bytes": _mean(analytic), "predicted_saved_bytes": _mean(inputs),
            "gflops": _mean(flops) * 2 / 1e9, "adapt_seconds": _mean(secs)}  # fmt: skip


def _rss(model: torch.nn.Module, sampler: TaskSampler, sample_batch: int) -> dict[str, float]:
    """Peak-RSS growth of one adaptation in a fresh interpreter (this file with --rss-child)."""
    from safetensors.torch import save_file

    task = sampler.sample()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
        (d / "spec.json").write_text(model.arch_spec.to_json())  # type: ignore[attr-defined]
        np.savez(d / "support.npz", x=task.support_x.numpy(), y=task.support_y.numpy())
        cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", str(d), "--rss-batch", str(sample_batch)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                             env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                  "MALLOC_MMAP_THRESHOLD_": "65536"})  # freed large blocks leave RSS  # fmt: skip
    if out.returncode != 0:
        log(f"rss child failed: {out.stderr[-500:]}")
        return {"rss_bytes": float("nan")}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rss_child(folder: Path, sample_batch: int) -> None:
    from safetensors.torch import load_file

    from shared.models import ArchSpec

    torch.set_num_threads(1)
    model = build_model(ArchSpec.from_json((folder / "spec.json").read_text()))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    data = np.load(folder / "support.npz")
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    # Warm up on one sample and one step: the one-time costs (autograd engine, kernels, allocator
    # arenas) are then in the baseline, and the growth is what this adaptation adds.
    adapt(model, x[:1], y[:1], AdaptConfig(sample_batch=1, steps=1))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = adapt(model, x, y, AdaptConfig(sample_batch=sample_batch))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rss_bytes": float(peak - base), "rss_base_bytes": float(base),
                      "saved_bytes": float(result.saved_bytes), "sample_batch": sample_batch}))  # fmt: skip


def _train(method: str, shape: tuple[int, ...], args: argparse.Namespace, shots: int, sampler: TaskSampler,
           iterations: int, rho: tuple[float, float] = (0.3, 0.0)) -> tuple[torch.nn.Module, MetaTrainConfig, dict]:  # fmt: skip
    spec = pmeta_spec(shape, args.ways, channels=args.channels, attention=method == "pmeta_att",
                      rho_fw=rho[0], rho_bw=rho[1], init_alpha=args.inner_lr)  # fmt: skip
    model = build_model(spec)
    init_weights_from_seed(model, args.seed)
    cfg = MetaTrainConfig(method=method, ways=args.ways, shots=shots, queries=args.queries, meta_batch=args.meta_batch,
                          iterations=iterations, outer_lr=args.outer_lr, inner_lr=args.inner_lr,
                          second_order=args.second_order, lasso_lambda=args.lasso, seed=args.seed)  # fmt: skip
    metrics = meta_train(model, sampler, cfg)
    return model, cfg, metrics


def _acc(model: torch.nn.Module, sampler: TaskSampler, cfg: MetaTrainConfig, tasks: int, **kw: Any) -> dict:
    r = evaluate_tasks(model, sampler, cfg, tasks, **kw)
    return {"accuracy": r["accuracy"], "ci95": r["ci95"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    x, y, name = _pooled(args.dataset, args.seed)
    train_classes, test_classes = class_split(y, (1 - args.test_fraction, args.test_fraction), seed=args.seed)
    cross = None
    if args.cross != "none":
        cx, cy, cname = _pooled(args.cross, args.seed)
        if cx.shape[1:] != x.shape[1:]:
            fail(f"--cross {args.cross}: images {cx.shape[1:]} differ from the meta-training data's {x.shape[1:]}")
        cross = (cx, cy, cname)
    shape = tuple(int(d) for d in x.shape[1:])
    results: dict[str, Any] = {"dataset": name, "cross": cross[2] if cross else None, "ways": args.ways,
                               "train_classes": len(train_classes), "test_classes": len(test_classes),
                               "settings": vars(args).copy(), "tables": {}, "ablation": {}}  # fmt: skip
    results["settings"]["out"] = str(args.out)
    for shots in args.shots:
        table: dict[str, Any] = {}
        train = _sampler(x, y, train_classes, args.ways, shots, args.queries, args.seed, "meta-train classes")
        for method in args.methods:
            start = time.perf_counter()
            model, cfg, metrics = _train(method, shape, args, shots, train, args.iterations)
            row: dict[str, Any] = {"train": metrics}
            test = _sampler(x, y, test_classes, args.ways, shots, args.queries, args.seed + 1, "test classes")
            row["in_domain"] = _acc(model, test, cfg, args.test_tasks)
            if method == "pmeta_att" and args.device_tasks:
                test = _sampler(x, y, test_classes, args.ways, shots, args.queries, args.seed + 1, "test classes")
                row["in_domain_device"] = _acc(model, test, cfg, args.device_tasks, on_device=True)
            if cross is not None:
                ctest = _sampler(cross[0], cross[1], None, args.ways, shots, args.queries, args.seed + 2, "cross-domain")
                row["cross_domain"] = _acc(model, ctest, cfg, args.test_tasks)
            mem_sampler = _sampler(x, y, test_classes, args.ways, shots, args.queries, args.seed + 3, "test classes")
            row["memory"] = _memory(model, mem_sampler, args.memory_tasks)
            if args.rss:
                row["rss_batch1"] = _rss(model, mem_sampler, 1)
                row["rss_full_batch"] = _rss(model, mem_sampler, args.ways * shots)
            row["alpha"] = model.pmeta.alpha.detach().tolist()  # type: ignore[union-attr]
            row["seconds"] = time.perf_counter() - start
            table[method] = row
            log(f"{shots}-shot {method}: in {row['in_domain']['accuracy']:.3f}±{row['in_domain']['ci95']:.3f} "
                f"cross {row.get('cross_domain', {}).get('accuracy', float('nan')):.3f} "
                f"saved {row['memory']['saved_bytes'] / 1e6:.3f} MB analytic {row['memory']['analytic_bytes'] / 1e6:.3f} MB "
                f"({row['seconds']:.0f}s)")  # fmt: skip
        results["tables"][f"{args.ways}way_{shots}shot"] = table
    layers = backbone_layers(pmeta_spec(shape, args.ways, channels=args.channels))
    results["inference_gflops"] = inference_flops(layers) * 2 / 1e9
    if args.ablation:
        shots = args.shots[0]
        train = _sampler(x, y, train_classes, args.ways, shots, args.queries, args.seed, "meta-train classes")
        for rho in ABLATION[: args.ablation]:
            model, cfg, _ = _train("pmeta_att", shape, args, shots, train, args.ablation_iterations, rho)
            test = _sampler(x, y, test_classes, args.ways, shots, args.queries, args.seed + 1, "test classes")
            entry = _acc(model, test, cfg, args.test_tasks)
            mem = _sampler(x, y, test_classes, args.ways, shots, args.queries, args.seed + 3, "test classes")
            entry.update(_memory(model, mem, args.memory_tasks))
            results["ablation"][f"fw{rho[0]}_bw{rho[1]}"] = entry
            log(f"ablation rho_fw={rho[0]} rho_bw={rho[1]}: {entry['accuracy']:.3f}±{entry['ci95']:.3f}")
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = []
    for key, table in results["tables"].items():
        lines += [f"**{key}** (in-domain: {results['dataset']} test classes; cross-domain: {results['cross']})", "",
                  "| method | in-domain acc | cross-domain acc | GFLOPs | analytic MB | saved MB | RSS MB (batch 1 / full) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for method, row in table.items():
            cross = row.get("cross_domain")
            rss1 = row.get("rss_batch1", {}).get("rss_bytes", float("nan")) / 1e6
            rssf = row.get("rss_full_batch", {}).get("rss_bytes", float("nan")) / 1e6
            lines.append(
                f"| {LABELS[method]} | {100 * row['in_domain']['accuracy']:.1f} ± {100 * row['in_domain']['ci95']:.1f}% | "
                + (f"{100 * cross['accuracy']:.1f} ± {100 * cross['ci95']:.1f}% | " if cross else "- | ")
                + f"{row['memory']['gflops']:.4f} | {row['memory']['analytic_bytes'] / 1e6:.3f} | "
                f"{row['memory']['saved_bytes'] / 1e6:.3f} | {rss1:.2f} / {rssf:.2f} |"
            )
            if "in_domain_device" in row:
                d = row["in_domain_device"]
                lines.append(f"| ↳ on device, batch 1 | {100 * d['accuracy']:.1f} ± {100 * d['ci95']:.1f}% | | | | | |")
        lines.append("")
    if results["ablation"]:
        lines += ["| rho_fw, rho_bw | accuracy | saved MB |", "| --- | --- | --- |"]
        for key, e in results["ablation"].items():
            lines.append(f"| {key} | {100 * e['accuracy']:.1f} ± {100 * e['ci95']:.1f}% | {e['saved_bytes'] / 1e6:.3f} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results["tables"]), figsize=(6 * len(results["tables"]), 4.5), squeeze=False)
    for ax, (key, table) in zip(axes[0], results["tables"].items(), strict=True):
        for method, row in table.items():
            mem = row["memory"]["saved_bytes"] / 1e6
            acc = 100 * row["in_domain"]["accuracy"]
            ax.errorbar(mem, acc, yerr=100 * row["in_domain"]["ci95"], fmt="o", capsize=3, label=LABELS[method])
        ax.set_xlabel("measured saved-for-backward memory per adaptation, MB (sample batch 1)")
        ax.set_ylabel("few-shot accuracy, % (in-domain)")
        ax.set_title(key.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="glyphs", help="glyphs (rendered in memory), a built-in dataset, an .npz "
                   "file or a folder of class sub-folders (default glyphs)")  # fmt: skip
    p.add_argument("--cross", default="fashion-mnist", help="cross-domain test dataset, or none")
    p.add_argument("--quick", action="store_true", help="smoke run: a few iterations and tasks")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--shots", nargs="+", type=int, default=[1, 5])
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--outer-lr", type=float, default=1e-3)
    p.add_argument("--inner-lr", type=float, default=0.1, help="fixed α (maml/anil/boil), initial α (others)")
    p.add_argument("--lasso", type=float, default=1e-3, help="λ of Eq. 4.10")
    p.add_argument("--second-order", action="store_true")
    p.add_argument("--test-tasks", type=int, default=1000)
    p.add_argument("--device-tasks", type=int, default=100, help="tasks scored through adapt (batch 1) for p-Meta")
    p.add_argument("--memory-tasks", type=int, default=20)
    p.add_argument("--test-fraction", type=float, default=0.3, help="share of classes held out for testing")
    p.add_argument("--rss", action=argparse.BooleanOptionalAction, default=True, help="measure peak RSS in a subprocess")
    p.add_argument("--ablation", type=int, default=len(ABLATION), help="how many rho settings of Table 4.6 to run")
    p.add_argument("--ablation-iterations", type=int, help="meta-training iterations per ablation setting")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pmeta.json")
    p.add_argument("--png", type=Path, help="accuracy-vs-memory figure (default: --out with .png)")
    p.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--rss-batch", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_child is not None:
        _rss_child(args.rss_child, args.rss_batch)
        return None
    if args.quick:
        args.iterations = min(args.iterations, 3)
        args.meta_batch = min(args.meta_batch, 2)
        args.test_tasks = min(args.test_tasks, 20)
        args.device_tasks = min(args.device_tasks, 5)
        args.memory_tasks = min(args.memory_tasks, 2)
        args.ablation = min(args.ablation, 2)
        args.shots = args.shots[:1]
    if args.ablation_iterations is None:
        args.ablation_iterations = args.iterations
    if args.ways < 2 or min(args.shots) < 1 or args.queries < 1 or args.test_tasks < 2:
        fail("ways must be >= 2, shots and queries >= 1, test tasks >= 2")
    if not 0 < args.test_fraction < 1 or math.isnan(args.test_fraction):
        fail("--test-fraction must lie in (0, 1)")
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.png or args.out.with_suffix(".png"))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
