"""Personal models on disk, beside the fleet models and never uploaded.

Layout under ``root``, the same root as :class:`ModelStore` (the agent's is
``data_dir/models``), so personal models sit in the fleet models' own directory::

    models/personal/<base_hash>.<learner>.safetensors    personal/v1 artefacts

One file per (base, learner): deriving again for the same base replaces it. Writes go through
:func:`edge_agent.download.atomic_write` (temp file, fsync, rename, directory fsync), so a crash
leaves the old file or the new one, plus at worst a ``*.tmp-<pid>`` file that every read
ignores and :meth:`PersonalStore.gc` removes. Every load re-verifies the artefact
(:func:`shared.personal.decode_personal`); a file that fails is deleted and reported as absent,
so the learner re-derives it from the local data instead of serving garbage.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Collection
from pathlib import Path

from edge_agent.download import atomic_write, fsync_dir
from shared.personal import PersonalArtefact, PersonalFormatError, decode_personal
from shared.personal.learner import LEARNER_NAME

log = logging.getLogger(__name__)

_SUFFIX = ".safetensors"
_NAME = re.compile(r"^([0-9a-f]{64})\.([a-z][a-z0-9_-]{0,31})\.safetensors$")
_TMP_MARK = ".tmp-"  # see edge_agent.download.atomic_write


class PersonalStoreError(ValueError):
    """A personal model cannot be stored as asked (bad name, bytes that do not verify)."""


class PersonalStore:
    """Verified personal artefacts keyed by (base hash, learner name); thread-safe."""

    def __init__(self, root: Path) -> None:
        self.dir = Path(root) / "models" / "personal"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.discarded = 0  # corrupt files deleted by load (a metric)

    def path(self, base_hash: str, learner: str) -> Path:
        name = f"{base_hash}.{learner}{_SUFFIX}"
        if not _NAME.match(name) or not LEARNER_NAME.match(learner):
            raise PersonalStoreError(f"bad personal model key ({base_hash!r}, {learner!r})")
        return self.dir / name

    def put(self, data: bytes) -> PersonalArtefact:
        """Verify ``data`` and store it under the base and learner it names."""
        try:
            artefact = decode_personal(data)
        except PersonalFormatError as exc:
            raise PersonalStoreError(f"refusing to store an invalid personal model: {exc}") from exc
        path = self.path(artefact.base_hash, artefact.learner)
        with self._lock:
            atomic_write(path, data)
        log.info("stored personal model %s for base %s (%s)", artefact.personal_hash[:12],
                 artefact.base_hash[:12], artefact.learner)
        return artefact

    def load(self, base_hash: str, learner: str) -> PersonalArtefact | None:
        """The verified personal model for this base and learner; None if absent or corrupt
        (a corrupt file is deleted, so the caller re-derives)."""
        path = self.path(base_hash, learner)
        with self._lock:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                return None
            try:
                return decode_personal(data, base_hash=base_hash, learner=learner)
            except PersonalFormatError as exc:
                log.warning("personal model %s is corrupt (%s); deleting it", path.name, exc)
                path.unlink(missing_ok=True)
                fsync_dir(self.dir)
                self.discarded += 1
                return None

    def delete(self, base_hash: str, learner: str) -> bool:
        path = self.path(base_hash, learner)
        with self._lock:
            existed = path.exists()
            path.unlink(missing_ok=True)
            if existed:
                fsync_dir(self.dir)
        return existed

    def entries(self) -> list[tuple[str, str]]:
        """``(base_hash, learner)`` of every stored file (unverified; temp files excluded)."""
        out = []
        for p in self.dir.iterdir():
            m = _NAME.match(p.name)
            if m and p.is_file():
                out.append((m.group(1), m.group(2)))
        return sorted(out)

    def gc(self, keep_bases: Collection[str]) -> list[tuple[str, str]]:
        """Delete personal models whose base is not in ``keep_bases`` and leftover temp files;
        returns the deleted keys."""
        keep = set(keep_bases)
        deleted = []
        with self._lock:
            for p in self.dir.iterdir():
                m = _NAME.match(p.name)
                if m and m.group(1) not in keep:
                    p.unlink(missing_ok=True)
                    deleted.append((m.group(1), m.group(2)))
                elif _TMP_MARK in p.name:
                    p.unlink(missing_ok=True)
            if deleted:
                fsync_dir(self.dir)
        if deleted:
            log.info("gc removed %d personal models", len(deleted))
        return sorted(deleted)
