"""The ``ArchSpec.extra["da3"]`` section and the errors of the DA³ package."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any

from shared.models.spec import ArchSpec

NAME = "da3"
# What the section attaches to the backbone. "da3": the gated additive attention adaptor per
# block; the others are the baselines' modules; "none": nothing (fine-tuning, last layer,
# bias-only train the backbone's own tensors).
ADAPTORS = ("da3", "tinytl", "series", "parallel", "piggyback", "none")
PIGGYBACK_THRESHOLD = 5e-3  # Piggyback's mask threshold (Mallya et al. 2018)
PIGGYBACK_INIT = 1e-2  # real-valued mask scores start above it: the mask starts all ones


class DA3Error(ValueError):
    """Bad input to the DA³ package (spec section, method, data); the message names it."""


class DA3Refused(ValueError):
    """Nothing fits the memory budget; ``reason`` says what would have been needed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DA3Spec:
    adaptor: str = "da3"
    gate: bool = True  # the dynamic spatial gate (False: the correction applies everywhere)
    beta: float = 1.0  # Eq. (1)'s scale
    temperature: float = 2.0 / 3.0  # Eq. (2)-(3)'s T (the default of train_domain)
    gate_kernel: int = 3  # G: a k x k conv over the 2-channel pooled map H_s(A)
    correction_kernel: int = 3  # the correction W: a k x k conv on A
    gate_bias: float = 3.0  # G's bias at init: sigmoid(beta * 3) = 0.95, nearly all positions open
    lite_groups_width: int = 8  # TinyTL lite residual: channels per group of its 3x3 conv
    store_bits: int = 8  # DA³: the correction input kept for the backward as int8 (8) or float32 (32)

    def to_section(self) -> dict[str, Any]:
        return asdict(self)


def _number(section: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise DA3Error(f"da3.{key} must be a finite number, got {value!r}")
    if not low < float(value) <= high:
        raise DA3Error(f"da3.{key} must lie in ({low}, {high}], got {value}")
    return float(value)


def _integer(section: dict[str, Any], key: str, default: int, allowed: range) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) not in allowed:
        raise DA3Error(f"da3.{key} must be an integer in [{allowed.start}, {allowed.stop - 1}], got {value!r}")
    return int(value)


def parse_section(section: Any) -> DA3Spec:
    if not isinstance(section, dict):
        raise DA3Error(f"extra.da3 must be a JSON object, got {type(section).__name__}")
    known = set(DA3Spec.__dataclass_fields__)
    unknown = set(section) - known
    if unknown:
        raise DA3Error(f"extra.da3 has unknown keys {sorted(unknown)}; known: {sorted(known)}")
    adaptor = section.get("adaptor", "da3")
    if adaptor not in ADAPTORS:
        raise DA3Error(f"da3.adaptor must be one of {ADAPTORS}, got {adaptor!r}")
    gate = section.get("gate", True)
    if not isinstance(gate, bool):
        raise DA3Error(f"da3.gate must be true or false, got {gate!r}")
    kernel = _integer(section, "gate_kernel", 3, range(1, 8))
    if kernel % 2 == 0:
        raise DA3Error(f"da3.gate_kernel must be odd (same-size output), got {kernel}")
    correction = _integer(section, "correction_kernel", 3, range(1, 8))
    if correction % 2 == 0:
        raise DA3Error(f"da3.correction_kernel must be odd (same-size output), got {correction}")
    return DA3Spec(
        adaptor=adaptor,
        correction_kernel=correction,
        gate=gate,
        beta=_number(section, "beta", 1.0, 0.0, 100.0),
        temperature=_number(section, "temperature", 2.0 / 3.0, 0.0, 100.0),
        gate_kernel=kernel,
        gate_bias=_number(section, "gate_bias", 3.0, -100.0, 100.0),
        lite_groups_width=_integer(section, "lite_groups_width", 8, range(1, 1 << 16)),
        store_bits=_store_bits(section),
    )


def _store_bits(section: dict[str, Any]) -> int:
    value = section.get("store_bits", 8)
    if isinstance(value, bool) or value not in (8, 32):
        raise DA3Error(f"da3.store_bits must be 8 or 32, got {value!r}")
    return int(value)


def da3_spec(backbone: ArchSpec, *, num_classes: int | None = None, **options: Any) -> ArchSpec:
    """The DA³ (or baseline, ``adaptor=...``) spec over a ``resnet`` backbone spec. ``options``
    are :class:`DA3Spec` fields; ``num_classes`` replaces the head's class count (a domain with
    other classes). Raises :class:`DA3Error` for a non-resnet backbone or a bad option."""
    if not isinstance(backbone, ArchSpec) or backbone.kind != "resnet":
        raise DA3Error(f"DA³ adapts a 'resnet' backbone, got {getattr(backbone, 'kind', backbone)!r}")
    extra = {k: v for k, v in backbone.extra.items() if k != NAME}
    extra[NAME] = parse_section(options).to_section()
    try:
        return ArchSpec(backbone.kind, backbone.input_shape,
                        backbone.num_classes if num_classes is None else num_classes,
                        hidden=backbone.hidden, channels=backbone.channels, extra=extra)  # fmt: skip
    except DA3Error:
        raise
    except ValueError as exc:
        raise DA3Error(str(exc)) from exc


def section_of(arch: ArchSpec) -> DA3Spec:
    """The parsed section of ``arch`` (DA3Error for a spec without one or a non-resnet)."""
    if arch.kind != "resnet" or arch.extra.get(NAME) is None:
        raise DA3Error(f"not a DA³ model: kind {arch.kind!r}, extra keys {sorted(arch.extra)}")
    return parse_section(arch.extra[NAME])
