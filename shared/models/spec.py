"""The JSON architecture spec that travels with every model artefact."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any

from shared.models.families import parse_families

KINDS = ("mlp", "cnn", "conv4", "resnet")
# Structural bounds, checked on construction: a spec arrives as JSON inside an artefact, and
# everything built from it (a meta-device build included) must stay cheap before any cap on
# its size (shared.artefacts.check_arch_bounds) has been checked.
_MAX_WIDTH = 1 << 16  # per width, class count and input dimension
MAX_HIDDEN_LAYERS = 64
MAX_CONV_STAGES = 16  # 2x2 pooling: 16 stages already shrink a 65536-wide input to 1
MAX_INPUT_ELEMENTS = 1 << 24
MAX_RESNET_BLOCKS = 16  # basic blocks per resnet stage
MAX_SPEC_JSON_BYTES = 8192  # canonical JSON; bounds family sections (e.g. DRESS subnets) too


@dataclass(frozen=True)
class ArchSpec:
    """Which network to build. Validated on construction, so a bad spec never reaches torch.

    ``mlp``: flatten -> Linear/ReLU per ``hidden`` width -> Linear(num_classes) (the thesis's
    DPU MLP is ``hidden=(512, 512)`` on 784 inputs).
    ``cnn``: per entry of ``channels`` a stage of two conv3x3-BN-ReLU blocks and a 2x2 max-pool
    (a VGG-small scaled to 28x28), then Linear/BN/ReLU per ``hidden`` width, then the classifier.
    ``conv4``: per entry of ``hidden`` a block [conv3x3 (bias), GroupNorm, ReLU, 2x2 max-pool],
    then one Linear(num_classes): the few-shot "4Conv" backbone of thesis §4.6.2 with group
    normalisation (§4.4.5.2; ``hidden=(32, 32, 32, 32)``); ``input_shape`` (C, H, W) or (H, W).
    ``resnet``: a basic-block residual network for 28x28-scale inputs (the DA³ supplementary's
    ResNet-26 configuration scaled down, docs/da3.md): a conv3x3-BN-ReLU stem of width
    ``channels[0]``, then per stage ``s`` ``hidden[s]`` basic blocks of width ``channels[s]``
    (the first block of every stage after the first has stride 2), global average pooling and
    one Linear(num_classes). ``channels=(16, 32, 64), hidden=(2, 2, 2)`` is the default (14
    layers); ``hidden=(4, 4, 4)`` is the 26-layer depth. ``input_shape`` (C, H, W) or (H, W).
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
        if math.prod(self.input_shape) > MAX_INPUT_ELEMENTS:
            raise ValueError(f"input_shape {self.input_shape} exceeds {MAX_INPUT_ELEMENTS} elements")
        if len(self.hidden) > MAX_HIDDEN_LAYERS or len(self.channels) > MAX_CONV_STAGES:
            raise ValueError(
                f"at most {MAX_HIDDEN_LAYERS} hidden layers and {MAX_CONV_STAGES} conv stages, "
                f"got {len(self.hidden)} and {len(self.channels)}"
            )
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
        if self.kind == "conv4":
            if len(self.input_shape) not in (2, 3) or not self.hidden or self.channels:
                raise ValueError(
                    "conv4 needs input_shape (C, H, W) or (H, W), block widths in hidden and no "
                    f"channels; got {self.input_shape}, {self.hidden}, {self.channels}"
                )
            if len(self.hidden) > MAX_CONV_STAGES:
                raise ValueError(f"conv4 takes at most {MAX_CONV_STAGES} blocks, got {len(self.hidden)}")
            h, w = self.input_shape[-2:]
            if h >> len(self.hidden) < 1 or w >> len(self.hidden) < 1:
                raise ValueError(f"{len(self.hidden)} pooling blocks shrink {h}x{w} inputs to nothing")
        if self.kind == "resnet":
            if len(self.input_shape) not in (2, 3) or not self.channels or len(self.hidden) != len(self.channels):
                raise ValueError(
                    "resnet needs input_shape (C, H, W) or (H, W), stage widths in channels and "
                    f"as many block counts in hidden; got {self.input_shape}, {self.channels}, {self.hidden}"
                )
            if any(b > MAX_RESNET_BLOCKS for b in self.hidden):
                raise ValueError(f"resnet stages take at most {MAX_RESNET_BLOCKS} blocks, got {self.hidden}")
            h, w = self.input_shape[-2:]
            if h >> (len(self.channels) - 1) < 1 or w >> (len(self.channels) - 1) < 1:
                raise ValueError(f"{len(self.channels)} stages shrink {h}x{w} inputs to nothing")
        try:
            size = len(self.to_json())
        except (TypeError, ValueError, RecursionError) as exc:  # NaN, or not plain JSON
            raise ValueError(f"extra must be plain JSON: {exc}") from exc
        if size > MAX_SPEC_JSON_BYTES:
            raise ValueError(f"architecture spec of {size} bytes exceeds {MAX_SPEC_JSON_BYTES}")
        # Each section belongs to a model family (shared/models/families.py), which validates
        # it; an unknown key names the installed families.
        parse_families(self.extra)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace): equal specs give equal strings."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> ArchSpec:
        if len(text) > 4 * MAX_SPEC_JSON_BYTES:  # whitespace allowed, but not without end
            raise ValueError(f"architecture spec of {len(text)} bytes is too long")
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
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
        except (OverflowError, RecursionError) as exc:  # e.g. a 400-digit integer in a section
            raise ValueError(f"architecture spec holds an out-of-range value: {exc}") from exc


