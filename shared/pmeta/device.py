"""On-device few-shot learning (Eq. 4.3 with α and γ; §4.4.2.2, §4.4.3.2, §4.4.5).

``adapt`` runs K steps ``w_l <- w_l - α_l^k γ_l ⊙ g(w_l)`` on a copy of the model's tensors,
each step accumulating the gradient over the support set in batches of ``sample_batch``
samples (one by default, §4.6.1). Only layers with α_l^k > 0 get a weight gradient, only
their kept input channels are stored (shared/pmeta/ops.py), and a
``torch.autograd.graph.saved_tensors_hooks`` counter measures the bytes actually saved for
backward, which the result reports beside the analytic peak of Eq. 4.19.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from shared.pmeta.errors import PMetaError, PMetaRefused
from shared.pmeta.family import arch_of, pmeta_module
from shared.pmeta.memory import adaptation_flops, adaptation_memory
from shared.pmeta.ops import LayerStats, ReluMaxPool, SparseConv, SparseGroupNorm, SparseLinear
from shared.pmeta.spec import Layer, PMetaSpec, backbone_layers, pmeta_section


@dataclass(frozen=True)
class AdaptConfig:
    sample_batch: int = 1  # samples per gradient-accumulation batch (§4.4.5.1)
    rho_fw: float | None = None  # forward clip ratio of Alg. 4.1; None: the spec's
    steps: int | None = None  # inner steps; None: the spec's K

    def __post_init__(self) -> None:
        if isinstance(self.sample_batch, bool) or not isinstance(self.sample_batch, int) or self.sample_batch < 1:
            raise PMetaError(f"sample_batch must be a positive integer, got {self.sample_batch!r}")
        if self.rho_fw is not None and not (isinstance(self.rho_fw, (int, float)) and 0.0 <= self.rho_fw <= 1.0):
            raise PMetaError(f"rho_fw must lie in [0, 1], got {self.rho_fw!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1):
            raise PMetaError(f"steps must be a positive integer, got {self.steps!r}")


@dataclass(frozen=True)
class AdaptResult:
    state: dict[str, torch.Tensor]  # the adapted tensors only (layers that stepped)
    saved_bytes: int  # measured: peak bytes saved for backward over accumulation batches
    analytic_bytes: int  # Eq. 4.19 (+ norm state) at the measured peak's batch
    seconds: float
    steps: int
    analytic: dict[str, int] = field(default_factory=dict)  # its terms (shared/pmeta/memory.py)
    predicted_saved_bytes: int = 0  # the analytic counterpart of saved_bytes
    flops: int = 0  # Eq. 4.21 over all steps and samples (multiply-accumulates)
    mu_fw: dict[int, float] = field(default_factory=dict)  # mean kept input-channel fraction per stepping layer


class SavedBytesCounter:
    """Counts the bytes of distinct storages saved for backward, leaving out the model's own
    tensors (weights kept for input gradients are static memory, not activations)."""

    def __init__(self, exclude: list[torch.Tensor]) -> None:
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: set[int] = set()
        self.current = 0
        self.peak = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._exclude and ptr not in self._seen:
            self._seen.add(ptr)
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        return t

    def __enter__(self) -> SavedBytesCounter:
        self._seen.clear()
        self.current = 0
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def _model_parts(model: nn.Module) -> tuple[PMetaSpec, list[Layer]]:
    arch = arch_of(model)
    return pmeta_section(arch), backbone_layers(arch)


def _forward(layers: list[Layer], w: dict[str, torch.Tensor], x: torch.Tensor, att: dict[int, tuple],
             rho_fw: float, rho_bw: float, stats: LayerStats) -> torch.Tensor:  # fmt: skip
    h = x.unsqueeze(1) if x.dim() == 3 else x
    for layer in layers:
        weight, bias = (w[n] for n in layer.param_names)
        fw, bw = att.get(layer.index, (None, None))
        if layer.kind == "conv":
            h = SparseConv.apply(h, weight, bias, layer.index, fw, bw, rho_fw, rho_bw, stats)
        elif layer.kind == "norm":
            h = SparseGroupNorm.apply(h, weight, bias, layer.index, layer.groups, fw, bw, rho_fw, rho_bw, stats)
            h = ReluMaxPool.apply(h)
        else:
            h = SparseLinear.apply(h.flatten(1), weight, bias)
    return h


def _check_support(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    arch = arch_of(model)
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise PMetaError("support_x and support_y must be tensors (see shared.data.tasks.to_model_input)")
    if x.dtype != torch.float32 or tuple(x.shape[1:]) not in (tuple(arch.input_shape), (1, *arch.input_shape),
                                                               tuple(arch.input_shape[-2:])):  # fmt: skip
        raise PMetaError(f"support_x must be float32 of shape (n, {arch.input_shape}), got {x.dtype} {tuple(x.shape)}")
    if y.dim() != 1 or len(y) != len(x) or len(x) == 0:
        raise PMetaError(f"support_y must be a vector of {len(x)} labels, got shape {tuple(y.shape)}")
    if y.dtype not in (torch.int64, torch.int32) or int(y.min()) < 0 or int(y.max()) >= arch.num_classes:
        raise PMetaError(f"support labels must be integers in [0, {arch.num_classes})")
    if not torch.isfinite(x).all():
        raise PMetaError("support_x contains NaN or infinity")


def adapt(model: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor,
          config: AdaptConfig | None = None) -> AdaptResult:  # fmt: skip
    """Few-shot learn the support set on a copy of ``model``'s tensors; ``model`` is untouched."""
    config = config or AdaptConfig()
    spec, layers = _model_parts(model)
    _check_support(model, support_x, support_y)
    pm = pmeta_module(model)
    alpha = pm.alpha.detach().clone()
    steps = config.steps or spec.inner_steps
    if steps > alpha.shape[1]:
        raise PMetaError(f"the model learned step sizes for {alpha.shape[1]} steps, {steps} requested")
    rho_fw = spec.rho_fw if config.rho_fw is None else float(config.rho_fw)
    named = dict(model.named_parameters())
    params = {n: named[n].detach().clone() for layer in layers for n in layer.param_names}
    att = {}
    if spec.attention:
        for key, mods in pm.att.items():
            fw, bw = mods.get_submodule("fw"), mods.get_submodule("bw")
            att[int(key)] = tuple((m.weight.detach(), m.bias.detach()) for m in (fw, bw) if isinstance(m, nn.Linear))
    y = support_y.long()
    n = len(support_x)
    start = time.perf_counter()
    peak_saved = 0
    best: dict[str, int] = {}
    flops = 0
    mu_sum: dict[int, float] = {}
    mu_count: dict[int, int] = {}
    stepped: set[str] = set()
    with torch.no_grad():
        for k in range(steps):
            active = [bool(alpha[layer.index, k] > 0) for layer in layers]
            if not any(active):
                continue
            leaves = {name: (t.detach().requires_grad_(True) if active[layer.index] else t)
                      for layer in layers for name, t in zip(layer.param_names, (params[m] for m in layer.param_names), strict=True)}  # fmt: skip
            wanted = [name for layer in layers if active[layer.index] for name in layer.param_names]
            acc = {name: torch.zeros_like(params[name]) for name in wanted}
            step_att = {i: a for i, a in att.items() if active[i]}
            counter = SavedBytesCounter(list(params.values()))
            for lo in range(0, n, config.sample_batch):
                xb = support_x[lo : lo + config.sample_batch].clone()  # own storage: counted exactly
                stats = LayerStats()
                with torch.enable_grad(), counter:
                    logits = _forward(layers, leaves, xb, step_att, rho_fw, spec.rho_bw, stats)
                    loss = F.cross_entropy(logits, y[lo : lo + len(xb)].clone(), reduction="sum") / n
                grads = torch.autograd.grad(loss, [leaves[name] for name in wanted])
                for name, g in zip(wanted, grads, strict=True):
                    acc[name] += g
                mem = adaptation_memory(layers, active, stats.mu_fw, len(xb))
                if counter.peak >= peak_saved:
                    peak_saved, best = counter.peak, mem
                flops += adaptation_flops(layers, active, stats.mu_fw, stats.mu_bw, len(xb))
                for i, mu in stats.mu_fw.items():
                    mu_sum[i] = mu_sum.get(i, 0.0) + mu
                    mu_count[i] = mu_count.get(i, 0) + 1
            for layer in layers:
                if active[layer.index]:
                    for name in layer.param_names:
                        params[name] = params[name] - alpha[layer.index, k] * acc[name]  # Eq. 4.3 / 4.15
                        stepped.add(name)
    return AdaptResult(
        state={name: params[name] for name in sorted(stepped)},
        saved_bytes=int(peak_saved),
        analytic_bytes=int(best.get("total", 0)),
        seconds=time.perf_counter() - start,
        steps=steps,
        analytic=best,
        predicted_saved_bytes=int(best.get("saved", 0)),
        flops=int(flops),
        mu_fw={i: mu_sum[i] / mu_count[i] for i in sorted(mu_sum)},
    )


