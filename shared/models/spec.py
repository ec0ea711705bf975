"""The JSON architecture spec that travels with every model artefact."""

from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any

from shared.models.families import parse_families

KINDS = ("mlp", "cnn")
_MAX_WIDTH = 1 << 16


@dataclass(frozen=True)
class ArchSpec:
    """Which network to build. Validated on construction, so a bad spec never reaches torch.

    ``mlp``: flatten -> Linear/ReLU per ``hidden`` width -> Linear(num_classes) (the thesis's
    DPU MLP is ``hidden=(512, 512)`` on 784 inputs).
    ``cnn``: per entry of ``channels`` a stage of two conv3x3-BN-ReLU blocks and a 2x2 max-pool
    (a VGG-small scaled to 28x28), then Linear/BN/ReLU per ``hidden`` width, then the classifier.
    ``extra``: one section per model family extending the backbone (``{"dress": {...}}``);
    empty for a plain model.
    """

    kind: str
    input_shape: tuple[int, ...]
    num_classes: int
    hidden: tuple[int, ...] = (512, 512)
    channels: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Specs arrive as JSON inside artefacts: refuse 2.5 or "512" rather than truncating
        # or splitting them into digits.
        for name in ("input_shape", "hidden", "channels"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") or not all(
                isinstance(d, numbers.Integral) for d in value
            ):
                raise ValueError(f"{name} must be a sequence of integers, got {value!r}")
            object.__setattr__(self, name, tuple(int(d) for d in value))
        if not isinstance(self.num_classes, numbers.Integral):
            raise ValueError(f"num_classes must be an integer, got {self.num_classes!r}")
        object.__setattr__(self, "num_classes", int(self.num_classes))
        if self.kind not in KINDS:
            raise ValueError(f"unknown model kind {self.kind!r}; expected one of {KINDS}")
        if not 1 <= len(self.input_shape) <= 3 or any(d < 1 or d > _MAX_WIDTH for d in self.input_shape):
            raise ValueError(f"input_shape must be 1 to 3 positive sizes, got {self.input_shape}")
        if not 2 <= self.num_classes <= _MAX_WIDTH:
            raise ValueError(f"num_classes must lie in [2, {_MAX_WIDTH}], got {self.num_classes}")
        for name, widths in (("hidden", self.hidden), ("channels", self.channels)):
            if any(w < 1 or w > _MAX_WIDTH for w in widths):
                raise ValueError(f"{name} widths must lie in [1, {_MAX_WIDTH}], got {widths}")
        if not isinstance(self.extra, dict) or not all(isinstance(k, str) for k in self.extra):
            raise ValueError("extra must be a JSON object")
        if self.kind == "cnn":
            if len(self.input_shape) != 3:
                raise ValueError(f"cnn needs input_shape (C, H, W), got {self.input_shape}")
            if not self.channels:
                raise ValueError("cnn needs at least one entry in channels")
            h, w = self.input_shape[1:]
            if h >> len(self.channels) < 1 or w >> len(self.channels) < 1:
                raise ValueError(
                    f"{len(self.channels)} pooling stages shrink {h}x{w} inputs to nothing"
                )
        # Each section belongs to a model family (shared/models/families.py), which validates
        # it; an unknown key names the installed families.
        parse_families(self.extra)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace): equal specs give equal strings."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> ArchSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"architecture spec is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> ArchSpec:
        if not isinstance(data, dict):
            raise ValueError("architecture spec must be a JSON object")
        allowed = {"kind", "input_shape", "num_classes", "hidden", "channels", "extra"}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"architecture spec has unknown keys {sorted(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"architecture spec is incomplete: {exc}") from exc


def default_spec(kind: str, input_shape: tuple[int, ...], num_classes: int) -> ArchSpec:
    """The default network of each kind for an input shape (used by the fleet and benchmarks)."""
    if kind == "mlp":
        return ArchSpec("mlp", input_shape, num_classes, hidden=(512, 512))
    if kind == "cnn":
        return ArchSpec("cnn", input_shape, num_classes, hidden=(256,), channels=(32, 64, 128))
    raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
