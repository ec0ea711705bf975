"""Benchmark of the sparse weight-diff codec (shared.codec, docs/diff-format.md).

Measures, for DPU-style diffs (thesis Alg. 5.1: keep the k*I largest |w_f - w|, rewind the
rest) of a real MLP (784-512-512-10 on the default Fashion-MNIST; --dataset takes any dataset
the agent takes: a name, an .npz or a folder of class sub-folders), and for uniformly random
masks on single 784x512 / 512x512 tensors:

* index bits vs the Shannon bound H(k)*I, and the alternatives we did not pick
  (Rice, Elias-Fano, raw bitmap, bitmap+zstd);
* total bytes (header, table, indices, values, dense tensors, checksum: everything) vs the
  thesis's accounting S_w*k*I + H(k)*I (Sec. 5.5, S_w = 32), vs zstd of the dense fp32
  diff, vs bitmap+zstd, and vs NNCodec (DeepCABAC) when ``--nncodec-path`` points at it;
* encode / decode throughput (MB of dense fp32 model per second) and decode latency of a
  0.5M-weight layer at k = 0.01.

Run:  .venv/bin/python bench/codec.py [--quick] [--dataset NAME|FILE.npz|DIR] [--nncodec-path DIR]
Writes bench/results/codec.json and bench/results/codec.png (--out moves both).
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import math
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
import zstandard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_data import add_dataset_argument, load_bench_dataset, require_split  # noqa: E402
from shared.codec import (  # noqa: E402
    VALUE_FORMATS,
    binary_entropy,
    decode_diff,
    encode_update,
    ideal_paper_bits,
    make_update,
    read_header,
    size_breakdown,
)
from shared.codec.golomb import best_parameter, golomb_cost  # noqa: E402
from shared.data import Dataset  # noqa: E402
from shared.models import ArchSpec, default_spec, model_hash  # noqa: E402

KS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.2)
TARGET_INDEX, TARGET_FP32, TARGET_INT8 = 1.05, 1.1, 0.5
RESULTS = Path(__file__).resolve().parent / "results"
ZSTD = zstandard.ZstdCompressor(level=19)
TRAIN_SAMPLES = {"quick": 20_000, "full": 60_000}  # at most; half trains the base model


# ----------------------------------------------------------------------------- diffs


def mlp_spec(ds: Dataset) -> ArchSpec:
    return default_spec("mlp", ds.input_shape, ds.num_classes)


def mlp_name(ds: Dataset) -> str:
    """e.g. "MLP 784-512-512-10" for the default Fashion-MNIST spec."""
    spec = mlp_spec(ds)
    return "MLP " + "-".join(map(str, (math.prod(spec.input_shape), *spec.hidden, spec.num_classes)))


def training_samples(ds: Dataset, requested: int | None, quick: bool) -> int:
    """How many training samples the MLP pair uses: --train-samples exactly (exit 2 when the
    train split is smaller), else the mode's default capped at the split's size."""
    n_train = len(ds.y_train)
    fix = "lower --train-samples or use a dataset with more training samples"
    if requested is not None:
        require_split(ds, "train", n_train, requested, f"--train-samples {requested}", fix)
    # Both the base (first half) and the retrained model (all) need samples to train on.
    require_split(ds, "train", n_train, 2, "training the base and the retrained MLP", fix)
    require_split(ds, "test", len(ds.y_test), 1, "scoring the MLP")
    n = requested if requested is not None else TRAIN_SAMPLES["quick" if quick else "full"]
    return min(n, n_train)


def train_pair(ds: Dataset, n: int, quick: bool, seed: int = 0) -> tuple[dict, dict]:
    """(base, retrained): an MLP trained on the first half of ``n`` training samples, then
    retrained on all ``n``, as a server would before a DPU round."""
    from shared.models import build_model, init_weights_from_seed
    from shared.tensors import clone_state
    from shared.training import TrainConfig, train_supervised

    half = n // 2
    model = init_weights_from_seed(build_model(mlp_spec(ds)), seed)
    train_supervised(
        model,
        ds.x_train[:half],
        ds.y_train[:half],
        TrainConfig(epochs=1 if quick else 3, batch_size=128, seed=seed),
    )
    base = clone_state(model.state_dict())
    train_supervised(
        model, ds.x_train[:n], ds.y_train[:n], TrainConfig(epochs=1, batch_size=128, seed=seed + 1)
    )
    return base, clone_state(model.state_dict())


def dpu_target(base: dict, retrained: dict, k: float) -> dict:
    """Alg. 5.1: the k*I weights with the largest (w_f - w)^2 take w_f, all others rewind."""
    delta = {n: retrained[n] - base[n] for n in base}
    flat = torch.cat([d.flatten().abs() for d in delta.values()])
    count = max(1, round(k * flat.numel()))
    thr = flat.topk(count).values[-1]
    return {n: torch.where(delta[n].abs() >= thr, retrained[n], base[n]) for n in base}


def synthetic_pair(shape: tuple[int, int], k: float, seed: int = 0) -> tuple[dict, dict]:
    """One tensor; the top-k of an i.i.d. Gaussian change (a uniformly random mask)."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.rand(shape, generator=gen) * 2 - 1) / math.sqrt(shape[1])
    delta = torch.randn(shape, generator=gen) * 1e-3
    thr = delta.abs().flatten().topk(round(k * w.numel())).values[-1]
    return {"net.1.weight": w}, {"net.1.weight": torch.where(delta.abs() >= thr, w + delta, w)}


