"""The learner seam: how a device turns its own labelled data into a *personal model*.

A learner adapts the fleet (base) model to one device's world. What it produces is a
:class:`PersonalDelta`: named tensors that replace base tensors of the same name or add new
ones, JSON meta, and, only if the learner changes the network's structure, the
:class:`ArchSpec` to serve (p-Meta may grow the classifier for new classes, DA³ adds adaptor
modules beside a frozen backbone: both then name an arch whose ``build_model`` has those
tensors). The served state is ``apply(arch, base_state, delta)``; the default overlays the
delta on the base, which covers both cases above. The base itself is never modified and never
leaves the device with the delta: a personal artefact names its base by hash only.

Implementations register with :func:`register_learner`; the agent picks one by name.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from shared.models import ArchSpec, build_model
from shared.tensors import StateDict

LEARNER_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}\Z")  # also names files on the device (\Z: no "\n")


class LearnerError(ValueError):
    """A learner was misused: unknown name, bad config, data that does not fit the model."""


class LearnerRefused(LearnerError):
    """The learner cannot adapt this model on this device now (unsupported family, memory
    budget too small, ...); ``reason`` says why, for status pages and heartbeats."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class LearnerConfig:
    """Base of every learner's config: a frozen dataclass of JSON scalars, validated when
    built. Subclasses add fields (with defaults) and check them in ``validate``."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, want = getattr(self, f.name), hints[f.name]
            object.__setattr__(self, f.name, _coerce(f.name, value, want))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`LearnerError` naming the bad field (ranges, relations)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LearnerConfig:
        if not isinstance(data, Mapping):
            raise LearnerError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise LearnerError(f"{cls.__name__} has no fields {unknown}; known: {sorted(names)}")
        return cls(**data)


def _coerce(name: str, value: Any, want: Any) -> Any:
    """Exact JSON-scalar typing: refuse ``"3"`` or ``2.5`` for an int rather than guessing."""
    if isinstance(want, types.UnionType) or typing.get_origin(want) is typing.Union:
        if value is None and type(None) in typing.get_args(want):
            return None
        want = next(a for a in typing.get_args(want) if a is not type(None))
    if want is bool:
        if not isinstance(value, bool):
            raise LearnerError(f"{name} must be true or false, got {value!r}")
        return value
    if want is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise LearnerError(f"{name} must be an integer, got {value!r}")
        return int(value)
    if want is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise LearnerError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if want is str:
        if not isinstance(value, str):
            raise LearnerError(f"{name} must be a string, got {value!r}")
        return value
    raise LearnerError(f"config field {name} has a type ({want}) a learner config cannot hold")


@dataclass(frozen=True)
class PersonalDelta:
    """What an adaptation produced. ``tensors`` replace (same name) or add to the base state;
    ``arch`` is the spec to serve when the learner changed the structure (None: the base's);
    ``meta`` is JSON the learner wants kept with the artefact (training loss, class names...)."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    arch: ArchSpec | None = None

    def __post_init__(self) -> None:
        if not self.tensors:
            raise LearnerError("a personal delta needs at least one tensor")
        for name, t in self.tensors.items():
            if not isinstance(name, str) or not name or not isinstance(t, torch.Tensor):
                raise LearnerError(f"delta entry {name!r} is not a named tensor")


class Learner(ABC):
    """One way to adapt a base model locally. Stateless: everything it needs comes in the
    call, so one instance serves every base version. Subclasses set ``name`` (a
    :data:`LEARNER_NAME`) and ``config_type`` and implement :meth:`adapt`."""

    name: ClassVar[str]
    config_type: ClassVar[type[LearnerConfig]] = LearnerConfig

    @abstractmethod
    def adapt(self, arch: ArchSpec, base_state: StateDict, x: np.ndarray, y: np.ndarray,
              config: LearnerConfig) -> PersonalDelta:
        """Learn from ``(x, y)`` (inputs as the runner gets them, integer labels) starting at
        ``base_state``, which must not be modified. Raises :class:`LearnerRefused` when it
        cannot run here (the reason is reported), :class:`LearnerError` on bad input."""

    def apply(self, arch: ArchSpec, base_state: StateDict, delta: PersonalDelta
              ) -> dict[str, torch.Tensor]:
        """The state to serve: the base overlaid with the delta's tensors. Checked against
        ``build_model(served_arch(...))`` so a delta that does not fit fails here, not in the
        runner."""
        served = {**base_state, **delta.tensors}
        check_fits(self.served_arch(arch, delta), served)
        return served

    def served_arch(self, arch: ArchSpec, delta: PersonalDelta) -> ArchSpec:
        return delta.arch if delta.arch is not None else arch

    def parse_config(self, data: Mapping[str, Any] | LearnerConfig | None) -> LearnerConfig:
        if data is None:
            return self.config_type()
        if isinstance(data, LearnerConfig):
            if not isinstance(data, self.config_type):
                raise LearnerError(f"learner {self.name} needs a {self.config_type.__name__}, "
                                   f"got {type(data).__name__}")
            return data
        return self.config_type.from_dict(data)


def check_local_data(arch: ArchSpec, x: np.ndarray, y: np.ndarray, classes: int | None = None,
                     what: str = "inputs") -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` as arrays, or :class:`LearnerError`: matching non-empty inputs of the model's
    input shape and integer labels in ``[0, classes)`` (default: the model's class count)."""
    x, y = np.asarray(x), np.asarray(y)
    if len(x) == 0 or len(x) != len(y):
        raise LearnerError(f"need matching non-empty inputs and labels, got {len(x)} and {len(y)}")
    if tuple(x.shape[1:]) != arch.input_shape:
        raise LearnerError(f"{what} are {tuple(x.shape[1:])}, the model takes {arch.input_shape}")
    k = arch.num_classes if classes is None else classes
    if y.dtype.kind not in "iu" or y.min() < 0 or y.max() >= k:
        raise LearnerError(f"labels must be integers in [0, {k})")
    return x, y


def check_training_fields(epochs: int, lr: float, batch_size: int, seed: int) -> None:
    """The ranges every learner config shares for its training fields."""
    if not 1 <= epochs <= 1000:
        raise LearnerError(f"epochs must lie in [1, 1000], got {epochs}")
    if not 0 < lr <= 1:
        raise LearnerError(f"lr must lie in (0, 1], got {lr}")
    if not 1 <= batch_size <= 4096:
        raise LearnerError(f"batch_size must lie in [1, 4096], got {batch_size}")
    if seed < 0:
        raise LearnerError("seed must be >= 0")


def check_fits(arch: ArchSpec, state: StateDict) -> None:
    """Raise :class:`LearnerError` unless ``state`` has exactly the tensors of ``arch``."""
    with torch.device("meta"):  # shapes and dtypes only
        want = {k: (tuple(v.shape), v.dtype) for k, v in build_model(arch).state_dict().items()}
    got = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    if got != want:
        bad = sorted(k for k in got.keys() | want.keys() if got.get(k) != want.get(k))
        raise LearnerError(f"personal state does not fit the served architecture: {bad[:4]}")


_LEARNERS: dict[str, type[Learner]] = {}


def register_learner(cls: type[Learner]) -> type[Learner]:
    """Class decorator: make ``cls`` available to :func:`make_learner` under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not LEARNER_NAME.match(name):
        raise LearnerError(f"learner name must match {LEARNER_NAME.pattern}, got {name!r}")
    if _LEARNERS.get(name, cls) is not cls:
        raise LearnerError(f"a different learner is already registered as {name!r}")
    _LEARNERS[name] = cls
    return cls


def learner_names() -> list[str]:
    return sorted(_LEARNERS)


def make_learner(name: str) -> Learner:
    try:
        return _LEARNERS[name]()
    except KeyError:
        raise LearnerError(f"unknown learner {name!r}; known: {learner_names()}") from None
