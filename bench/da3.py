"""DA³ against its baselines on a multi-domain sequence (issue 11; docs/da3.md).

A ``resnet`` backbone is pre-trained on ``--dataset`` (Fashion-MNIST by default), then adapted
in turn to each of ``--domains`` (built-in names or ``.npz`` paths; images are stretched to
``--size`` x ``--size``) by every method of ``--methods``, each from the same pre-trained
backbone and a fresh seeded head. Per domain and method: test accuracy, trainable parameters,
training memory three ways (analytic activation memory, bytes saved for backward, peak RSS of
the same training in a fresh subprocess), seconds per epoch, inference FLOPs with and without
the gate. Writes bench/results/da3.json and a PNG (average accuracy against training memory).

    .venv/bin/python bench/da3.py --quick                        # smoke run, ~2 min, 1 thread
    .venv/bin/python bench/da3.py                                # the medium run of docs/da3.md
    .venv/bin/python bench/da3.py --domains mnist5k,my_domain.npz --methods da3,tinytl,finetune

``da3-nogate`` is DA³ trained and run without its gate (the reference for the gate's cost).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_data import add_dataset_argument, fail, load_bench_dataset, require_split  # noqa: E402
from shared.da3 import (  # noqa: E402
    DA3TrainConfig,
    da3_spec,
    evaluate_domain,
    resize_images,
    train_domain,
)
from shared.models import ArchSpec, build_model, init_weights_from_seed  # noqa: E402
from shared.training import TrainConfig, accuracy, train_supervised  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALL_METHODS = ("finetune", "last", "bias", "tinytl", "series", "parallel", "piggyback", "da3", "da3-nogate")
ADAPTOR = {"finetune": "none", "last": "none", "bias": "none", "da3-nogate": "da3"}
FULL = {"pretrain_samples": 12000, "pretrain_epochs": 3, "train_samples": 1500, "test_samples": 1000,
        "epochs": 6, "channels": (16, 32, 64), "blocks": (2, 2, 2), "rss_domains": 1}  # fmt: skip
QUICK = {"pretrain_samples": 1500, "pretrain_epochs": 1, "train_samples": 300, "test_samples": 300,
         "epochs": 2, "channels": (8, 16, 32), "blocks": (1, 1, 1), "rss_domains": 1}  # fmt: skip
TARGETS = {"accuracy_gap_pp": 1.0, "memory_ratio": 0.1, "time_ratio": 0.5, "gate_skip": 0.3, "gate_loss_pp": 0.5}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _subset(x: np.ndarray, y: np.ndarray, n: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if n is None or n >= len(x):
        return x, y
    idx = np.random.default_rng(seed).permutation(len(x))[:n]
    return x[idx], y[idx]


def method_config(method: str, args: argparse.Namespace, n: int) -> DA3TrainConfig:
    gate = {"sparsity_weight": args.sparsity_weight, "beta_final": args.beta_final,
            "temperature_final": args.temperature_final, "density_target": args.density_target}
    return DA3TrainConfig(method="da3" if method.startswith("da3") else method, epochs=args.epochs,
                          lr=args.lr, batch=min(args.batch, n), seed=args.seed,
                          **(gate if method == "da3" else {}))  # fmt: skip


def domain_model(backbone: ArchSpec, state: dict[str, torch.Tensor], method: str, classes: int, seed: int) -> torch.nn.Module:
    """The pre-trained backbone with ``method``'s modules (seeded) and a fresh seeded head."""
    spec = da3_spec(backbone, num_classes=classes, adaptor=ADAPTOR.get(method, method),
                    gate=method != "da3-nogate")  # fmt: skip
    model = init_weights_from_seed(build_model(spec), seed)
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")}, strict=False)
    return model