def changed_mask(base: dict, target: dict) -> dict[str, np.ndarray]:
    return {n: (base[n] != target[n]).flatten().numpy() for n in base}


# ----------------------------------------------------------------------------- index coders


def elias_fano_bits(n: int, universe: int) -> int:
    low = max(0, int(math.floor(math.log2(universe / n)))) if n else 0
    return n * low + n + (universe >> low) + 1 if n else 0


def index_coders(mask: np.ndarray) -> dict[str, float]:
    """Bits of each candidate index coding of one mask, divided by H(k)*I."""
    n, size = int(mask.sum()), mask.size
    bound = binary_entropy(n / size) * size
    gaps = np.diff(np.flatnonzero(mask), prepend=-1) - 1
    rice = min(golomb_cost(gaps, 1 << j) for j in range(0, 24))
    return {
        "golomb": golomb_cost(gaps, best_parameter(gaps)) / bound,
        "rice": rice / bound,
        "elias_fano": elias_fano_bits(n, size) / bound,
        "bitmap": size / bound,
        "bitmap_zstd": 8 * len(ZSTD.compress(np.packbits(mask).tobytes())) / bound,
    }


# ----------------------------------------------------------------------------- measurements


def _best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


# The model hash covers an architecture spec; the codec hashes the one it is given and never
# builds the model, so the synthetic tensors measured here need not fit it.
HASH_ARCH = default_spec("mlp", (1, 28, 28), 10)


def measure(base: dict, target: dict, value_format: str, repeats: int) -> dict:
    num = sum(t.numel() for t in base.values())
    base_hash = model_hash(HASH_ARCH, base)
    t_make, update = _best_time(lambda: make_update(base, target, value_format, arch=HASH_ARCH), repeats)
    t_enc, blob = _best_time(lambda: encode_update(update, base_hash), repeats)
    t_dec, out = _best_time(lambda: decode_diff(blob, base, base_arch=HASH_ARCH), repeats)
    assert out.model_hash == update.target_hash
    sizes = size_breakdown(blob)
    k = update.density
    per_tensor_bound = sum(
        binary_entropy(t.nnz / math.prod(t.shape)) * math.prod(t.shape)
        for t in read_header(blob).tensors
        if t.layout == "sparse"
    )
    changed = [(target[n] - base[n]).flatten() for n in base]
    got = [(update.target[n] - base[n]).flatten() for n in base]
    sel = torch.cat(changed) != 0
    err = (torch.cat(got) - torch.cat(changed))[sel]
    mb = 4 * num / 1e6
    return {
        "value_format": value_format,
        "k": k,
        "nnz": update.nnz,
        "num_weights": num,
        "bytes": len(blob),
        "sizes": sizes,
        "bits_per_weight": 8 * len(blob) / num,
        "index_vs_shannon_global": 8 * sizes["indices"] / (binary_entropy(k) * num)
        if 0 < k < 1
        else None,
        "index_vs_shannon_per_tensor": 8 * sizes["indices"] / per_tensor_bound
        if per_tensor_bound
        else None,
        "vs_paper": 8 * len(blob) / ideal_paper_bits(k, num) if k else None,
        "delta_rmse": float(err.double().pow(2).mean().sqrt()) if err.numel() else 0.0,
        "make_s": t_make,
        "encode_s": t_enc,
        "decode_s": t_dec,
        "encode_MBps": mb / t_enc,
        "decode_MBps": mb / t_dec,
        "codings": sorted(
            {f"{t.layout}/{t.index_coding}/{t.value_coding}" for t in read_header(blob).tensors}
        ),
    }


