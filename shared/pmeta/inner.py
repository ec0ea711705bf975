"""The differentiable inner loop of meta-training (Eq. 4.7 and 4.15), written functionally.

The backbone's tensors are a dict passed to ``torch.func.functional_call``; each step builds a
new dict ``w^{i,k} = w^{i,k-1} - α_l^k (γ_l ⊙ ∇_{w_l} ℓ)`` and never writes to a module, so the
query loss stays a function of the starting weights, α and the attention parameters (Eq. 4.8,
4.10, 4.16). With ``create_graph`` the gradients are themselves differentiated (second order);
without, they are constants (first order), and α and the attention still get their gradients
through the update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from shared.pmeta.attention import attention_score, weight_mask
from shared.pmeta.spec import Layer

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class InnerRule:
    """Which layers step, with which sizes, and whether meta attention masks the gradients."""

    alpha: torch.Tensor  # [L, K]; differentiable when learned
    attention: nn.ModuleDict | None  # pmeta.att, or None (no γ: every γ_l = 1)
    rho_fw: float
    rho_bw: float
    steps: int
    frozen: frozenset[int] = frozenset()  # layers that never step (ANIL's body, BOIL's head)


@contextmanager
def _taps(model: nn.Module, layers: list[Layer]) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Record (input, output) of each adaptable layer during a forward pass."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    modules = dict(model.named_modules())
    handles = []
    for layer in layers:
        def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor, i: int = layer.index) -> None:
            seen[i] = (inputs[0], output)
        handles.append(modules[layer.module].register_forward_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def backbone_params(model: nn.Module, layers: list[Layer]) -> Params:
    """The adaptable tensors (weight and bias of every layer), by state-dict name."""
    named = dict(model.named_parameters())
    return {n: named[n] for layer in layers for n in layer.param_names}


def _gamma(layer: Layer, rule: InnerRule, x_in: torch.Tensor, g_y: torch.Tensor,
           create_graph: bool) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
    if rule.attention is None or not layer.attention:
        return None
    att = rule.attention.get_submodule(str(layer.index))
    t_fw = F.group_norm(x_in, layer.groups) if layer.kind == "norm" else x_in  # §4.4.5.2
    if not create_graph:
        t_fw = t_fw.detach()
    fw, bw = att.get_submodule("fw"), att.get_submodule("bw")
    assert isinstance(fw, nn.Linear) and isinstance(bw, nn.Linear)
    gamma_fw = attention_score(t_fw, fw.weight, fw.bias, rule.rho_fw)
    gamma_bw = attention_score(g_y, bw.weight, bw.bias, rule.rho_bw)
    return weight_mask(layer.kind, gamma_fw, gamma_bw)


def adapt_functional(model: nn.Module, layers: list[Layer], params: Params, rule: InnerRule,
                     x: torch.Tensor, y: torch.Tensor, *, create_graph: bool,
                     loss_fn: Callable[..., torch.Tensor] = F.cross_entropy) -> Params:  # fmt: skip
    """K inner steps on the support set (x, y), full batch (Eq. 4.15); returns w^{i,K}."""
    fast = dict(params)
    stepping = [layer for layer in layers if layer.index not in rule.frozen]
    for k in range(rule.steps):
        with _taps(model, layers) as seen:
            loss = loss_fn(functional_call(model, fast, (x,)), y)
        wrt = [fast[n] for layer in stepping for n in layer.param_names]
        use_att = [layer for layer in stepping if rule.attention is not None and layer.attention]
        outs = [seen[layer.index][1] for layer in use_att]
        grads = torch.autograd.grad(loss, wrt + outs, create_graph=create_graph)
        g_w = dict(zip([n for layer in stepping for n in layer.param_names], grads[: len(wrt)], strict=True))
        g_y = dict(zip([layer.index for layer in use_att], grads[len(wrt):], strict=True))
        for layer in stepping:
            step = rule.alpha[layer.index, k]
            masks = _gamma(layer, rule, seen[layer.index][0], g_y[layer.index], create_graph) \
                if layer.index in g_y else None
            for j, name in enumerate(layer.param_names):
                g = g_w[name] if masks is None else masks[j] * g_w[name]  # Eq. 4.14
                fast[name] = fast[name] - step * g  # Eq. 4.7 / 4.15
    return fast


def query_logits(model: nn.Module, fast: Params, x: torch.Tensor) -> torch.Tensor:
    return functional_call(model, fast, (x,))
