"""Installed models on disk, arranged so that a crash at any point leaves a valid model.

Layout under ``root``::

    models/<model_hash>.safetensors   full-model artefacts (shared.artefacts.encode_full_model)
    current.json                      {"model_hash", "previous_hash", "installed_at"}
    model-hash-v2                     marker: every model file here is named by its v2 hash
    rekeyed-v1.json                   {"<v1 hash>": "<v2 hash>"} of models re-keyed on upgrade

The pointer is the commit point (RAUC's "mark active last"): :meth:`ModelStore.install`
writes the model file first (temp file, fsync, ``os.replace``, fsync of the directory) and
only then replaces ``current.json`` the same way. A crash before the pointer switch leaves
the old model active plus, at worst, a stray temp file or an unused model file; a crash after
it leaves the new one active. Every load re-verifies the model hash (``decode_artefact``), so
a model file corrupted later on the SD card is detected, and :meth:`current` falls back to
the previous model instead of running garbage.

Upgrade from the v1 model hash (tensors only; v2 covers the architecture, docs/protocol.md):
a store without the ``model-hash-v2`` marker is re-keyed when opened. Each file that verifies
under its v1 name is rewritten under its v2 hash (parent translated), the v1 -> v2 map is
written, the pointer is translated (the commit point), the v1 files are removed and the marker
written, each step durable (:func:`edge_agent.download.atomic_write`). A crash anywhere redoes
the idempotent steps at the next open; the running model is never treated as corrupt.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from edge_agent.download import atomic_write, fsync_dir
from shared.artefacts import (
    DEFAULT_MAX_PARAMETERS,
    FULL_MODEL_ENCODING,
    ArtefactError,
    LegacyFullModel,
    decode_artefact,
    decode_v1_full_model,
    encode_full_model,
)
from shared.models import ArchSpec, build_model, model_hash

logger = logging.getLogger(__name__)

_HASH = re.compile(r"^[0-9a-f]{64}$")
_MODEL_SUFFIX = ".safetensors"
_TMP_MARK = ".tmp-"  # see edge_agent.download.atomic_write
V2_MARKER = "model-hash-v2"
REKEY_MAP = "rekeyed-v1.json"


class ModelStoreError(ValueError):
    """A model cannot be installed or loaded (hash mismatch, missing, corrupt)."""


@dataclass(frozen=True)
class InstalledModel:
    model_hash: str
    arch: ArchSpec
    state: dict[str, torch.Tensor]
    path: Path


def _check_hash(value: str) -> str:
    if not isinstance(value, str) or not _HASH.match(value):
        raise ModelStoreError(f"model hash must be 64 lowercase hex digits, got {value!r}")
    return value


def _check_matches_arch(arch: ArchSpec, state: dict[str, torch.Tensor]) -> None:
    """Refuse a state that would not load into ``build_model(arch)``: caught at install time
    rather than when the runner first loads it after a reboot."""
    with torch.device("meta"):  # shapes only: no memory, no init cost on the device
        reference = build_model(arch).state_dict()
    if reference.keys() != state.keys():
        missing, extra = (
            sorted(reference.keys() - state.keys()),
            sorted(state.keys() - reference.keys()),
        )
        raise ModelStoreError(
            f"state does not fit {arch.kind} architecture: missing {missing}, unexpected {extra}"
        )
    for name, ref in reference.items():
        t = state[name]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise ModelStoreError(
                f"tensor {name!r} is {t.dtype}{list(t.shape)}, the architecture needs "
                f"{ref.dtype}{list(ref.shape)}"
            )


def _locked(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


class ModelStore:
    """Content-addressed model files plus an atomically switched ``current.json`` pointer.

    One store per root per process; methods that switch the pointer or delete files hold a
    lock, so an install and a gc from different threads cannot interleave.
    """

    def __init__(self, root: Path, *, max_parameters: int = DEFAULT_MAX_PARAMETERS) -> None:
        self.root = Path(root)
        # The same bound the updater applies, so a model installed under a raised limit reloads.
        self.max_parameters = max_parameters
        self.models_dir = self.root / "models"
        self.pointer_path = self.root / "current.json"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        # v1 hash -> v2 hash of the models re-keyed here, for the agent's other state files.
        self.rekeyed: dict[str, str] = self._upgrade_identity()

    def model_path(self, model_hash_: str) -> Path:
        return self.models_dir / f"{_check_hash(model_hash_)}{_MODEL_SUFFIX}"

    # -- pointer ---------------------------------------------------------------------------

    def _read_pointer(self) -> dict | None:
        """The pointer, None if absent; raises ModelStoreError if unreadable."""
        try:
            raw = self.pointer_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not an object")
            _check_hash(data["model_hash"])
            if data.get("previous_hash") is not None:
                _check_hash(data["previous_hash"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise ModelStoreError(f"{self.pointer_path} is corrupt: {exc}") from exc
        return data

    def _write_pointer(self, current: str, previous: str | None) -> None:
        data = {"model_hash": current, "previous_hash": previous, "installed_at": time.time()}
        atomic_write(self.pointer_path, json.dumps(data, sort_keys=True).encode())

    def current_hash(self) -> str | None:
        """The active model's hash from the pointer alone (no verification); None if unset."""
        try:
            pointer = self._read_pointer()
        except ModelStoreError:
            return None
        return None if pointer is None else pointer["model_hash"]

    def previous_hash(self) -> str | None:
        try:
            pointer = self._read_pointer()
        except ModelStoreError:
            return None
        return None if pointer is None else pointer.get("previous_hash")

    # -- install / load --------------------------------------------------------------------

    @_locked
    def install(self, arch: ArchSpec, state: dict[str, torch.Tensor], *, expected_hash: str) -> str:
        """Write ``state`` as a full-model artefact and make it current; returns its hash.

        Refuses (before writing anything) a state whose hash is not ``expected_hash``: the
        hash the server announced is the only name the fleet knows the model by.
        """
        _check_hash(expected_hash)
        actual = model_hash(arch, state)
        if actual != expected_hash:
            raise ModelStoreError(
                f"refusing to install: state hashes to {actual[:16]}, expected {expected_hash[:16]}"
            )
        _check_matches_arch(arch, state)
        previous = self.current_hash()
        if previous == actual:  # re-installing the active model: nothing to switch
            if self._valid(actual):
                return actual
            previous = self.previous_hash()
        if previous is not None and not self._valid(previous):
            previous = None  # only record a model we could actually roll back to
        path = self.model_path(actual)
        # Idempotent: an intact copy from an interrupted earlier install is reused.
        if not self._valid(actual):
            data, digest = encode_full_model(arch, state, parent_hash=previous)
            assert digest == actual
            atomic_write(path, data)
        self._write_pointer(actual, previous if previous != actual else None)
        logger.info("installed model %s (previous %s)", actual[:16], (previous or "none")[:16])
        return actual

    def has(self, model_hash_: str) -> bool:
        """Whether a file for this model exists (cheap; :meth:`load` verifies)."""
        return self.model_path(model_hash_).is_file()

    def load(self, model_hash_: str) -> InstalledModel:
        """Read and verify one model. Raises :class:`ModelStoreError` if missing or corrupt."""
        path = self.model_path(model_hash_)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise ModelStoreError(f"model {model_hash_[:16]} is not installed") from exc
        try:
            decoded = decode_artefact(data, encoding=FULL_MODEL_ENCODING,
                                      max_parameters=self.max_parameters)
        except ArtefactError as exc:
            raise ModelStoreError(f"model file {path} is corrupt: {exc}") from exc
        if decoded.model_hash != model_hash_ or decoded.arch is None:
            raise ModelStoreError(
                f"model file {path} holds model {decoded.model_hash[:16]}, not {model_hash_[:16]}"
            )
        return InstalledModel(decoded.model_hash, decoded.arch, dict(decoded.state), path)

    def _valid(self, model_hash_: str) -> bool:
        try:
            self.load(model_hash_)
        except ModelStoreError:
            return False
        return True

    @_locked
    def current(self) -> InstalledModel | None:
        """The active model, verified; falls back (and repairs the pointer) if it is broken.

        Order: the pointer's model, then its previous model, then (if the pointer itself is
        unreadable) the newest model file that verifies. None if nothing valid exists: the
        agent then has to fetch a model from the server.
        """
        try:
            pointer = self._read_pointer()
        except ModelStoreError as exc:
            logger.warning("%s; looking for the newest valid model file", exc)
            return self._recover_from_files()
        if pointer is None:
            return None
        current, previous = pointer["model_hash"], pointer.get("previous_hash")
        try:
            return self.load(current)
        except ModelStoreError as exc:
            logger.warning("active model unusable (%s); falling back to previous", exc)
        if previous is not None:
            try:
                model = self.load(previous)
            except ModelStoreError as exc:
                logger.warning("previous model unusable too (%s)", exc)
            else:
                self._write_pointer(previous, None)
                logger.warning("switched to previous model %s", previous[:16])
                return model
        return self._recover_from_files(exclude={current, previous})

    def _recover_from_files(self, exclude: Collection[str | None] = ()) -> InstalledModel | None:
        for path in sorted(self._model_files(), key=lambda p: p.stat().st_mtime, reverse=True):
            h = path.name.removesuffix(_MODEL_SUFFIX)
            if h in exclude:
                continue
            try:
                model = self.load(h)
            except ModelStoreError as exc:
                logger.warning("skipping %s", exc)
                continue
            self._write_pointer(h, None)
            logger.warning("recovered: model %s is now active", h[:16])
            return model
        logger.warning("no valid installed model in %s", self.models_dir)
        return None

    @_locked
    def rollback(self) -> str:
        """Make the previous model current again; returns its hash.

        The model rolled back from is not kept as "previous": rolling back twice must not
        re-activate the model that was just rejected. Raises :class:`ModelStoreError` if there
        is no valid previous model.
        """
        pointer = self._read_pointer()
        previous = None if pointer is None else pointer.get("previous_hash")
        if previous is None:
            raise ModelStoreError("nothing to roll back to: no previous model recorded")
        self.load(previous)  # verify before switching
        self._write_pointer(previous, None)
        logger.warning("rolled back from %s to %s", pointer["model_hash"][:16], previous[:16])
        return previous

    @_locked
    def activate(self, model_hash_: str) -> InstalledModel:
        """Make an installed model current (verified first; atomic pointer switch) and return it.

        Idempotent, unlike :meth:`rollback`, so an interrupted rollback can simply be redone.
        No previous model is recorded: the model switched away from was rejected.
        """
        model = self.load(model_hash_)
        if self.current_hash() != model_hash_:
            self._write_pointer(model_hash_, None)
            logger.warning("activated model %s", model_hash_[:16])
        return model

    # -- v1 -> v2 model hash upgrade -------------------------------------------------------

    def _read_rekey_map(self) -> dict[str, str]:
        path = self.root / REKEY_MAP
        try:
            data = json.loads(path.read_bytes())
            if not isinstance(data, dict):
                raise ValueError("not an object")
            return {_check_hash(k): _check_hash(v) for k, v in data.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            logger.warning("%s is unreadable (%s); v1 hashes in other state files stay", path, exc)
            return {}

    def _upgrade_identity(self) -> dict[str, str]:
        """Re-key models stored under the v1 hash (see the module doc); returns v1 -> v2."""
        mapping = self._read_rekey_map()
        marker = self.root / V2_MARKER
        if marker.exists():
            return mapping
        legacy: list[tuple[Path, LegacyFullModel]] = []
        for path in sorted(self._model_files(), key=lambda p: p.stat().st_mtime):
            try:
                old = decode_v1_full_model(path.read_bytes(), max_parameters=self.max_parameters)
            except (OSError, ArtefactError):
                continue  # already v2, or corrupt: load() judges it like any other file
            if old.v1_hash == path.name.removesuffix(_MODEL_SUFFIX):
                legacy.append((path, old))
                mapping[old.v1_hash] = old.decoded.model_hash
        for path, old in legacy:  # oldest first, keeping mtimes: recovery and gc order by them
            d = old.decoded
            assert d.arch is not None
            parent = mapping.get(d.parent_hash) if d.parent_hash else None
            data, digest = encode_full_model(d.arch, d.state, parent_hash=parent, extra=d.meta)
            new_path = self.model_path(digest)
            atomic_write(new_path, data)
            st = path.stat()
            os.utime(new_path, ns=(st.st_atime_ns, st.st_mtime_ns))
        if legacy:
            atomic_write(self.root / REKEY_MAP, json.dumps(mapping, sort_keys=True).encode())
            try:
                pointer = self._read_pointer()
            except ModelStoreError:
                pointer = None  # current() recovers from the (re-keyed) files
            if pointer is not None:
                cur, prev = pointer["model_hash"], pointer.get("previous_hash")
                self._write_pointer(mapping.get(cur, cur), mapping.get(prev, prev) if prev else None)
            for path, _ in legacy:
                path.unlink(missing_ok=True)
            fsync_dir(self.models_dir)
            logger.warning("re-keyed %d models from the v1 to the v2 model hash", len(legacy))
        atomic_write(marker, b"2\n")
        return mapping

    # -- housekeeping ----------------------------------------------------------------------

    def _model_files(self) -> list[Path]:
        return [
            p
            for p in self.models_dir.iterdir()
            if p.name.endswith(_MODEL_SUFFIX) and _HASH.match(p.name.removesuffix(_MODEL_SUFFIX))
        ]

    def installed(self) -> list[str]:
        """Hashes with a model file on disk (unverified)."""
        return sorted(p.name.removesuffix(_MODEL_SUFFIX) for p in self._model_files())

    @_locked
    def gc(self, keep: int = 2, discard: Collection[str] = ()) -> list[str]:
        """Delete old models, keeping the current one, the previous one and the newest others
        up to ``keep`` in total; also removes temp files left by interrupted writes.

        Models in ``discard`` (rolled back here, never installed again) are deleted unless
        the pointer names them, so they do not take the place of a model worth keeping.
        Returns the deleted hashes.
        """
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (the current model is never deleted), got {keep}")
        try:
            pointer = self._read_pointer() or {}
        except ModelStoreError:
            logger.warning("gc skipped: the model pointer is unreadable")
            return []
        protected = [h for h in (pointer.get("model_hash"), pointer.get("previous_hash")) if h]
        protected = protected[:keep]
        dropped = set(discard)
        others = sorted(
            (p for p in self._model_files() if p.name.removesuffix(_MODEL_SUFFIX) not in protected),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        deleted = []
        kept = [p for p in others if p.name.removesuffix(_MODEL_SUFFIX) not in dropped]
        surplus = kept[max(0, keep - len(protected)) :]
        for path in [p for p in others if p not in kept] + surplus:
            path.unlink(missing_ok=True)
            deleted.append(path.name.removesuffix(_MODEL_SUFFIX))
        for directory in (self.models_dir, self.root):
            for tmp in directory.glob(f"*{_TMP_MARK}*"):
                tmp.unlink(missing_ok=True)
        if deleted:
            fsync_dir(self.models_dir)
            logger.info("gc removed %d old models", len(deleted))
        return deleted
