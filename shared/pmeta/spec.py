"""The ``pmeta`` section of ``ArchSpec.extra`` and the adaptable layers of its backbone.

``{"inner_steps": K, "rho_fw": 0.3, "rho_bw": 0.0, "init_alpha": 0.01, "attention": true}``:
K inner steps (thesis §4.6.3: 5), the clip ratios of Alg. 4.1 (§4.6.1: 0.3 forward, 0 backward),
the starting inner step size (§4.6.3: 0.01) and whether meta attention (§4.4.3) exists. The
backbone is the ``conv4`` kind; its adaptable layers l = 1..L (Fig. 4.5: L = 9 for 4Conv) are
every Conv2d and GroupNorm in order, then the head Linear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from shared.models.spec import ArchSpec, conv4_groups, conv4_input_shape
from shared.pmeta.errors import PMetaError

NAME = "pmeta"
MAX_INNER_STEPS = 32
_KEYS = {"inner_steps", "rho_fw", "rho_bw", "init_alpha", "attention"}


@dataclass(frozen=True)
class PMetaSpec:
    inner_steps: int = 5  # K (§4.6.3)
    rho_fw: float = 0.3  # forward clip ratio of Alg. 4.1 (§4.6.1)
    rho_bw: float = 0.0  # backward clip ratio (§4.6.1: sparsity there saves no memory)
    init_alpha: float = 0.01  # starting inner step size (§4.6.3)
    attention: bool = True  # meta attention modules (§4.4.3); False: "p-Meta (4.4.2)" and baselines

    def to_section(self) -> dict[str, Any]:
        return {"inner_steps": self.inner_steps, "rho_fw": self.rho_fw, "rho_bw": self.rho_bw,
                "init_alpha": self.init_alpha, "attention": self.attention}  # fmt: skip


def parse_section(section: Any) -> PMetaSpec:
    if not isinstance(section, dict):
        raise PMetaError(f"extra.pmeta must be a JSON object, got {type(section).__name__}")
    unknown = set(section) - _KEYS
    if unknown:
        raise PMetaError(f"extra.pmeta has unknown keys {sorted(unknown)}; expected {sorted(_KEYS)}")
    spec = PMetaSpec()
    k = section.get("inner_steps", spec.inner_steps)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_INNER_STEPS:
        raise PMetaError(f"extra.pmeta.inner_steps must be an integer in [1, {MAX_INNER_STEPS}], got {k!r}")
    values: dict[str, float] = {}
    for key, lo, hi in (("rho_fw", 0.0, 1.0), ("rho_bw", 0.0, 1.0), ("init_alpha", 0.0, 10.0)):
        v = section.get(key, getattr(spec, key))
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
            raise PMetaError(f"extra.pmeta.{key} must be a number in [{lo}, {hi}], got {v!r}")
        values[key] = float(v)
    att = section.get("attention", spec.attention)
    if not isinstance(att, bool):
        raise PMetaError(f"extra.pmeta.attention must be true or false, got {att!r}")
    return PMetaSpec(int(k), values["rho_fw"], values["rho_bw"], values["init_alpha"], att)


@dataclass(frozen=True)
class Layer:
    """Adaptable layer l of the backbone (thesis Table 4.1 notation, per sample)."""

    index: int  # 0-based l - 1
    kind: str  # "conv", "norm" or "head"
    module: str  # state-dict prefix, e.g. "features.0"
    in_channels: int  # C_{l-1} (norm: C_l)
    out_channels: int  # C_l
    hw: tuple[int, int]  # spatial size of input and output (3x3 conv with padding 1); (1, 1) for head
    groups: int  # GroupNorm groups (norm only)
    attention: bool  # meta attention applies (every layer but the output layer, §4.6.1)

    @property
    def input_words(self) -> int:
        """m(x_{l-1}): words of the input a weight gradient needs (norm: the normalised input)."""
        return self.in_channels * self.hw[0] * self.hw[1]

    @property
    def output_words(self) -> int:
        return self.out_channels * self.hw[0] * self.hw[1]

    @property
    def weight_words(self) -> int:
        """m(w_l) including the bias."""
        if self.kind == "conv":
            return self.out_channels * self.in_channels * 9 + self.out_channels
        if self.kind == "norm":
            return 2 * self.out_channels
        return self.out_channels * self.in_channels + self.out_channels

    @property
    def param_names(self) -> tuple[str, str]:
        return (f"{self.module}.weight", f"{self.module}.bias")


def backbone_layers(arch: ArchSpec) -> list[Layer]:
    """The adaptable layers of a ``conv4`` backbone, in forward order."""
    if arch.kind != "conv4":
        raise PMetaError(f"p-Meta needs the conv4 backbone, got kind {arch.kind!r}")
    c, h, w = conv4_input_shape(arch)
    layers: list[Layer] = []
    for t, out in enumerate(arch.hidden):
        layers.append(Layer(len(layers), "conv", f"features.{4 * t}", c, out, (h, w), 1, True))
        layers.append(Layer(len(layers), "norm", f"features.{4 * t + 1}", out, out, (h, w),
                            conv4_groups(out), True))  # fmt: skip
        c, h, w = out, h // 2, w // 2
    layers.append(Layer(len(layers), "head", "head", c * h * w, arch.num_classes, (1, 1), 1, False))
    return layers


def pmeta_section(arch: ArchSpec) -> PMetaSpec:
    section = arch.extra.get(NAME)
    if section is None:
        raise PMetaError("the model's spec has no extra.pmeta section (build it with pmeta_spec)")
    return parse_section(section)


def pmeta_spec(input_shape: tuple[int, ...], ways: int, *, channels: int = 32, inner_steps: int = 5,
               rho_fw: float = 0.3, rho_bw: float = 0.0, attention: bool = True,
               init_alpha: float = 0.01, blocks: int = 4) -> ArchSpec:  # fmt: skip
    """A p-Meta model: the 4Conv backbone (``blocks`` x ``channels``) for ``ways`` classes with
    an ``extra.pmeta`` section. ``attention=False`` gives "p-Meta (4.4.2)" and the baselines."""
    section = PMetaSpec(inner_steps, rho_fw, rho_bw, init_alpha, attention).to_section()
    parse_section(section)
    try:
        return ArchSpec("conv4", tuple(input_shape), ways, hidden=(channels,) * blocks, extra={NAME: section})
    except PMetaError:
        raise
    except ValueError as exc:
        raise PMetaError(str(exc)) from exc
