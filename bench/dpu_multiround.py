"""Multi-round Deep Partial Updating on Fashion-MNIST (thesis §5.5.5, Table 5.2).

Setting (MLP 784-512-512-10, Adam, batch 128, lr decayed x0.1 at 1/3 and 2/3 of each step):
|D^1| samples before the first round, |dD^r| new ones per round, R rounds. Every method starts
from the same seeded w^0 and is evaluated on the same 7000 test images after every round (a
3000-image validation split drives checkpoint choice and skip-if-worse, as in §5.5).

Runs: full updating from the same random init every round ("full-scratch", the thesis's FU
baseline) and from w^{r-1} ("full-warm"); for each k: DPU (fp32 values and int8 values with
error feedback), GCPU (Alg. 5.1, no re-init), RPU and magnitude pruning [RFC20]. Partial
updates are encoded with shared.codec; bytes are compared with a raw fp32 model per round and
with the thesis's ideal accounting S_w*k*I + H(k)*I.

    .venv/bin/python bench/dpu_multiround.py --quick              # smoke test, < 1 min on CPU
    .venv/bin/python bench/dpu_multiround.py --medium             # a few minutes on CPU
    .venv/bin/python bench/dpu_multiround.py --device cuda        # the full setting (GPU)

Runs are saved to the JSON after each one finishes and skipped when the JSON already holds
them with the same setting, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.codec import encode_update, ideal_paper_bits, make_update, size_breakdown  # noqa: E402
from shared.data import load_dataset  # noqa: E402
from shared.dpu import (  # noqa: E402
    DPUConfig,
    add_residual,
    dense_bytes,
    partial_update,
    seeded_state,
    top1_accuracy,
)
from shared.models import build_model, default_spec  # noqa: E402

PRESETS = {
    # Close to the thesis's MNIST MLP run (§5.5.1.1, Fig. 5.11): {|D^1|, |dD^r|} = {50, 50}
    # (the ECCV paper's setting; the thesis text does not print it), 60 epochs per step.
    "full": dict(initial=50, per_round=50, rounds=100, epochs=60, ks=(0.005, 0.01, 0.05),
                 n_val=3000, n_test=7000),
    "medium": dict(initial=100, per_round=100, rounds=10, epochs=10, ks=(0.005, 0.01),
                   n_val=2000, n_test=4000),
    "quick": dict(initial=100, per_round=100, rounds=3, epochs=2, ks=(0.01,),
                  n_val=500, n_test=1000),
}  # fmt: skip
# label -> (method, value format, re-initialisation). GCPU and RPU train from w^{r-1} and
# pruning from w^0 every round, as in §5.5.5.
PARTIAL_RUNS = {
    "dpu": ("dpu", "fp32", "auto"),
    "dpu-int8": ("dpu", "int8", "auto"),
    "gcpu": ("gcpu", "fp32", "never"),
    "rpu": ("rpu", "fp32", "never"),
    "magnitude": ("magnitude", "fp32", "always"),
}
SEED_BYTES = 8  # a re-initialisation ships its u64 seed next to the diff


@dataclass(frozen=True)
class Run:
    name: str
    method: str
    k: float
    value_format: str  # "fp32" | "int8" (full updates always ship a raw fp32 model)
    reinit: str  # "auto" (§5.4.2 rule), "always" (from w^0 each round), "never"


def plan_runs(ks: tuple[float, ...], methods: tuple[str, ...]) -> list[Run]:
    """Both full-updating baselines, then each requested partial method at each k."""
    unknown = set(methods) - set(PARTIAL_RUNS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {list(PARTIAL_RUNS)}")
    runs = [
        Run("full-scratch", "full", 1.0, "fp32", "always"),
        Run("full-warm", "full", 1.0, "fp32", "never"),
    ]
    for k in ks:
        for label in methods:
            method, fmt, reinit = PARTIAL_RUNS[label]
            runs.append(Run(f"{label}@{k}", method, k, fmt, reinit))
    return runs


def load_data(setting: dict, seed: int):
    ds = load_dataset("fashion-mnist")
    rng = np.random.Generator(np.random.PCG64(seed))
    order = rng.permutation(len(ds.y_train))
    test_order = rng.permutation(len(ds.y_test))
    val_idx = test_order[: setting["n_val"]]
    test_idx = test_order[setting["n_val"] : setting["n_val"] + setting["n_test"]]
    need = setting["initial"] + (setting["rounds"] - 1) * setting["per_round"]
    if need > len(order):
        raise SystemExit(
            f"the setting needs {need} training samples, Fashion-MNIST has {len(order)}"
        )
    pool = order[:need]
    return (ds.x_train[pool], ds.y_train[pool], ds.x_test[val_idx], ds.y_test[val_idx],
            ds.x_test[test_idx], ds.y_test[test_idx])  # fmt: skip


def encoded_size(diff_base: dict, target: dict, value_format: str) -> tuple[int, dict, dict, dict]:
    """(bytes on the wire, state the device reconstructs, residual, size breakdown)."""
    update = make_update(diff_base, target, value_format)
    blob = encode_update(update, update.base_hash)
    return len(blob), update.target, update.residual, size_breakdown(blob)


def run_one(run: Run, setting: dict, data, config: DPUConfig, device: str, seed: int) -> dict:
    x_pool, y_pool, x_val, y_val, x_test, y_test = data
    spec = default_spec("mlp", tuple(x_pool.shape[1:]), 10)
    model = build_model(spec).to(device)
    deployed = seeded_state(model, config.init_seed)  # w^0, on every device before round 1
    full_bytes = sum(t.numel() * 4 for t in deployed.values())
    xt = torch.as_tensor(x_test).to(device)
    yt = torch.as_tensor(y_test).to(device)
    residual: dict | None = None
    breakdown: dict[str, int] = {}  # codec sections summed over the run
    n_at_last_init = None
    rounds = []
    t0 = time.perf_counter()
    for r in range(1, setting["rounds"] + 1):
        n = setting["initial"] + (r - 1) * setting["per_round"]
        cfg = replace(config, method=run.method, k=run.k, seed=seed * 100_003 + r)
        # Round 1 trains from w^0, which counts as the first initialisation (§5.4.2).
        reinit = {"always": True, "never": False, "auto": None}[run.reinit] if r > 1 else False
        res = partial_update(model, deployed, x_pool[:n], y_pool[:n], x_val, y_val, cfg,
                             reinit=reinit, n_at_last_init=n_at_last_init)  # fmt: skip
        sent = 0
        if not res.skipped:
            if run.method == "full":
                sent, deployed = full_bytes, res.state
            else:
                target = res.state
                leftover = None
                if residual is not None and res.reinit_seed is None and run.value_format != "fp32":
                    target, leftover = add_residual(target, residual, res.mask)  # error feedback
                sent, deployed, residual, parts = encoded_size(
                    res.diff_base, target, run.value_format
                )
                for part in ("header", "table", "indices", "values", "dense", "checksum"):
                    breakdown[part] = breakdown.get(part, 0) + parts[part]
                if leftover is not None:
                    residual = {n_: residual[n_] + leftover[n_] for n_ in residual}
                sent += SEED_BYTES if res.reinit_seed is not None else 0
        n_at_last_init = n if r == 1 else res.next_n_at_last_init(n_at_last_init)
        model.load_state_dict(deployed)
        test_acc = top1_accuracy(model, xt, yt)
        rounds.append({
            "round": r, "n_train": n, "test_accuracy": test_acc, "val_accuracy": res.val_accuracy,
            "shipped": not res.skipped, "reinit": res.reinit_seed is not None,
            "reinit_attempted": res.reinit_attempted, "bytes": sent, "nnz": 0 if res.skipped else res.nnz,
            "k_effective": res.k_effective,
            "paper_bytes": 0.0 if res.skipped else paper_bytes(res, run, dense_bytes(deployed, res.partial_names)),
        })  # fmt: skip
        print(f"  {run.name:>16} round {r:3d}/{setting['rounds']}: |D|={n:5d} test={test_acc:.4f} "
              f"{'ship' if not res.skipped else 'skip'} {sent:>9d} B"
              f"{' reinit' if res.reinit_seed is not None else ''}", flush=True)  # fmt: skip
    return {**asdict(run), "rounds": rounds, "seconds": time.perf_counter() - t0,
            "full_model_bytes": full_bytes, "num_partial": res.num_partial,
            "codec_breakdown": breakdown}  # fmt: skip


def paper_bytes(res, run: Run, dense: int) -> dict:
    """§5.5 accounting S_w*k*I + H(k)*I (partial weights only, as in Table 5.2) and with the
    dense tensors added at fp32."""
    bits = 32 if run.method == "full" or run.value_format == "fp32" else 8
    k = 1.0 if run.method == "full" else res.k_effective
    weights = ideal_paper_bits(k, res.num_partial, bits) / 8
    return {"weights_only": weights, "with_dense": weights + dense}


def summarise(results: dict, setting: dict) -> dict:
    ref = results.get("full-scratch")
    warm = results.get("full-warm")
    summary = {}
    for name, res in results.items():
        acc = np.array([r["test_accuracy"] for r in res["rounds"]])
        total = sum(r["bytes"] for r in res["rounds"])
        denom = setting["rounds"] * res["full_model_bytes"]
        ideal = sum(r["paper_bytes"]["weights_only"] for r in res["rounds"] if r["shipped"])
        ideal_dense = sum(r["paper_bytes"]["with_dense"] for r in res["rounds"] if r["shipped"])
        entry = {
            "average_accuracy": float(acc.mean()),
            "final_accuracy": float(acc[-1]),
            "bytes_total": int(total),
            "ratio_to_full_model_every_round": total / denom,
            "paper_ratio_weights_only": ideal / denom,
            "paper_ratio_with_dense": ideal_dense / denom,
            "shipped_rounds": sum(r["shipped"] for r in res["rounds"]),
            "reinit_rounds": sum(r["reinit"] for r in res["rounds"]),
            "seconds": res["seconds"],
        }
        for label, base in (("full_scratch", ref), ("full_warm", warm)):
            if base is not None:
                b = np.array([r["test_accuracy"] for r in base["rounds"]])
                entry[f"avg_accuracy_diff_vs_{label}"] = float((acc - b).mean())
                b_bytes = sum(r["bytes"] for r in base["rounds"])
                entry[f"bytes_ratio_vs_{label}"] = total / b_bytes if b_bytes else math.nan
        summary[name] = entry
    return summary


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_bytes) = plt.subplots(1, 2, figsize=(13, 5))
    for name, res in results.items():
        rounds = [r["round"] for r in res["rounds"]]
        style = "-" if res["method"] in ("dpu", "full") else "--"
        ax_acc.plot(rounds, [r["test_accuracy"] for r in res["rounds"]], style, label=name)
        cum = np.cumsum([r["bytes"] for r in res["rounds"]]) / 1e6
        ax_bytes.plot(rounds, cum, style, label=name)
    ax_acc.set(xlabel="round", ylabel="test accuracy", title="Fashion-MNIST MLP, multi-round")
    ax_bytes.set(xlabel="round", ylabel="cumulative MB shipped per device", yscale="log")
    ax_acc.legend(fontsize=7, ncol=2)
    ax_acc.grid(alpha=0.3)
    ax_bytes.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(summary: dict) -> None:
    print(f"\n{'run':>16} {'avg acc':>8} {'final':>7} {'d vs FU':>8} {'d vs FUw':>8} "
          f"{'bytes/full':>10} {'paper':>8} {'paper+dense':>11} {'ship':>4} {'reinit':>6}")  # fmt: skip
    for name, s in summary.items():
        print(f"{name:>16} {s['average_accuracy']:8.4f} {s['final_accuracy']:7.4f} "
              f"{s.get('avg_accuracy_diff_vs_full_scratch', math.nan):+8.4f} "
              f"{s.get('avg_accuracy_diff_vs_full_warm', math.nan):+8.4f} "
              f"{s['ratio_to_full_model_every_round']:10.5f} {s['paper_ratio_weights_only']:8.5f} "
              f"{s['paper_ratio_with_dense']:11.5f} {s['shipped_rounds']:4d} {s['reinit_rounds']:6d}")  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="smoke-test setting (< 1 min CPU)")
    preset.add_argument("--medium", action="store_true", help="a few minutes on CPU")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--rounds", type=int, help="override R")
    p.add_argument("--initial", type=int, help="override |D^1|")
    p.add_argument("--per-round", type=int, help="override |dD^r|")
    p.add_argument("--epochs", type=int, help="override epochs per step")
    p.add_argument("--ks", type=str, help="comma-separated updating ratios")
    p.add_argument("--methods", default="dpu,dpu-int8,gcpu,rpu,magnitude",
                   help="partial methods to run (full updating always runs)")  # fmt: skip
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/dpu_multiround.json")
    p.add_argument("--fresh", action="store_true", help="ignore runs already in --out")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    name = "quick" if args.quick else "medium" if args.medium else "full"
    setting = dict(PRESETS[name])
    for key in ("rounds", "initial", "per_round", "epochs"):
        if getattr(args, key) is not None:
            setting[key] = getattr(args, key)
    if args.ks:
        setting["ks"] = tuple(float(k) for k in args.ks.split(","))
    methods = tuple(m.strip() for m in args.methods.split(","))
    config = DPUConfig(epochs=setting["epochs"], batch_size=128, lr=args.lr, optimizer="adam",
                       lr_milestones=(1 / 3, 2 / 3), lr_gamma=0.1, init_seed=args.seed)  # fmt: skip
    meta = {"preset": name, "setting": {**setting, "ks": list(setting["ks"])},
            "config": asdict(config), "seed": args.seed, "device": args.device,
            "torch": torch.__version__}  # fmt: skip
    key = json.dumps({k: meta[k] for k in ("setting", "config", "seed")}, sort_keys=True)

    results: dict = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.exists() and not args.fresh:
        old = json.loads(args.out.read_text())
        if old.get("key") == key:
            results = old.get("runs", {})
            print(f"resuming: {len(results)} runs already in {args.out}")
    data = load_data(setting, args.seed)
    print(f"setting {name}: {setting}; device {args.device}")
    for run in plan_runs(setting["ks"], methods):
        if run.name in results:
            continue
        print(f"run {run.name}", flush=True)
        results[run.name] = run_one(run, setting, data, config, args.device, args.seed)
        summary = summarise(results, setting)
        args.out.write_text(json.dumps({"key": key, "meta": meta, "summary": summary,
                                        "runs": results}, indent=1))  # fmt: skip
    summary = summarise(results, setting)
    args.out.write_text(
        json.dumps({"key": key, "meta": meta, "summary": summary, "runs": results}, indent=1)
    )
    plot(results, args.out.with_suffix(".png"))
    print_table(summary)
    print(f"\nsaved {args.out} and {args.out.with_suffix('.png')}")
    return summary


if __name__ == "__main__":
    main()
