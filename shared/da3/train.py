"""Per-domain training and evaluation of DA³ and its baselines (docs/da3.md).

``train_domain`` trains, in place, only the tensors the method may train (the rest get
``requires_grad=False`` for the run and their flags back afterwards, bit-identical), with Adam
and cross-entropy (plus, for DA³, ``sparsity_weight`` times the mean gate density) on the
shared loop (shared/loop.py: seeded batches, divergence checks, progress).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.da3.memory import (
    METHODS,
    SavedTensorsCounter,
    analytic_training_memory,
    check_method,
    trainable_state_bytes,
)
from shared.da3.net import DA3Net, block_shapes
from shared.da3.spec import DA3Error, DA3Refused, section_of
from shared.loop import ProgressFn, run_loop, steps_per_epoch
from shared.models.spec import ArchSpec, conv4_input_shape
from shared.models.zoo import build_model
from shared.tensors import to_model_input

PIGGYBACK_LR_SCALE = 0.1  # Piggyback's scores train at this fraction of the rate


@dataclass(frozen=True)
class DA3TrainConfig:
    method: str = "da3"
    epochs: int = 5
    lr: float = 1e-3  # Adam
    batch: int = 32
    temperature: float | None = None  # Eq. (2)-(3)'s T; None: the spec's
    seed: int = 0  # minibatch order and Gumbel noise
    sparsity_weight: float = 0.0  # DA³: weight of the gate density penalty in the loss
    weight_decay: float = 0.0
    # DA³ gate schedules (docs/da3.md, "The gate's training"): beta (Eq. 1) and T (Eq. 2-3)
    # move geometrically from the spec's value to these over the run (None: constant), and
    # with a density target the penalty is the mean over blocks of max(0, density - target)^2
    # (None: the mean density itself).
    beta_final: float | None = None
    temperature_final: float | None = None
    density_target: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise DA3Error(f"unknown method {self.method!r}; expected one of {METHODS}")
        if self.epochs < 1 or self.batch < 1 or not self.lr > 0 or self.weight_decay < 0:
            raise DA3Error(f"invalid training config {self}")
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature > 0):
            raise DA3Error(f"temperature must be a positive number, got {self.temperature}")
        if not (math.isfinite(self.sparsity_weight) and self.sparsity_weight >= 0):
            raise DA3Error(f"sparsity_weight must be >= 0, got {self.sparsity_weight}")
        for name in ("beta_final", "temperature_final"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and 0 < v <= 100):
                raise DA3Error(f"{name} must lie in (0, 100], got {v}")
        if self.density_target is not None and not 0 <= self.density_target < 1:
            raise DA3Error(f"density_target must lie in [0, 1), got {self.density_target}")
        if not 0 <= self.seed < 1 << 63:
            raise DA3Error(f"seed must lie in [0, 2**63), got {self.seed}")


def _arch(model: nn.Module) -> ArchSpec:
    arch = getattr(model, "arch_spec", None)
    if not isinstance(model, DA3Net) or not isinstance(arch, ArchSpec):
        raise DA3Error("expected a DA³ model built by build_model(da3_spec(...))")
    return arch


def _bn_bias_names(model: nn.Module) -> list[str]:
    return [f"{name}.bias" for name, mod in model.named_modules()
            if isinstance(mod, nn.BatchNorm2d) and not name.startswith("da3")]  # fmt: skip


def trainable_names(model: nn.Module, method: str) -> list[str]:
    """Parameter names ``method`` trains: the adaptor's (``da3.*``), the head's, and for
    bias-only / TinyTL the backbone's BatchNorm biases; fine-tuning trains all of them."""
    names = [n for n, _ in model.named_parameters()]
    if method == "finetune":
        return names
    keep = {n for n in names if n.startswith(("da3.", "head."))}
    if method in ("bias", "tinytl"):
        keep |= set(_bn_bias_names(model))
    return [n for n in names if n in keep]