def parameter_count(spec: ArchSpec) -> int:
    """State-dict elements (parameters and buffers) of the backbone :func:`build_model` builds
    for ``spec``, computed from the widths alone (no torch, no allocation); model families'
    tensors are not included. Exact for a spec without ``extra``."""
    def linear(n_in: int, n_out: int, bias: bool = True) -> int:
        return n_in * n_out + (n_out if bias else 0)

    def norm(width: int) -> int:  # weight, bias, running mean and variance, batch counter
        return 4 * width + 1

    total = 0
    if spec.kind == "resnet":  # convs without bias, each followed by a BatchNorm2d
        c = conv4_input_shape(spec)[0]
        total += 9 * c * spec.channels[0] + norm(spec.channels[0])  # stem
        c = spec.channels[0]
        for s, (width, blocks) in enumerate(zip(spec.channels, spec.hidden, strict=True)):
            for b in range(blocks):
                total += 9 * c * width + norm(width) + 9 * width * width + norm(width)
                if resnet_stride(s, b) != 1 or c != width:  # 1x1 projection shortcut
                    total += c * width + norm(width)
                c = width
        return total + linear(c, spec.num_classes)
    if spec.kind == "conv4":  # conv3x3 with bias + GroupNorm (weight, bias) per block
        c, h, w = conv4_input_shape(spec)
        for out in spec.hidden:
            total += 9 * c * out + out + 2 * out
            c, h, w = out, h // 2, w // 2
        return total + linear(c * h * w, spec.num_classes)
    if spec.kind == "mlp":
        width = math.prod(spec.input_shape)
        for h in spec.hidden:
            total += linear(width, h)
            width = h
    else:  # cnn: two conv3x3 (no bias) + BatchNorm2d per stage, then Linear(no bias) + BN1d
        c, h, w = spec.input_shape
        for out in spec.channels:
            total += 9 * c * out + norm(out) + 9 * out * out + norm(out)
            c, h, w = out, h // 2, w // 2
        width = c * h * w
        for hid in spec.hidden:
            total += linear(width, hid, bias=False) + norm(hid)
            width = hid
    return total + linear(width, spec.num_classes)


def conv4_input_shape(spec: ArchSpec) -> tuple[int, int, int]:
    """(C, H, W) of a ``conv4`` spec (an (H, W) input has one channel)."""
    shape = spec.input_shape
    return (1, shape[0], shape[1]) if len(shape) == 2 else (shape[0], shape[1], shape[2])


def resnet_stride(stage: int, block: int) -> int:
    """Stride of block ``block`` of stage ``stage`` of a ``resnet``: 2 for the first block of
    every stage after the first, else 1."""
    return 2 if stage > 0 and block == 0 else 1


def conv4_groups(width: int) -> int:
    """GroupNorm groups of a ``conv4`` block of ``width`` channels: the largest divisor of
    ``width`` up to 8 (8 groups of 4 channels for the thesis's 32)."""
    return max(g for g in range(1, min(8, width) + 1) if width % g == 0)


def default_spec(kind: str, input_shape: tuple[int, ...], num_classes: int) -> ArchSpec:
    """The default network of each kind for an input shape (used by the fleet and benchmarks)."""
    if kind == "mlp":
        return ArchSpec("mlp", input_shape, num_classes, hidden=(512, 512))
    if kind == "cnn":
        return ArchSpec("cnn", input_shape, num_classes, hidden=(256,), channels=(32, 64, 128))
    if kind == "conv4":
        return ArchSpec("conv4", input_shape, num_classes, hidden=(32, 32, 32, 32))
    if kind == "resnet":
        return ArchSpec("resnet", input_shape, num_classes, hidden=(2, 2, 2), channels=(16, 32, 64))
    raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