def measure_rss(backbone: ArchSpec, state: dict[str, torch.Tensor], method: str, classes: int,
                x: np.ndarray, y: np.ndarray, config: DA3TrainConfig, seed: int) -> dict[str, float]:
    """Peak RSS of the same training in a fresh interpreter. After setup (model and data
    loaded, one forward done) the kernel's high-water mark is reset (``/proc/self/clear_refs``,
    Linux), so ``rss_training_bytes`` = peak during training minus the RSS before it; imports
    peak higher than a small model's training and would hide it otherwise."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, "backbone.safetensors"))
        np.savez(os.path.join(tmp, "data.npz"), x=x, y=y)
        job = {"backbone": backbone.to_json(), "method": method, "classes": classes, "seed": seed,
               "config": {k: getattr(config, k) for k in config.__dataclass_fields__}, "dir": tmp}  # fmt: skip
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--rss-child", json.dumps(job)],
                              capture_output=True, text=True, timeout=900,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"RSS subprocess failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rss_child(job_text: str) -> None:
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    job = json.loads(job_text)
    state = load_file(os.path.join(job["dir"], "backbone.safetensors"))
    with np.load(os.path.join(job["dir"], "data.npz"), allow_pickle=False) as data:
        x, y = data["x"], data["y"]
    model = domain_model(ArchSpec.from_json(job["backbone"]), state, job["method"], job["classes"], job["seed"])
    with torch.no_grad():
        model.eval()
        model(torch.as_tensor(x[:2]).float())
    reset = _reset_peak_rss()
    setup = _status_bytes("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    train_domain(model, x, y, DA3TrainConfig(**job["config"]))
    peak = _status_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rss_setup_bytes": setup, "rss_peak_bytes": peak, "rss_training_bytes": peak - setup,
                      "rss_peak_reset": reset}))  # fmt: skip


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} missing from /proc/self/status")


def run(args: argparse.Namespace) -> dict:
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    size = (args.size, args.size)
    torch.manual_seed(args.seed)
    src = load_bench_dataset(args.dataset)
    require_split(src, "test", len(src.y_test), 1, "pre-training evaluation")
    px, py = _subset(resize_images(src.x_train, size), src.y_train, args.pretrain_samples, args.seed)
    backbone = ArchSpec("resnet", (1, *size), src.num_classes, hidden=tuple(args.blocks), channels=tuple(args.channels))
    if src.x_train.shape[1] != 1:
        fail(f"{src.name}: the DA³ bench takes grayscale images, got {src.x_train.shape[1]} channels")
    base = init_weights_from_seed(build_model(backbone), args.seed)
    start = time.perf_counter()
    key = json.dumps({"backbone": backbone.to_json(), "dataset": src.name, "samples": len(px),
                      "epochs": args.pretrain_epochs, "seed": args.seed})  # what the cached state depends on
    if not _load_backbone(args.backbone_cache, key, base):
        log(f"pre-training {backbone.to_json()} on {len(px)} samples of {src.name}")
        train_supervised(base, px, py, TrainConfig(epochs=args.pretrain_epochs, batch_size=64, seed=args.seed))
        _save_backbone(args.backbone_cache, key, base)
    tx, ty = _subset(resize_images(src.x_test, size), src.y_test, args.test_samples, args.seed)
    pre = {"dataset": src.name, "samples": len(px), "epochs": args.pretrain_epochs,
           "seconds": time.perf_counter() - start, "test_accuracy": accuracy(base, tx, ty)}  # fmt: skip
    log(f"pre-trained: {pre}")
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(ALL_METHODS)
    if unknown:
        fail(f"unknown --methods {sorted(unknown)}; choose from {', '.join(ALL_METHODS)}")
    domains: dict[str, dict] = {}
    for d_index, name in enumerate(n.strip() for n in args.domains.split(",") if n.strip()):
        ds = load_bench_dataset(name)
        require_split(ds, "train", len(ds.y_train), 2, "domain training")
        require_split(ds, "test", len(ds.y_test), 1, "domain evaluation")
        x, y = _subset(resize_images(ds.x_train, size), ds.y_train, args.train_samples, args.seed)
        xt, yt = _subset(resize_images(ds.x_test, size), ds.y_test, args.test_samples, args.seed)
        rows = {}
        for method in methods:
            model = domain_model(backbone, state, method, ds.num_classes, args.seed)
            config = method_config(method, args, len(x))
            torch.manual_seed(args.seed)
            tr = train_domain(model, x, y, config)
            ev = evaluate_domain(model, xt, yt)
            row = {**tr, **ev}
            if method.startswith("da3"):
                row["accuracy_ungated"] = evaluate_domain(model, xt, yt, gated=False)["accuracy"]
            if d_index < args.rss_domains:
                row.update(measure_rss(backbone, state, method, ds.num_classes, x, y, config, args.seed))
            rows[method] = row
            log(f"{ds.name} {method}: acc {row['accuracy']:.4f} saved {row['saved_bytes'] / 1e6:.2f} MB "
                f"analytic {row['analytic_bytes'] / 1e6:.2f} MB {row['seconds_per_epoch']:.2f} s/epoch "
                f"skip {row['gate_sparsity']:.2f}")  # fmt: skip
        domains[ds.name] = {"train_samples": len(x), "test_samples": len(xt), "classes": ds.num_classes, "methods": rows}
    summary = summarise(domains, methods)
    return {"meta": {"python": platform.python_version(), "torch": torch.__version__,
                     "threads": torch.get_num_threads(), "quick": args.quick,
                     "setting": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                                 for k, v in vars(args).items()
                                 if k not in ("out", "rss_child")}},  # fmt: skip
            "backbone": json.loads(backbone.to_json()), "pretrain": pre, "domains": domains,
            "summary": summary, "targets": check_targets(summary)}  # fmt: skip


def _load_backbone(path: Path | None, key: str, model: torch.nn.Module) -> bool:
    """Load a pre-trained state saved by :func:`_save_backbone` for the same ``key`` (a
    safetensors file: no pickle); False when there is none or it was made otherwise."""
    if path is None or not path.exists():
        return False
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("key") != key:
            log(f"{path}: made for another pre-training setting; pre-training afresh")
            return False
    model.load_state_dict(load_file(str(path)))
    log(f"pre-trained backbone loaded from {path}")
    return True


def _save_backbone(path: Path | None, key: str, model: torch.nn.Module) -> None:
    if path is None:
        return
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"key": key})


def summarise(domains: dict, methods: list[str]) -> dict:
    out = {}
    for m in methods:
        rows = [d["methods"][m] for d in domains.values()]
        keys = ["accuracy", "saved_bytes", "analytic_bytes", "seconds_per_epoch", "trainable_params",
                "gate_sparsity", "flops", "flops_dense", "adaptor_flops", "adaptor_flops_dense"]  # fmt: skip
        out[m] = {k: float(np.mean([r[k] for r in rows])) for k in keys}
        for k in ("accuracy_ungated", "rss_training_bytes", "rss_peak_bytes"):
            vals = [r[k] for r in rows if k in r]
            if vals:
                out[m][k] = float(np.mean(vals))
    return out


def check_targets(s: dict) -> dict:
    """Each issue target as {value, target, met}; absent when a method it needs did not run."""
    out: dict[str, dict] = {}
    if "da3" not in s:
        return out
    da3 = s["da3"]
    if "finetune" in s:
        ft = s["finetune"]
        gap = 100 * (ft["accuracy"] - da3["accuracy"])
        out["accuracy_within_1pt_of_finetune"] = {"value_pp": gap, "target_pp": TARGETS["accuracy_gap_pp"], "met": gap <= 1.0}
        ratio = da3["saved_bytes"] / ft["saved_bytes"]
        out["saved_memory_le_tenth_of_finetune"] = {"value": ratio, "target": 0.1, "met": ratio <= 0.1}
        if "rss_training_bytes" in da3 and "rss_training_bytes" in ft and ft["rss_training_bytes"] > 0:
            r = da3["rss_training_bytes"] / ft["rss_training_bytes"]
            out["rss_memory_le_tenth_of_finetune"] = {"value": r, "target": 0.1, "met": r <= 0.1}
        t = da3["seconds_per_epoch"] / ft["seconds_per_epoch"]
        out["epoch_time_le_half_of_finetune"] = {"value": t, "target": 0.5, "met": t <= 0.5}
    if "tinytl" in s:
        tt = s["tinytl"]
        out["accuracy_ge_tinytl"] = {"value_pp": 100 * (da3["accuracy"] - tt["accuracy"]), "met": da3["accuracy"] >= tt["accuracy"]}
        out["saved_memory_below_tinytl"] = {"value": da3["saved_bytes"] / tt["saved_bytes"], "met": da3["saved_bytes"] < tt["saved_bytes"]}
    # The reference is DA³ trained without a gate: the same gated model run with its gate forced
    # open is no reference (its corrections are trained for the kept positions only), so
    # without da3-nogate in the run the target is not judged (met: None).
    reference = s["da3-nogate"]["accuracy"] if "da3-nogate" in s else da3.get("accuracy_ungated", da3["accuracy"])
    loss = 100 * (reference - da3["accuracy"])
    out["gate_skips_30pct_at_le_half_pt"] = {"skip": da3["gate_sparsity"], "accuracy_loss_pp": loss,
                                             "reference": "da3-nogate" if "da3-nogate" in s else "same model ungated",
                                             "met": (da3["gate_sparsity"] >= 0.3 and loss <= 0.5) if "da3-nogate" in s else None}  # fmt: skip
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for m, r in results["summary"].items():
        ax.scatter(r["saved_bytes"] / 1e6, 100 * r["accuracy"], s=40)
        ax.annotate(m, (r["saved_bytes"] / 1e6, 100 * r["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("training memory: bytes saved for backward per step (MB, log)")
    ax.set_ylabel("average test accuracy over domains (%)")
    ax.set_title(f"DA³ vs baselines (backbone on {results['pretrain']['dataset']})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _optional_float(text: str) -> float | None:
    return None if text.strip().lower() == "none" else float(text)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dataset_argument(parser)
    parser.add_argument("--domains", default="mnist5k,digits,uci-mfeat",
                        help="comma-separated target domains: built-in names or .npz paths")
    parser.add_argument("--methods", default=",".join(ALL_METHODS))
    parser.add_argument("--quick", action="store_true", help="small backbone and subsets (smoke run)")
    parser.add_argument("--size", type=int, default=28, help="image side the backbone takes")
    parser.add_argument("--pretrain-samples", type=int)
    parser.add_argument("--pretrain-epochs", type=int)
    parser.add_argument("--train-samples", type=int)
    parser.add_argument("--test-samples", type=int)
    parser.add_argument("--epochs", type=int, help="epochs per domain and method")
    parser.add_argument("--channels", type=lambda s: tuple(int(v) for v in s.split(",")))
    parser.add_argument("--blocks", type=lambda s: tuple(int(v) for v in s.split(",")))
    parser.add_argument("--backbone-cache", type=Path, default=None,
                        help="reuse the pre-trained backbone saved here by an earlier run of the same setting")
    parser.add_argument("--rss-domains", type=int, help="measure peak RSS on the first N domains (0: none)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    # Gate defaults: the best of the uci-mfeat comparison in docs/da3.md ("The gate after the β
    # schedule"); the medium-run table there used --sparsity-weight 0.05 without schedules.
    parser.add_argument("--sparsity-weight", type=float, default=5.0, help="DA³ gate density penalty")
    parser.add_argument("--beta-final", type=_optional_float, default=30.0,
                        help="DA³: anneal Eq. (1)'s beta geometrically to this over the run")
    parser.add_argument("--temperature-final", type=_optional_float, default=None,
                        help="DA³: anneal the Gumbel-Sigmoid temperature T to this over the run")
    parser.add_argument("--density-target", type=_optional_float, default=0.65,
                        help="DA³: penalise only gate density above this target (per block, squared); "
                             "'none': the mean density")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "da3.json")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child)
        return {}
    torch.set_num_threads(args.threads)
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    log(json.dumps(results["targets"], indent=2))
    return results


if __name__ == "__main__":
    main()
