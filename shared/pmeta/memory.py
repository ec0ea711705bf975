"""Memory (Eq. 4.19) and computation (Eq. 4.21) of one adaptation step, per the layers that step.

Words are float32 (4 bytes). ``adaptation_memory`` returns the terms of Eq. 4.19 for what
:mod:`shared.pmeta.ops` actually keeps, plus the group-norm backward state Eq. 4.19 omits:

* ``activations``: max_l m(x_l) (the largest live activation, incl. conv outputs) x batch;
* ``gradients``: Σ α̂_l m(w_l), the accumulated weight gradients (weights and biases);
* ``inputs``: Σ α̂_l μ_l^fw m(x_{l-1}) x batch, the stored (sparse) layer inputs (Eq. 4.20);
* ``bits``: the ReLU/max-pool state from l_min on, 4 bits per pooled output (the 1/T term);
* ``norm``: x̂ and 1/σ of each group norm the gradient passes through (not in Eq. 4.19);
* ``loss``: the cross-entropy's saved log-probabilities, targets and total weight.

``saved`` = inputs + bits + norm + loss is what the saved-tensors counter measures; ``total``
adds activations and gradients (the analytic peak).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from shared.pmeta.spec import Layer

WORD = 4


def _needs_input_grad(layers: Sequence[Layer], active: Sequence[bool]) -> list[bool]:
    out, seen = [], False
    for layer in layers:
        out.append(seen)
        seen = seen or active[layer.index]
    return out


def adaptation_memory(layers: Sequence[Layer], active: Sequence[bool], mu_fw: Mapping[int, float],
                      batch: int) -> dict[str, int]:  # fmt: skip
    """Eq. 4.19 terms in bytes for one accumulation batch of ``batch`` samples. ``mu_fw[l]``:
    kept fraction of layer l's input channels (1 without attention)."""
    zero = {"activations": 0, "gradients": 0, "inputs": 0, "bits": 0, "norm": 0, "loss": 0, "saved": 0, "total": 0}
    if not any(active):
        return zero
    need_x = _needs_input_grad(layers, active)
    act = max(max(layer.input_words, layer.output_words) for layer in layers) * batch * WORD
    grads = sum(layer.weight_words for layer in layers if active[layer.index]) * WORD
    inputs = bits = norm = 0
    for layer in layers:
        mu = mu_fw.get(layer.index, 1.0)
        kept_words = round(mu * layer.in_channels) * layer.hw[0] * layer.hw[1]
        if layer.kind == "norm":
            if need_x[layer.index]:
                norm += (layer.input_words + layer.groups) * batch * WORD
            elif active[layer.index]:
                inputs += kept_words * batch * WORD
            if need_x[layer.index] or active[layer.index]:  # the ReLU/pool after this norm
                pooled = batch * layer.out_channels * (layer.hw[0] // 2) * (layer.hw[1] // 2)
                bits += (pooled + 1) // 2
        elif active[layer.index]:
            inputs += (kept_words if layer.kind == "conv" else layer.input_words) * batch * WORD
    classes = layers[-1].out_channels
    loss = batch * classes * WORD + batch * 8 + WORD  # log-softmax output, int64 targets, total weight
    saved = inputs + bits + norm + loss
    return {"activations": act, "gradients": grads, "inputs": inputs, "bits": bits, "norm": norm,
            "loss": loss, "saved": saved, "total": saved + act + grads}  # fmt: skip


def _macs(layer: Layer) -> int:
    if layer.kind == "conv":
        return layer.hw[0] * layer.hw[1] * layer.out_channels * layer.in_channels * 9
    if layer.kind == "norm":
        return layer.hw[0] * layer.hw[1] * layer.out_channels
    return layer.in_channels * layer.out_channels


def adaptation_flops(layers: Sequence[Layer], active: Sequence[bool], mu_fw: Mapping[int, float],
                     mu_bw: Mapping[int, float], samples: int) -> int:  # fmt: skip
    """Eq. 4.21 for one step over ``samples`` samples (multiply-accumulates): forward, weight
    gradients of stepping layers scaled by μ^fw μ^bw, input gradients above l_min."""
    if not any(active):
        return 0
    lmin = next(i for i, a in enumerate(active) if a)
    total = 0
    for layer in layers:
        m = _macs(layer)
        total += m
        if active[layer.index]:
            total += round(m * mu_fw.get(layer.index, 1.0) * mu_bw.get(layer.index, 1.0))
        if layer.index > lmin:
            total += m
    return total * samples


def inference_flops(layers: Sequence[Layer]) -> int:
    return sum(_macs(layer) for layer in layers)
