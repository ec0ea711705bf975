"""Model families: extensions of a plain backbone, each owning one key of ``ArchSpec.extra``.

A family (DRESS now; p-Meta and DA³ next) says how its spec section is validated, which
modules or buffers it adds to a freshly built backbone, how those are initialised from a seed,
what the family optimises (its :class:`~shared.objectives.Objective`) and what a device runs
(its inference engine). ``shared.models`` names no family: families register here, either
explicitly (:func:`register_family`) or, for installed packages, through the entry-point
group ``edgeloop.model_families`` (``pyproject.toml``: ``dress = "shared.dress.family:FAMILY"``),
loaded the first time a spec names a family not registered yet.

A plain model is a spec without family sections: it trains with cross-entropy and runs as its
torch module.
"""

from __future__ import annotations

import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from importlib import metadata
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:  # types only: shared.objectives builds on this module
    from shared.models.spec import ArchSpec
    from shared.objectives import Objective

ENTRY_POINT_GROUP = "edgeloop.model_families"
_NAME = re.compile(r"^[a-z][a-z0-9_]*\Z")

SpecT = TypeVar("SpecT")


class FamilyError(ValueError):
    """A model family is unknown, cannot be loaded, or was registered twice."""


class UnknownFamilyError(FamilyError):
    """``ArchSpec.extra`` names a family that is neither registered nor installed."""


class ModelFamily(ABC, Generic[SpecT]):
    """One model family. Subclass it, set ``name`` and register an instance.

    The family owns ``ArchSpec.extra[name]`` and, by default, every state-dict entry under
    ``"<name>."`` (the sub-module :meth:`attach` adds as ``model.<name>``). Override
    :meth:`owns` for a family whose tensors live elsewhere.

    Contract, in the order ``build_model`` / ``init_weights_from_seed`` call it:
    1. :meth:`parse` validates the section (raise a ``ValueError`` subclass that names the
       problem); it is called whenever an ``ArchSpec`` is constructed, so a bad spec never
       reaches torch.
    2. :meth:`attach` adds the family's modules/buffers to the backbone and returns the model
       (the same object, or a wrapper around it). It must be deterministic: server and device
       build the same state-dict layout from the same spec. It may run under
       ``torch.device("meta")`` (shape checks build models without memory).
    3. :meth:`init_from_seed` fills the tensors the family owns, after the generic seeded
       init has filled every other tensor (it skips the family's). It must depend only on
       ``(spec, seed)``: a device regenerates a re-initialised model from the seed alone, in
       any language, so random values come from :func:`shared.models.seedgen.uniform` under
       each tensor's own name, and the rule is documented in docs/seed-format.md §3.
    """

    name: ClassVar[str]

    def owns(self, key: str) -> bool:
        """Whether state-dict entry ``key`` belongs to this family (not the backbone)."""
        return key.startswith(self.name + ".")

    @abstractmethod
    def parse(self, section: Any) -> SpecT:
        """The typed spec of ``ArchSpec.extra[name]``; raises ValueError naming the problem."""

    @abstractmethod
    def attach(self, model: nn.Module, arch: ArchSpec, spec: SpecT) -> nn.Module:
        """Add the family's modules/buffers to a freshly built ``model``; returns the model."""

    @abstractmethod
    def init_from_seed(self, model: nn.Module, spec: SpecT, seed: int) -> None:
        """Initialise (in place) every tensor the family owns, from ``seed`` alone."""

    def objective(self, arch: ArchSpec, spec: SpecT) -> Objective | None:
        """What models of this family optimise (None: the plain cross-entropy objective)."""
        return None

    def inference_engine(self, arch: ArchSpec, spec: SpecT,
                         state: Mapping[str, torch.Tensor]) -> nn.Module | None:
        """What a device runs for ``state``: a module mapping model inputs to logits, or None
        to run the plain torch module built from the spec."""
        return None


_registry: dict[str, ModelFamily] = {}
_lock = threading.Lock()


F = TypeVar("F", bound=ModelFamily)


def register_family(family: F) -> F:
    """Make ``family`` available under ``family.name``; returns it. Registering the same
    object again is a no-op; another family under a taken name is refused."""
    name = getattr(family, "name", None)
    if not isinstance(family, ModelFamily) or not isinstance(name, str) or not _NAME.match(name):
        raise FamilyError(f"a model family must be a ModelFamily with a lower-case name, got {family!r}")
    with _lock:
        current = _registry.get(name)
        if current is not None and current is not family:
            raise FamilyError(f"model family {name!r} is already registered ({current!r})")
        _registry[name] = family
    return family


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def installed_families() -> list[str]:
    """Names of every family registered or installed (entry points), sorted."""
    return sorted(set(_registry) | set(_entry_points()))


def get_family(name: str) -> ModelFamily:
    """The family registered as ``name``, loading its entry point on first use."""
    family = _registry.get(name)
    if family is not None:
        return family
    ep = _entry_points().get(name)
    if ep is None:
        raise UnknownFamilyError(
            f"ArchSpec.extra names unknown model family {name!r}; installed families: "
            f"{installed_families() or 'none'}"
        )
    # Loaded outside _lock: the import may register the family itself (taking _lock), and
    # Python's import lock already serialises two threads loading the same module.
    try:
        family = ep.load()
    except Exception as exc:  # an installed but broken plug-in: say which one
        raise FamilyError(f"model family {name!r} ({ep.value}) failed to load: {exc}") from exc
    if not isinstance(family, ModelFamily) or family.name != name:
        raise FamilyError(f"entry point {name!r} ({ep.value}) is not a ModelFamily named {name!r}")
    return register_family(family)


def parse_families(extra: Mapping[str, Any]) -> list[tuple[ModelFamily, Any]]:
    """``(family, typed spec)`` for every family section of ``extra``, in key order. A
    section whose value is None is absent."""
    out = []
    for key in sorted(extra):
        if extra[key] is not None:
            family = get_family(key)
            out.append((family, family.parse(extra[key])))
    return out


def families_of(arch: ArchSpec) -> list[tuple[ModelFamily, Any]]:
    """``(family, typed spec)`` for every family section of ``arch`` (empty: a plain model)."""
    return parse_families(arch.extra)


def inference_engine(arch: ArchSpec, state: Mapping[str, torch.Tensor]) -> nn.Module | None:
    """What a device runs for ``state``: the first family engine offered, or None (run the
    plain module)."""
    for family, spec in families_of(arch):
        engine = family.inference_engine(arch, spec, state)
        if engine is not None:
            return engine
    return None