def adaptor_tensor_names(spec: ArchSpec, method: str | None = None) -> list[str]:
    """The state-dict entries a domain owns: what ``method`` trains (default: the method the
    spec's adaptor belongs to; ``"finetune"`` for a spec without adaptor); the rest is the
    frozen backbone. For DA³: ``da3.*`` plus ``head.weight``, ``head.bias``."""
    adaptor = section_of(spec).adaptor
    method = method or (adaptor if adaptor != "none" else "finetune")
    check_method(spec, method)
    with torch.device("meta"):
        model = build_model(spec)
    return sorted(trainable_names(model, method))


def trainable_parameter_count(spec: ArchSpec, method: str) -> int:
    check_method(spec, method)
    with torch.device("meta"):
        model = build_model(spec)
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in trainable_names(model, method))


def resize_images(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 images ``(N, C, h, w)`` or ``(N, h, w)`` stretched (bilinear) to ``size``, as
    uint8 ``(N, C, H, W)``: how 8x8 digits and 16x15 UCI pixels enter a 28x28 backbone."""
    arr = np.asarray(x)
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4):
        raise DA3Error(f"expected uint8 images (N, C, H, W) or (N, H, W), got {arr.dtype} {arr.shape}")
    if arr.ndim == 3:
        arr = arr[:, None]
    if tuple(arr.shape[-2:]) == tuple(size):
        return np.ascontiguousarray(arr)
    t = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32)
    out = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8).numpy()


def _check_data(arch: ArchSpec, x: np.ndarray, y: np.ndarray) -> None:
    c, h, w = conv4_input_shape(arch)
    shape = tuple(np.shape(x))[1:]
    if len(x) == 0:
        raise DA3Error("cannot train or evaluate on an empty dataset")
    if shape not in ((c, h, w),) + (((h, w),) if c == 1 else ()):
        raise DA3Error(f"inputs of shape {shape} do not fit the model's {(c, h, w)}; resize them "
                       "first (shared.da3.resize_images)")  # fmt: skip
    yy = np.asarray(y)
    if yy.ndim != 1 or len(yy) != len(x) or not np.issubdtype(yy.dtype, np.integer):
        raise DA3Error(f"labels must be {len(x)} integers, got {yy.dtype} {yy.shape}")
    if yy.min() < 0 or yy.max() >= arch.num_classes:
        raise DA3Error(f"labels must lie in [0, {arch.num_classes}), got [{yy.min()}, {yy.max()}]")


def geometric_schedule(start: float, end: float | None, step: int, steps: int) -> float:
    """``start`` at step 0 to ``end`` at the last step, geometrically (``end`` None: constant)."""
    if end is None or steps <= 1:
        return start if end is None else end
    return start * (end / start) ** (min(step, steps - 1) / (steps - 1))


def density_penalty(densities: list[torch.Tensor], target: float | None) -> torch.Tensor:
    """The gate term (before its weight): the mean training-mask density over blocks, or with
    a target the mean of ``max(0, d_b - target)^2`` (only blocks above the target pay)."""
    d = torch.stack(densities)
    return d.mean() if target is None else torch.relu(d - target).square().mean()


def train_domain(model: nn.Module, x: np.ndarray, y: np.ndarray, config: DA3TrainConfig,
                 progress: ProgressFn | None = None) -> dict[str, float]:
    """Train ``model`` in place on one domain with ``config.method`` (only its tensors).

    Returns ``train_loss`` (last epoch), ``seconds``, ``seconds_per_epoch``, ``saved_bytes``
    (peak bytes saved for the backward in a step, measured), ``analytic_bytes`` (Table 1
    definition), ``trainable_params``, ``gate_density`` (DA³: mean training mask density of the
    last step, else 1.0), ``steps``."""
    arch = _arch(model)
    check_method(arch, config.method)
    _check_data(arch, x, y)
    assert isinstance(model, DA3Net)
    names = set(trainable_names(model, config.method))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
        if n in names:
            params.append(p)
    section = section_of(arch)
    t0 = config.temperature if config.temperature is not None else section.temperature
    model.temperature, model.beta = t0, section.beta
    model.generator = torch.Generator().manual_seed(config.seed)
    counter = SavedTensorsCounter(model)
    y_t = torch.as_tensor(np.asarray(y), dtype=torch.long)
    density = [1.0]

    def fetch(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return to_model_input(x[idx]), y_t[idx]

    steps = config.epochs * steps_per_epoch(len(x), config.batch)
    step = [0]

    def loss_fn(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        model.beta = geometric_schedule(section.beta, config.beta_final, step[0], steps)
        model.temperature = geometric_schedule(t0, config.temperature_final, step[0], steps)
        step[0] += 1
        with counter.step():
            loss = F.cross_entropy(m(xb), yb)
            if model.densities:
                density[0] = float(torch.stack(model.densities).mean().detach())
                if config.sparsity_weight > 0:
                    loss = loss + config.sparsity_weight * density_penalty(model.densities, config.density_target)
        return loss

    # Piggyback's real-valued mask scores sit 5e-3 above their threshold; they train at a tenth
    # of the rate (Mallya et al. 2018: 1e-4 for masks, 1e-3 for the classifier), else the
    # first Adam steps flip masks at random.
    scores = [p for n, p in model.named_parameters() if n in names and n.startswith("da3.scores.")]
    rest = [p for n, p in model.named_parameters() if n in names and not n.startswith("da3.scores.")]
    groups = [{"params": rest}] + ([{"params": scores, "lr": config.lr * PIGGYBACK_LR_SCALE}] if scores else [])
    opt = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    start = time.perf_counter()
    try:
        out = run_loop(model, opt, loss_fn, fetch, len(x), batch_size=config.batch, num_steps=steps,
                       rng=np.random.Generator(np.random.PCG64(config.seed)), progress=progress,
                       context=f"DA³ domain training ({config.method})")  # fmt: skip
    finally:
        seconds = time.perf_counter() - start
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.generator = None
        model.beta = section.beta
        model.eval()
    return {
        "train_loss": out.epoch_loss,
        "seconds": seconds,
        "seconds_per_epoch": seconds / config.epochs,
        "saved_bytes": float(counter.peak),
        "analytic_bytes": float(analytic_training_memory(arch, config.method, min(config.batch, len(x)))),
        "trainable_params": float(sum(p.numel() for p in params)),
        "gate_density": density[0],
        "steps": float(steps),
    }


def _method_of(arch: ArchSpec) -> str:
    adaptor = section_of(arch).adaptor
    return adaptor if adaptor != "none" else "finetune"


def model_flops(arch: ArchSpec) -> dict[str, float]:
    """Per-sample inference FLOPs (2 per multiply-accumulate; convs, linear layers, the
    adaptor and the gate's conv) with the adaptor dense: ``backbone``, ``adaptor``, ``gate``."""
    section = section_of(arch)
    c0, h0, w0 = conv4_input_shape(arch)
    backbone = 9 * c0 * arch.channels[0] * h0 * w0 + arch.channels[-1] * arch.num_classes
    adaptor = gate = 0
    for b in block_shapes(arch):
        p = b.h_out * b.w_out
        backbone += 9 * b.c_in * b.c_out * p + 9 * b.c_out * b.c_out * p + (b.c_in * b.c_out * p if b.projection else 0)
        if section.adaptor == "da3":
            adaptor += b.c_in * b.c_out * section.correction_kernel**2 * p
            gate += 2 * section.gate_kernel**2 * p if section.gate else 0
        elif section.adaptor == "tinytl":
            pp = (b.h_in // 2) * (b.w_in // 2) if min(b.h_in, b.w_in) >= 2 else b.h_in * b.w_in
            groups = max(1, b.c_in // section.lite_groups_width)
            while b.c_in % groups:
                groups -= 1
            adaptor += pp * (9 * b.c_in * b.c_in // groups + b.c_in * b.c_out)
        elif section.adaptor == "series":
            adaptor += 2 * b.c_out * b.c_out * p
        elif section.adaptor == "parallel":
            adaptor += b.c_in * b.c_out * p + b.c_out * b.c_out * p
    return {"backbone": 2.0 * backbone, "adaptor": 2.0 * adaptor, "gate": 2.0 * gate}


@torch.no_grad()
def evaluate_domain(model: nn.Module, x: np.ndarray, y: np.ndarray, *, gated: bool = True,
                    batch: int = 256) -> dict[str, float]:
    """Accuracy on ``(x, y)``; ``gated=False`` applies the DA³ correction at every position.
    ``gate_sparsity``: the fraction of the adaptor's FLOPs the gate skipped; ``flops`` and
    ``flops_dense``: per-sample inference FLOPs with the gate (backbone + gate + the
    adaptor's active positions) and without it (backbone + dense adaptor)."""
    arch = _arch(model)
    _check_data(arch, x, y)
    assert isinstance(model, DA3Net)
    was_training = model.training
    model.eval()
    model.dense = not gated
    model.reset_stats()
    correct = 0
    try:
        for i in range(0, len(x), batch):
            logits = model(to_model_input(x[i : i + batch]))
            correct += int((logits.argmax(1).numpy() == np.asarray(y[i : i + batch])).sum())
    finally:
        model.dense = False
        model.train(was_training)
    costs = model_flops(arch)
    skipped = 0.0
    section = section_of(arch)
    adaptor = costs["adaptor"]
    gate = costs["gate"] if gated else 0.0
    if section.adaptor == "da3":
        per_block = [2.0 * b.c_in * b.c_out * section.correction_kernel**2 for b in block_shapes(arch)]
        done = sum(w * a for w, a in zip(per_block, model.stats.active, strict=True)) / len(x)
        full = sum(w * p for w, p in zip(per_block, model.stats.positions, strict=True)) / len(x)
        skipped = 1.0 - done / full if full else 0.0
        adaptor = done
    return {
        "accuracy": correct / len(x),
        "gate_sparsity": skipped,
        "flops": costs["backbone"] + gate + adaptor,
        "flops_dense": costs["backbone"] + costs["adaptor"],
        "adaptor_flops": adaptor,
        "adaptor_flops_dense": costs["adaptor"],
    }


def plan_training(spec: ArchSpec, memory_budget_bytes: int | None, *, batch: int,
                  method: str | None = None) -> int:
    """The largest batch ``<= batch`` whose training memory fits the budget: analytic
    activation memory (:func:`analytic_training_memory`) plus gradient and Adam state of the
    trainable parameters. ``None``: no budget (``batch``). Raises :class:`DA3Refused` when not
    even one sample fits, :class:`DA3Error` for bad input. ``method`` defaults to the spec's
    adaptor's (``finetune`` for a spec without adaptor)."""
    method = method or _method_of(spec)
    check_method(spec, method)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise DA3Error(f"batch must be a positive integer, got {batch!r}")
    if memory_budget_bytes is None:
        return batch
    if isinstance(memory_budget_bytes, bool) or not isinstance(memory_budget_bytes, int) or memory_budget_bytes < 0:
        raise DA3Error(f"memory budget must be a non-negative integer of bytes, got {memory_budget_bytes!r}")
    state = trainable_state_bytes(trainable_parameter_count(spec, method))

    def need(b: int) -> int:
        return analytic_training_memory(spec, method, b) + state

    if need(1) > memory_budget_bytes:
        raise DA3Refused(
            f"{method} training needs {need(1)} bytes at batch 1 ({state} for gradients and "
            f"optimizer state), above the budget of {memory_budget_bytes} bytes"
        )
    lo, hi = 1, batch  # need() grows with the batch
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need(mid) <= memory_budget_bytes else (lo, mid - 1)
    return lo