def baselines(base: dict, target: dict) -> dict:
    dense = torch.cat([(target[n].float() - base[n].float()).flatten() for n in base]).numpy()
    mask = np.concatenate(list(changed_mask(base, target).values()))
    values = torch.cat(
        [target[n].flatten()[torch.from_numpy(m)] for n, m in changed_mask(base, target).items()]
    )
    bitmap = len(ZSTD.compress(np.packbits(mask).tobytes()))
    return {
        "dense_fp32_zstd": len(ZSTD.compress(dense.tobytes())),
        "bitmap_zstd_fp32": bitmap
        + min(4 * values.numel(), len(ZSTD.compress(values.numpy().tobytes()))),
        "paper_fp32": ideal_paper_bits(mask.mean(), mask.size) / 8,
        "paper_int8": ideal_paper_bits(mask.mean(), mask.size, 8) / 8,
    }


# ----------------------------------------------------------------------------- NNCodec


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """NNCodec's package __init__ imports its dataset / model-zoo helpers (torchvision,
    OpenCV, h5py, ...), which its tensor coder never calls; `pip install nncodec` would also
    replace this venv's torch and numpy. Benchmark-only shim: empty modules for those names."""

    NAMES = (
        "torchvision",
        "cv2",
        "h5py",
        "ptflops",
        "torchmetrics",
        "lightning_utilities",
        "tensorflow",
        "timm",
        "wandb",
        "pandas",
    )

    def find_spec(self, name, path, target=None):
        root = name.split(".")[0]
        if root in self.NAMES and root not in sys.modules and not self._real(root):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    @staticmethod
    def _real(root: str) -> bool:
        finders = [f for f in sys.meta_path if not isinstance(f, _StubFinder)]
        return any(f.find_spec(root, None) for f in finders if hasattr(f, "find_spec"))

    def create_module(self, spec):
        mod = types.ModuleType(spec.name)
        mod.__path__ = []
        mod.__getattr__ = _module_attr
        return mod

    def exec_module(self, module):
        pass