def adapted_logits(model: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` with the adapted tensors ``state`` in place (model untouched)."""
    return functional_call(model, state, (x,))


def adapted_model(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with ``state`` loaded: the personal model a device serves."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, tensor in state.items():
            clone.get_parameter(name).copy_(tensor)
    return clone


def plan_adaptation(model: nn.Module, shots_total: int, memory_budget_bytes: int | None) -> AdaptConfig:
    """The largest sample batch (then, with attention, the smallest forward clip ratio from the
    spec's upward) whose analytic peak (Eq. 4.19 with μ^fw estimated as 1 - ρ) fits the budget.
    Raises :class:`PMetaRefused` when even one sample with ρ_fw = 0.9 does not fit."""
    spec, layers = _model_parts(model)
    if isinstance(shots_total, bool) or not isinstance(shots_total, int) or shots_total < 1:
        raise PMetaError(f"shots_total must be a positive integer, got {shots_total!r}")
    if memory_budget_bytes is not None and memory_budget_bytes < 0:
        raise PMetaError(f"memory budget must be >= 0 bytes, got {memory_budget_bytes}")
    if memory_budget_bytes is None:
        return AdaptConfig(sample_batch=shots_total)
    alpha = pmeta_module(model).alpha.detach()
    rhos = [spec.rho_fw] + ([r for r in (0.5, 0.7, 0.9) if r > spec.rho_fw] if spec.attention else [])
    batches = sorted({b for b in (shots_total, 25, 10, 5, 2, 1) if b <= shots_total}, reverse=True)
    smallest = math.inf
    for rho in rhos:
        mu = {layer.index: 1.0 - rho for layer in layers if spec.attention and layer.attention}
        for batch in batches:
            peak = max(adaptation_memory(layers, [bool(alpha[layer.index, k] > 0) for layer in layers], mu,
                                         batch)["total"] for k in range(spec.inner_steps))  # fmt: skip
            smallest = min(smallest, peak)
            if peak <= memory_budget_bytes:
                return AdaptConfig(sample_batch=batch, rho_fw=None if rho == spec.rho_fw else rho)
    raise PMetaRefused(
        f"adaptation needs at least {int(smallest)} bytes (sample batch 1, rho_fw {rhos[-1]}) but the "
        f"memory budget is {memory_budget_bytes} bytes"
    )
