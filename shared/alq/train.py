"""The ALQ pipeline (thesis Alg. 2.5) over a torch model, on the shared loop.

The model keeps ordinary parameters; before every forward pass each quantised parameter holds
ŵ = B α (Eq. 2.17), so backward gives ∂ℓ/∂ŵ directly (no straight-through estimator), and
:class:`ALQOptimizer` turns that gradient into the phase's step. Unquantised parameters
(biases, normalisation layers) follow AMSGrad (torch's Adam with ``amsgrad=True``) in the
optimisation phases.

Pipeline: sketch every quantised tensor (Alg. 2.1) → ``init_epochs`` of bases optimisation
(Alg. 2.4) → for each of the R outer iterations: prune in the α domain to the schedule's
remaining budget over one epoch (Alg. 2.2), ``bases_epochs`` of Alg. 2.4, ``alpha_epochs`` of
Alg. 2.3 → ``final_epochs`` of Alg. 2.4 with a decaying rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.alq.groups import default_structure, to_groups
from shared.alq.multibit import MultiBit, sketch
from shared.alq.steps import StepConfig, TensorState, alpha_step, bases_step, prune_scores
from shared.loop import FetchFn, cross_entropy, run_loop, steps_per_epoch

PHASES = ("bases", "alpha", "prune")
RANKINGS = ("per_bit", "thesis")


@dataclass
class ALQConfig:
    target_bits: float = 2.0  # average bits of bases per quantised weight after the last prune
    i_max: int = 6  # §2.6.2.2: 6 suffices for small networks
    sigma: float = 0.0  # Alg. 2.1 stopping threshold (relative, see multibit.sketch)
    structures: dict[str, str] = field(default_factory=dict)  # param name -> grouping
    outer: int = 3  # R: number of Pruning Steps
    init_epochs: int = 1
    bases_epochs: int = 2  # Q (per outer iteration, in epochs)
    alpha_epochs: int = 1  # P
    final_epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    final_lr_decay: float = 0.7  # per final epoch (thesis: 1e-4 x 0.98 over 50 epochs)
    ranking: str = "per_bit"
    seed: int = 0
    steps: StepConfig = field(default_factory=StepConfig)

    def __post_init__(self) -> None:
        if not 0.0 <= self.target_bits <= self.i_max:
            raise ValueError(f"target_bits must lie in [0, i_max={self.i_max}], got {self.target_bits}")
        if self.ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {RANKINGS}, got {self.ranking!r}")
        if self.outer < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"invalid ALQ config {self}")


def quantisable(model: nn.Module) -> list[str]:
    """Names of the conv and fc weights (the tensors ALQ quantises; thesis §2.6.5.1 counts
    weights only)."""
    return [f"{m}.weight" if m else "weight" for m, mod in model.named_modules()
            if isinstance(mod, nn.Linear | nn.Conv2d)]  # fmt: skip


class ALQOptimizer:
    """What :func:`shared.loop.run_loop` needs of an optimizer; ``phase`` picks the step."""

    def __init__(self, model: nn.Module, states: dict[str, TensorState], cfg: ALQConfig) -> None:
        self.params = dict(model.named_parameters())
        self.states, self.cfg = states, cfg
        rest = [p for n, p in self.params.items() if n not in states]
        self.dense = torch.optim.Adam(rest, lr=cfg.lr, amsgrad=True) if rest else None
        self.step_cfg = cfg.steps
        self.phase = "bases"
        self.prune_quota = 0.0  # bits (per_bit) or coordinates (thesis) to remove per step
        self._credit = 0.0  # quota not yet spent (a coordinate costs a whole group's bits)
        self._groups: list[dict[str, Any]] = [{"lr": cfg.lr}]
        self.write_back()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._groups + (self.dense.param_groups if self.dense is not None else [])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params.values():
            p.grad = None

    def write_back(self) -> None:
        """Every quantised parameter := ŵ = B α (Eq. 2.17)."""
        with torch.no_grad():
            for name, st in self.states.items():
                p = self.params[name]
                p.copy_(st.mb.reconstruct().to(p.dtype))

    def step(self) -> None:
        lr = float(self._groups[0]["lr"])
        scfg = StepConfig(lr=lr, betas=self.step_cfg.betas, eps=self.step_cfg.eps,
                          lam=self.step_cfg.lam, alpha_decay=self.step_cfg.alpha_decay)  # fmt: skip
        grads = {}
        for name, st in self.states.items():
            g = self.params[name].grad
            grads[name] = torch.zeros(st.mb.B.shape[0], st.mb.B.shape[2]) if g is None else \
                to_groups(g.detach().float(), st.mb.structure)  # fmt: skip
        if self.phase == "prune":
            scores = {n: prune_scores(st, grads[n], scfg) for n, st in self.states.items()}
            self._credit += self.prune_quota
            self._credit -= prune_global(self.states, scores, self._credit, self.cfg.ranking)
        else:
            for name, st in self.states.items():
                (bases_step if self.phase == "bases" else alpha_step)(st, grads[name], scfg)
            if self.dense is not None:
                self.dense.step()
        self.write_back()


def total_bits(states: dict[str, TensorState]) -> int:
    return sum(int(st.mb.widths.sum()) * st.mb.group_size for st in states.values())


def total_weights(states: dict[str, TensorState]) -> int:
    return sum(st.mb.numel for st in states.values())


def prune_global(states: dict[str, TensorState], scores: dict[str, torch.Tensor], quota: float,
                 ranking: str, *, at_least: bool = False) -> float:
    """Alg. 2.2 lines 14-16: remove the α_i with the smallest loss increment over all layers.

    ``ranking="thesis"`` sorts f and removes ``quota`` coordinates (the thesis assumes similar
    group sizes in all layers). ``"per_bit"`` (default) sorts f / n_g, the increment per bit
    saved, and removes coordinates worth ``quota`` bits: LeNet5's groups range from 25
    (kernelwise) to 500 (channelwise) weights, so one coordinate is 25 to 500 bits. (The
    thesis's per-layer top-k% pre-sort only saves sorting time; the full sort here gives the
    same choice.) Removes at most ``quota`` (at least, with ``at_least``); returns what it
    removed (bits or coordinates).
    """
    if quota <= 0:
        return 0
    names = list(states)
    flat, cost, owner = [], [], []
    for i, n in enumerate(names):
        f, size = scores[n].reshape(-1), states[n].mb.group_size
        flat.append(f / size if ranking == "per_bit" else f)
        cost.append(torch.full_like(f, float(size if ranking == "per_bit" else 1)))
        owner.append(torch.full_like(f, i, dtype=torch.long))
    f_all, c_all, o_all = torch.cat(flat), torch.cat(cost), torch.cat(owner)
    order = torch.argsort(f_all, stable=True)
    finite = torch.isfinite(f_all[order])
    order = order[finite]
    cum = torch.cumsum(c_all[order], 0)
    q = torch.tensor(quota, dtype=cum.dtype)
    take = int(torch.searchsorted(cum, q, right=not at_least).item()) + (1 if at_least else 0)
    chosen = order[: min(take, order.numel())]
    offsets = np.cumsum([0] + [int(scores[n].numel()) for n in names])
    for i, n in enumerate(names):
        local = chosen[o_all[chosen] == i] - int(offsets[i])
        if local.numel():
            mb = states[n].mb
            act = mb.active.reshape(-1).clone()
            act[local] = False
            mb.active = act.reshape(mb.active.shape)
            mb.canonicalise()
    return float(c_all[chosen].sum()) if chosen.numel() else 0.0


def init_states(model: nn.Module, cfg: ALQConfig) -> dict[str, TensorState]:
    """Alg. 2.1 for every conv and fc weight of ``model``."""
    params = dict(model.named_parameters())
    states = {}
    for name in quantisable(model):
        w = params[name].detach()
        structure = cfg.structures.get(name) or default_structure(tuple(w.shape))
        states[name] = TensorState(sketch(w, structure, cfg.i_max, cfg.sigma))
    return states


def alq_quantize(
    model: nn.Module,
    fetch: FetchFn,
    n: int,
    cfg: ALQConfig,
    *,
    log: Callable[[str, dict[str, float]], None] | None = None,
) -> dict[str, MultiBit]:
    """Quantise ``model`` (trained, full precision) in place with Alg. 2.5 on ``n`` training
    samples served by ``fetch``. Afterwards every conv/fc weight of ``model`` equals its
    returned :class:`MultiBit`'s ``reconstruct()``; the average bitwidth is ≤ ``target_bits``.
    ``log(phase, {"bits": ..., "loss": ...})`` is called after each phase."""
    states = init_states(model, cfg)
    opt = ALQOptimizer(model, states, cfg)
    rng = np.random.Generator(np.random.PCG64(cfg.seed))
    per_epoch = steps_per_epoch(n, cfg.batch_size)
    n_w = total_weights(states)

    def phase(name: str, epochs: int, lr_at: Callable[[int], float] | None = None) -> None:
        if epochs <= 0:
            return
        opt.phase = "prune" if name == "prune" else name
        res = run_loop(model, opt, cross_entropy, fetch, n, batch_size=cfg.batch_size,
                       num_steps=epochs * per_epoch, rng=rng,
                       lr_at=lr_at or (lambda _s: cfg.lr), context=f"ALQ {name}")  # fmt: skip
        if log is not None:
            log(name, {"bits": total_bits(states) / n_w, "loss": res.last_loss})

    if log is not None:
        log("init", {"bits": total_bits(states) / n_w, "loss": math.nan})
    phase("bases", cfg.init_epochs)
    start = total_bits(states) if cfg.ranking == "per_bit" else \
        sum(int(st.mb.widths.sum()) for st in states.values())  # fmt: skip
    goal = cfg.target_bits * n_w if cfg.ranking == "per_bit" else \
        cfg.target_bits * sum(st.mb.groups for st in states.values())  # fmt: skip
    for r in range(1, cfg.outer + 1):
        # Schedule M^r: geometric from M^0 to the goal (Eq. 2.28 with the ratio that lands on it).
        remaining = start * (goal / start) ** (r / cfg.outer) if start > 0 and goal > 0 else goal
        now = total_bits(states) if cfg.ranking == "per_bit" else \
            sum(int(st.mb.widths.sum()) for st in states.values())  # fmt: skip
        opt.prune_quota, opt._credit = max(0.0, (now - remaining) / per_epoch), 0.0
        if opt.prune_quota > 0:  # a uniform-bitwidth run (target = i_max) never prunes
            phase("prune", 1)
        # Steps round the quota down or a step's last coordinate overshoots: finish exactly.
        _finish_prune(states, remaining, cfg)
        opt.write_back()
        phase("bases", cfg.bases_epochs)
        phase("alpha", cfg.alpha_epochs)
    phase("bases", cfg.final_epochs, lambda s: cfg.lr * cfg.final_lr_decay ** (s // per_epoch))
    return {name: st.mb for name, st in states.items()}


def _finish_prune(states: dict[str, TensorState], remaining: float, cfg: ALQConfig) -> None:
    """Remove the coordinates of smallest modelled increment (Eq. 2.15 with the last α-domain
    moments) still above the budget, so every Pruning Step ends within it."""
    ranking, sc = cfg.ranking, cfg.steps
    now = total_bits(states) if ranking == "per_bit" else \
        sum(int(st.mb.widths.sum()) for st in states.values())  # fmt: skip
    if now <= remaining:
        return
    scores = {}
    for n, st in states.items():
        m = st.a_moments
        if m.t == 0:
            f = 0.5 * st.mb.alpha**2
        else:
            g, H = m.model(cfg.lr, sc.betas, sc.eps)
            f = -g * st.mb.alpha + 0.5 * H * st.mb.alpha**2
        scores[n] = torch.where(st.mb.active, f, torch.full_like(f, float("inf")))
    prune_global(states, scores, now - remaining, ranking, at_least=True)