class _StubMeta(type):
    def __getattr__(cls, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _stub_attr(attr)

    def __call__(cls, *args, **kwargs):
        return _stub_attr("instance")

    def __getitem__(cls, key):
        return _stub_attr("item")


def _stub_attr(name: str):
    return _StubMeta(name, (), {})


def _module_attr(name: str):
    if name.startswith("__"):  # keep inspect / importlib introspection working
        raise AttributeError(name)
    return _stub_attr(name)


def load_nncodec(path: str | None):
    """(nnc module, None) or (None, why not)."""
    if path:
        sys.path.insert(0, path)
    if importlib.util.find_spec("nncodec") is None:
        return None, "nncodec is not importable (pass --nncodec-path; see docs/diff-format.md)"
    sys.meta_path.append(_StubFinder())
    try:
        from nncodec import nnc
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return None, f"nncodec import failed: {type(exc).__name__}: {exc}"
    return nnc, None


def measure_nncodec(
    nnc, base: dict, target: dict, int8_scales: dict[str, float], qp_offset: int = 0
) -> dict:
    """NNCodec on the same sparse deltas, its quantiser step set from our int8 scale per tensor
    (qp = round(4 log2 step) + qp_offset, qp_density 2). Lossy like our int8: RMSE reported."""
    deltas = {n: (target[n].float() - base[n].float()).numpy() for n in base}
    qps = {n: int(round(4 * math.log2(s))) + qp_offset for n, s in int8_scales.items() if s > 0}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        bs = nnc.compress(
            deltas,
            bitstream_path=f"{tmp}/d.nnc",
            qp=-38,
            qp_per_tensor=qps or None,
            return_bitstream=True,
            verbose=False,
        )
        t_enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        dec = nnc.decompress(bytearray(bs), verbose=False)  # it takes a bytearray or a path
        t_dec = time.perf_counter() - t0
    true = np.concatenate([deltas[n].ravel() for n in base])
    got = np.concatenate([np.asarray(dec[n], dtype=np.float32).ravel() for n in base])
    sel = true != 0
    return {
        "qp_offset": qp_offset,
        "bytes": len(bs),
        "delta_rmse": float(np.sqrt(np.mean((got[sel] - true[sel]) ** 2.0))),
        "lost_updates": int(np.sum(sel & (got == 0))),
        "spurious_updates": int(np.sum(~sel & (got != 0))),
        "encode_s": t_enc,
        "decode_s": t_dec,
    }


def nncodec_runs(
    nnc, base: dict, target: dict, int8_scales: dict[str, float], our_rmse: float
) -> dict:
    """Same quantiser step as our int8, and the finest step whose RMSE first matches ours."""
    same = measure_nncodec(nnc, base, target, int8_scales)
    matched = same
    for offset in (-2, -4, -6, -8):
        if matched["delta_rmse"] <= our_rmse:
            break
        matched = measure_nncodec(nnc, base, target, int8_scales, offset)
    return {"same_step": same, "matched_rmse": matched}


# ----------------------------------------------------------------------------- report


def accuracy_of(state: dict, ds: Dataset) -> float:
    from shared.models import build_model
    from shared.training import accuracy

    model = build_model(mlp_spec(ds))
    model.load_state_dict(state)
    return accuracy(model, ds.x_test, ds.y_test)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rows = results["mlp"]
    ks = [r["k"] for r in rows]
    ax = axes[0]
    for fmt in VALUE_FORMATS:
        ax.plot(ks, [r["codec"][fmt]["bits_per_weight"] for r in rows], "o-", label=f"ours, {fmt}")
    num = rows[0]["codec"]["fp32"]["num_weights"]
    for key, style in (
        ("paper_fp32", "k--"),
        ("paper_int8", "k:"),
        ("bitmap_zstd_fp32", "s-"),
        ("dense_fp32_zstd", "x-"),
    ):
        ax.plot(ks, [8 * r["baselines"][key] / num for r in rows], style, label=key)
    if all("nncodec" in r for r in rows):
        for label, style in (("same_step", "d-"), ("matched_rmse", "d--")):
            ax.plot(
                ks,
                [8 * r["nncodec"][label]["bytes"] / num for r in rows],
                style,
                label=f"NNCodec ({label})",
            )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="k (fraction of weights updated)",
        ylabel="bits per weight",
        title=f"{results['mlp_name']} DPU diffs ({results['dataset']})",
    )
    ax.legend(fontsize=7)
    ax = axes[1]
    for name, table in results["index_coders"].items():
        for coder in ("golomb", "rice", "elias_fano", "bitmap_zstd"):
            ax.plot(
                [r["k"] for r in table], [r[coder] for r in table], "o-", label=f"{name} {coder}"
            )
    ax.axhline(TARGET_INDEX, color="r", lw=0.8)
    ax.set(
        xscale="log",
        ylim=(0.95, 1.3),
        xlabel="k",
        ylabel="index bits / (H(k) I)",
        title="index coders, uniform masks",
    )
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="less training, 3 values of k, 1 timing repeat"
    )
    parser.add_argument(
        "--nncodec-path", default=None, help="directory holding the nncodec package"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    add_dataset_argument(parser)
    parser.add_argument(
        "--train-samples", type=int, help="training samples for the MLP pair (default: up to "
        f"{TRAIN_SAMPLES['quick']} with --quick, {TRAIN_SAMPLES['full']} without)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "codec.json", help="JSON path")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds = load_bench_dataset(args.dataset)  # first: a bad dataset exits before any measuring
    n_samples = training_samples(ds, args.train_samples, args.quick)
    ks = (0.001, 0.01, 0.1) if args.quick else KS
    repeats = 1 if args.quick else 3
    nnc, nnc_why = load_nncodec(args.nncodec_path)
    results: dict = {
        "ks": ks,
        "quick": args.quick,
        "nncodec": nnc_why or "used",
        "dataset": ds.name,
        "mlp_name": mlp_name(ds),
        "train_samples": n_samples,
        "targets": {
            "index_vs_shannon": TARGET_INDEX,
            "fp32_vs_paper": TARGET_FP32,
            "int8_vs_paper": TARGET_INT8,
        },
    }

    print("== index coders on uniformly random masks: bits / (H(k) I) ==")
    results["index_coders"] = {}
    for shape in ((512, 784), (512, 512)):
        rng = np.random.default_rng(0)
        table = []
        for k in ks:
            mask = rng.random(shape[0] * shape[1]) < k
            table.append({"k": float(mask.mean()), **index_coders(mask)})
            print(
                f"{shape!s:11} k={k:<6} "
                + " ".join(f"{c}={v:.4f}" for c, v in table[-1].items() if c != "k")
            )
        results["index_coders"][f"{shape[0]}x{shape[1]}"] = table

    print("\n== single tensors, uniform masks (top-k of a Gaussian change) ==")
    print(
        f"{'shape':10} {'k':>6} {'fmt':5} {'bytes':>8} {'idx/H':>7} {'vs paper':>8} "
        f"{'enc MB/s':>9} {'dec MB/s':>9}"
    )
    results["synthetic"] = []
    for shape in ((512, 784), (512, 512)):
        for k in ks:
            base, target = synthetic_pair(shape, k)
            row = {
                "shape": shape,
                "k": k,
                "codec": {f: measure(base, target, f, repeats) for f in VALUE_FORMATS},
                "baselines": baselines(base, target),
            }
            results["synthetic"].append(row)
            for f, m in row["codec"].items():
                print(
                    f"{shape[0]}x{shape[1]:<6} {k:6} {f:5} {m['bytes']:8d} "
                    f"{m['index_vs_shannon_global']:7.4f} "
                    f"{m['vs_paper']:8.3f} {m['encode_MBps']:9.1f} {m['decode_MBps']:9.1f}"
                )

    print("\n== decode latency, 1024x512 layer (0.52M weights), k=0.01 ==")
    base, target = synthetic_pair((1024, 512), 0.01)
    results["latency_0p5M_k0.01"] = {}
    for f in VALUE_FORMATS:
        m = measure(base, target, f, max(3, repeats))
        results["latency_0p5M_k0.01"][f] = {
            "decode_ms": 1e3 * m["decode_s"],
            "encode_ms": 1e3 * m["encode_s"],
        }
        print(
            f"{f:5} decode {1e3 * m['decode_s']:.1f} ms, encode {1e3 * m['encode_s']:.1f} ms "
            f"({m['bytes']} bytes)"
        )

    print(f"\n== {mlp_name(ds)} on {ds.name} ({n_samples} samples), DPU diffs (Alg. 5.1) ==")
    t0 = time.perf_counter()
    base, retrained = train_pair(ds, n_samples, args.quick)
    results["training_s"] = time.perf_counter() - t0
    results["accuracy"] = {"base": accuracy_of(base, ds), "retrained": accuracy_of(retrained, ds)}
    print(
        f"trained in {results['training_s']:.0f} s; "
        f"test accuracy base {results['accuracy']['base']:.4f}, "
        f"retrained {results['accuracy']['retrained']:.4f}"
    )
    if nnc_why:
        print(f"NNCodec: {nnc_why}")
    hdr = (
        f"{'k':>6} {'fmt':5} {'bytes':>8} {'hdr+tab':>7} {'idx':>7} {'values':>7} {'dense':>6} "
        f"{'idx/H':>6} "
        f"{'vs paper':>8} {'acc':>6} {'enc MB/s':>8} {'dec MB/s':>8}"
    )
    print(hdr)
    results["mlp"] = []
    for k in ks:
        target = dpu_target(base, retrained, k)
        row = {"k": k, "codec": {}, "baselines": baselines(base, target)}
        for f in VALUE_FORMATS:
            m = measure(base, target, f, repeats)
            update = make_update(base, target, f, arch=HASH_ARCH)
            m["accuracy"] = accuracy_of(update.target, ds)
            row["codec"][f] = m
            s = m["sizes"]
            print(
                f"{k:6} {f:5} {m['bytes']:8d} {s['header'] + s['table']:7d} "
                f"{s['indices']:7d} {s['values']:7d} "
                f"{s['dense']:6d} {m['index_vs_shannon_per_tensor']:6.3f} {m['vs_paper']:8.3f} "
                f"{m['accuracy']:6.4f} {m['encode_MBps']:8.1f} {m['decode_MBps']:8.1f}"
            )
        b = row["baselines"]
        print(
            f"{'':6} baselines: paper fp32 {b['paper_fp32']:.0f}, "
            f"paper int8 {b['paper_int8']:.0f}, "
            f"bitmap+zstd fp32 {b['bitmap_zstd_fp32']}, dense fp32 diff zstd {b['dense_fp32_zstd']}"
        )
        if nnc is not None:
            update = make_update(base, target, "int8", arch=HASH_ARCH)
            scales = {n: float(d.scale) for n, d in update.deltas.items() if d.scale is not None}
            ours = row["codec"]["int8"]["delta_rmse"]
            try:
                row["nncodec"] = nncodec_runs(nnc, base, target, scales, ours)
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - NNCodec exits on bad input
                row["nncodec_error"] = f"{type(exc).__name__}: {exc}"[:300]
                print(f"{'':6} NNCodec failed: {row['nncodec_error']}")
            else:
                for label, n in row["nncodec"].items():
                    print(
                        f"{'':6} NNCodec ({label}, qp offset {n['qp_offset']}): "
                        f"{n['bytes']} bytes, delta RMSE {n['delta_rmse']:.2e} "
                        f"(ours int8 {row['codec']['int8']['bytes']} bytes, {ours:.2e}), "
                        f"lost {n['lost_updates']}, enc {n['encode_s']:.2f} s, "
                        f"dec {n['decode_s']:.2f} s"
                    )
        results["mlp"].append(row)

    checks = {
        "index<=1.05xH (synthetic)": all(
            m["index_vs_shannon_global"] <= TARGET_INDEX
            for r in results["synthetic"]
            for m in r["codec"].values()
        ),
        "fp32<=1.1x paper (synthetic)": all(
            r["codec"]["fp32"]["vs_paper"] <= TARGET_FP32 for r in results["synthetic"]
        ),
        "int8<=0.5x paper (synthetic)": all(
            r["codec"]["int8"]["vs_paper"] <= TARGET_INT8 for r in results["synthetic"]
        ),
        "fp32<=1.1x paper (MLP)": all(
            r["codec"]["fp32"]["vs_paper"] <= TARGET_FP32 for r in results["mlp"]
        ),
        "int8<=0.5x paper (MLP)": all(
            r["codec"]["int8"]["vs_paper"] <= TARGET_INT8 for r in results["mlp"]
        ),
    }
    results["checks"] = checks
    print("\n== targets ==")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    png = args.out.with_suffix(".png")
    plot(results, png)
    print(f"\nwrote {args.out} and {png}")
    return results


if __name__ == "__main__":
    main()
