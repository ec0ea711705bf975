"""Meta-training, Alg. 4.2, and the baselines re-implemented on the same backbone (§4.6.1).

Methods (all with group normalisation and, on a device, one-sample gradient accumulation):

* ``maml``  [FAL17]: every layer steps with the fixed ``inner_lr``;
* ``anil``  [RRBV20]: only the output layer steps;
* ``boil``  [OYKY21]: every layer but the output layer steps;
* ``mamlpp`` [AES19]: learned per-layer, per-step α (Eq. 4.7-4.9), no sparsity;
* ``pmeta``: "p-Meta (4.4.2)", α learned with the memory-weighted Lasso of Eq. 4.10;
* ``pmeta_att``: "p-Meta (4.4.2 + 4.4.3)", plus the meta attention (Eq. 4.11-4.16).

MAML++'s other ingredients (multi-step loss, per-step batch-norm statistics, derivative-order
annealing) are left out: per-step norm statistics do not exist with group normalisation, and the
thesis's comparison is about the learned step sizes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.data.tasks import Task, TaskSampler
from shared.pmeta.errors import PMetaError
from shared.pmeta.family import arch_of, pmeta_module
from shared.pmeta.inner import InnerRule, adapt_functional, backbone_params, query_logits
from shared.pmeta.spec import Layer, PMetaSpec, backbone_layers, pmeta_section

METHODS = ("maml", "anil", "boil", "mamlpp", "pmeta", "pmeta_att")
LEARNED_ALPHA = ("mamlpp", "pmeta", "pmeta_att")


@dataclass(frozen=True)
class MetaTrainConfig:
    method: str = "pmeta_att"
    ways: int = 5
    shots: int = 1
    queries: int = 15  # query samples per class
    meta_batch: int = 4  # tasks per outer step (§4.6.2: 4)
    iterations: int = 1000  # outer steps
    outer_lr: float = 1e-3  # β, Adam with a cosine schedule (§4.6.3)
    inner_lr: float = 0.01  # the fixed α of maml/anil/boil (§4.6.3: 0.01); learned methods start from the spec's init_alpha
    second_order: bool = False
    lasso_lambda: float = 1e-3  # λ of Eq. 4.10 (pmeta, pmeta_att)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PMetaError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("ways", "shots", "queries", "meta_batch", "iterations"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "iterations" else 1):
                raise PMetaError(f"{name} must be a positive integer, got {v!r}")
        for name in ("outer_lr", "inner_lr", "lasso_lambda"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise PMetaError(f"{name} must be a finite number >= 0, got {v!r}")


def _check(model: nn.Module, config: MetaTrainConfig) -> tuple[PMetaSpec, list[Layer]]:
    arch = arch_of(model)
    spec = pmeta_section(arch)
    if (config.method == "pmeta_att") != spec.attention:
        raise PMetaError(
            f"method {config.method!r} needs a spec with attention={config.method == 'pmeta_att'} "
            f"(pmeta_spec(..., attention=...)), the model's has {spec.attention}"
        )
    if arch.num_classes != config.ways:
        raise PMetaError(f"the model has {arch.num_classes} outputs but the config asks for {config.ways}-way tasks")
    return spec, backbone_layers(arch)


def frozen_layers(method: str, layers: list[Layer]) -> frozenset[int]:
    head = layers[-1].index
    if method == "anil":
        return frozenset(layer.index for layer in layers if layer.index != head)
    if method == "boil":
        return frozenset({head})
    return frozenset()


def inner_rule(model: nn.Module, spec: PMetaSpec, layers: list[Layer], method: str,
               steps: int | None = None) -> InnerRule:  # fmt: skip
    alpha = pmeta_module(model).alpha
    return InnerRule(
        alpha=alpha if method in LEARNED_ALPHA else alpha.detach(),
        attention=pmeta_module(model).att if method == "pmeta_att" else None,
        rho_fw=spec.rho_fw, rho_bw=spec.rho_bw, steps=steps or spec.inner_steps,
        frozen=frozen_layers(method, layers),
    )


def lasso_penalty(alpha: torch.Tensor, layers: list[Layer], lam: float) -> torch.Tensor:
    """λ Σ_{l,k} m(x_{l-1}) |α_l^k| (Eq. 4.10), m in words per sample."""
    m = torch.tensor([float(layer.input_words) for layer in layers], dtype=alpha.dtype)
    return lam * (m[:, None] * alpha.abs()).sum()


@torch.no_grad()
def _set_fixed_alpha(model: nn.Module, layers: list[Layer], method: str, lr: float) -> None:
    alpha = pmeta_module(model).alpha
    frozen = frozen_layers(method, layers)
    for layer in layers:
        alpha[layer.index] = 0.0 if layer.index in frozen else lr


def _task_loss(model: nn.Module, layers: list[Layer], rule: InnerRule, task: Task,
               second_order: bool) -> tuple[torch.Tensor, float]:  # fmt: skip
    fast = adapt_functional(model, layers, backbone_params(model, layers), rule,
                            task.support_x, task.support_y, create_graph=second_order)  # fmt: skip
    logits = query_logits(model, fast, task.query_x)
    acc = float((logits.argmax(1) == task.query_y).float().mean())
    return F.cross_entropy(logits, task.query_y), acc


def _check_sampler(sampler: TaskSampler, ways: int, shots: int) -> None:
    if sampler.ways != ways or sampler.shots != shots:
        raise PMetaError(f"the sampler draws {sampler.ways}-way {sampler.shots}-shot tasks, "
                         f"the config asks for {ways}-way {shots}-shot")  # fmt: skip


def meta_train(model: nn.Module, sampler: TaskSampler, config: MetaTrainConfig,
               progress: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:  # fmt: skip
    """Alg. 4.2 in place on ``model`` (backbone, α and attention); returns final metrics.

    Outer step: Adam (β = ``outer_lr``, cosine schedule to 0 over ``iterations``) on the mean
    query loss of ``meta_batch`` tasks (Eq. 4.8, 4.9, 4.16) plus, for p-Meta, the Lasso of
    Eq. 4.10 on α. α is then projected onto α >= 0 (the thesis's constraint; the projection
    is what makes entries exactly 0, so that a device skips those layers). ``progress(i,
    metrics)`` is called after each outer step."""
    spec, layers = _check(model, config)
    _check_sampler(sampler, config.ways, config.shots)
    torch.manual_seed(config.seed)
    if config.method not in LEARNED_ALPHA:
        _set_fixed_alpha(model, layers, config.method, config.inner_lr)
    rule = inner_rule(model, spec, layers, config.method)
    pm = pmeta_module(model)
    params = list(backbone_params(model, layers).values())
    if config.method in LEARNED_ALPHA:
        params.append(pm.alpha)
    if config.method == "pmeta_att":
        params += list(pm.att.parameters())
    opt = torch.optim.Adam(params, lr=config.outer_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(config.iterations, 1))
    model.train()
    start = time.perf_counter()
    losses: list[float] = []
    accs: list[float] = []
    for it in range(config.iterations):
        opt.zero_grad(set_to_none=True)
        total = torch.zeros(())
        step_acc = 0.0
        for _ in range(config.meta_batch):
            loss, acc = _task_loss(model, layers, rule, sampler.sample(), config.second_order)
            total = total + loss / config.meta_batch
            step_acc += acc / config.meta_batch
        objective = total
        if config.method in ("pmeta", "pmeta_att") and config.lasso_lambda > 0:
            objective = objective + lasso_penalty(pm.alpha, layers, config.lasso_lambda)
        objective.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            pm.alpha.clamp_(min=0.0)
        losses.append(float(total.detach()))
        accs.append(step_acc)
        if progress is not None:
            progress(it, {"loss": losses[-1], "query_accuracy": step_acc})
    tail = max(1, min(50, len(losses)))
    alpha = pm.alpha.detach()
    return {
        "iterations": float(config.iterations),
        "loss": float(np.mean(losses[-tail:])) if losses else float("nan"),
        "query_accuracy": float(np.mean(accs[-tail:])) if accs else float("nan"),
        "alpha_nonzero": float((alpha > 0).float().mean()),
        "seconds": time.perf_counter() - start,
    }


def evaluate_tasks(model: nn.Module, sampler: TaskSampler, config: MetaTrainConfig, tasks: int, *,
                   on_device: bool = False, sample_batch: int = 1) -> dict[str, float]:  # fmt: skip
    """Few-shot learn ``tasks`` unseen tasks and score their query sets.

    ``on_device=False`` adapts with the functional inner loop on the whole support set;
    ``on_device=True`` with :func:`shared.pmeta.device.adapt` (gradient accumulation over
    ``sample_batch`` samples, sparse storage), as a device does. Without attention both give
    the same gradients (group normalisation has no batch statistics); with attention the scores
    are averaged over each accumulation batch (§4.4.5.1), so results differ slightly (Table 4.9).
    Returns ``accuracy`` (mean), ``ci95`` (1.96 standard errors), ``loss`` and ``tasks``."""
    if tasks < 1:
        raise PMetaError(f"tasks must be >= 1, got {tasks}")
    spec, layers = _check(model, config)
    _check_sampler(sampler, config.ways, config.shots)
    rule = inner_rule(model, spec, layers, config.method)
    accs: list[float] = []
    losses: list[float] = []
    for _ in range(tasks):
        task = sampler.sample()
        if on_device:
            from shared.pmeta.device import AdaptConfig, adapt, adapted_logits

            result = adapt(model, task.support_x, task.support_y, AdaptConfig(sample_batch=sample_batch))
            with torch.no_grad():
                logits = adapted_logits(model, result.state, task.query_x)
        else:
            with torch.enable_grad():
                params = {n: p.detach().requires_grad_(True) for n, p in backbone_params(model, layers).items()}
                detached = InnerRule(rule.alpha.detach(), rule.attention, rule.rho_fw, rule.rho_bw, rule.steps,
                                     rule.frozen)  # fmt: skip
                fast = adapt_functional(model, layers, params, detached, task.support_x, task.support_y,
                                        create_graph=False)  # fmt: skip
            with torch.no_grad():
                logits = query_logits(model, {n: t.detach() for n, t in fast.items()}, task.query_x)
        accs.append(float((logits.argmax(1) == task.query_y).float().mean()))
        losses.append(float(F.cross_entropy(logits, task.query_y)))
    a = np.asarray(accs)
    ci = 1.96 * float(a.std(ddof=1)) / math.sqrt(len(a)) if len(a) > 1 else float("nan")
    return {"accuracy": float(a.mean()), "ci95": ci, "loss": float(np.mean(losses)), "tasks": float(len(a))}
