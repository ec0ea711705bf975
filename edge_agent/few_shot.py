"""The few-shot support set: a few labelled samples of the device's *own* classes.

A user teaches the device new classes (p-Meta, docs/learner.md#p-meta-few-shot-new-classes)
by giving it a handful of labelled samples per class, two ways:

* a watched folder ``<data_dir>/few-shot/<class>/<file>`` (``.npy`` or an image; the same
  decoding as the folder input source, ``edge_agent.sources.load_input_file``);
* ``POST /few-shot`` on the local status endpoint (127.0.0.1 by default, like the rest of it)
  with ``{"class": "mug", "input": [[...]]}``; the sample is written into that folder as an
  ``.npy``, so the folder is the one place the support set lives.

Labels are the class names in sorted order (``0`` = the first name). The support set is read
by the learner service only: it never enters the upload queue or the local dataset, and no
code path uploads it (a test asserts the uploader never sees one of its samples).

:class:`SupportSet` gives the learner service what it reads from a data source (``added``,
``len``, ``recent``), rescanning the folder when asked: a listing and ``stat`` per file, the
files read again only when a name, size or modification time changed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.download import atomic_write, fsync_dir
from edge_agent.sources import (
    IMAGE_SUFFIXES,
    NPY_SUFFIX,
    BadInputFile,
    _array_to_input,
    load_input_file,
)

log = logging.getLogger(__name__)

FEW_SHOT_DIR = "few-shot"
CLASS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # also a folder name
_SUFFIXES = (NPY_SUFFIX, *IMAGE_SUFFIXES)


class SupportSetError(ValueError):
    """A support sample is refused (bad class name, input that does not fit the model)."""


@dataclass(frozen=True)
class Snapshot:
    """The support set as read at one scan."""

    classes: tuple[str, ...]  # label i is classes[i]
    x: np.ndarray
    y: np.ndarray
    fingerprint: str  # SHA-256 over class names, labels and input bytes ("" when empty)
    rejected: tuple[str, ...] = ()  # files that did not load, with why


_EMPTY = Snapshot((), np.zeros((0,), np.uint8), np.zeros((0,), np.int64), "")


class SupportSet:
    """The support set under ``root`` (``<data_dir>/few-shot``); thread-safe.

    ``input_shape()`` is the running model's input shape (None: no model yet, so nothing can
    be decoded). At most ``max_classes`` classes (the sorted first ones) and ``max_per_class``
    files per class (the sorted first ones) are read: a few-shot support set is small, and the
    bound keeps a folder full of files from stalling the learner."""

    def __init__(self, root: Path, input_shape: Callable[[], tuple[int, ...] | None], *,
                 max_classes: int = 64, max_per_class: int = 64) -> None:
        if max_classes < 2 or max_per_class < 1:
            raise ValueError("max_classes must be >= 2 and max_per_class >= 1")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._input_shape = input_shape
        self.max_classes, self.max_per_class = max_classes, max_per_class
        self._lock = threading.Lock()
        self._listing: tuple | None = None
        self._snapshot = _EMPTY
        self._changes = 0

    # -- what the learner service reads ------------------------------------------------------

    def scan(self) -> Snapshot:
        """The current support set (re-read only if the folder's listing changed)."""
        shape = self._input_shape()
        with self._lock:
            listing = (shape, self._list())
            if listing != self._listing:
                before = self._snapshot.fingerprint
                self._snapshot = self._load(listing[1], shape) if shape else _EMPTY
                self._listing = listing
                if self._snapshot.fingerprint != before:
                    self._changes += 1
            return self._snapshot

    @property
    def added(self) -> int:
        """How often the support set's content changed since start (monotonic)."""
        self.scan()
        with self._lock:
            return self._changes

    def __len__(self) -> int:
        return len(self.scan().y)

    def recent(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Every support sample (``n`` is ignored: a support set is used whole), in a fixed
        order: class by class, files sorted."""
        snap = self.scan()
        return snap.x, snap.y

    @property
    def classes(self) -> tuple[str, ...]:
        return self.scan().classes

    def status(self) -> dict[str, Any]:
        snap = self.scan()
        counts = np.bincount(snap.y, minlength=len(snap.classes)) if len(snap.y) else []
        return {"path": str(self.root), "classes": list(snap.classes),
                "shots": [int(c) for c in counts], "samples": len(snap.y),
                "fingerprint": snap.fingerprint or None, "rejected": list(snap.rejected)}

    # -- adding samples ----------------------------------------------------------------------

    def add(self, label: str, x: np.ndarray) -> Path:
        """Store one sample of class ``label`` as ``<root>/<label>/sample-<sha>.npy``
        (atomically; the same input twice is one file). Raises :class:`SupportSetError`."""
        if not isinstance(label, str) or not CLASS_NAME.match(label):
            raise SupportSetError(f"class must match {CLASS_NAME.pattern}, got {label!r}")
        shape = self._input_shape()
        if shape is None:
            raise SupportSetError("no model is loaded yet, so the input shape is unknown")
        try:
            arr = _array_to_input(np.asarray(x), shape)
        except (BadInputFile, ValueError, TypeError) as exc:
            raise SupportSetError(f"input does not fit the model input {shape}: {exc}") from exc
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        data = buf.getvalue()
        folder = self.root / label
        new = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        if new:
            fsync_dir(self.root)
        path = folder / f"sample-{hashlib.sha256(data).hexdigest()[:16]}{NPY_SUFFIX}"
        atomic_write(path, data)
        return path

    def on_post(self, body: dict) -> dict:
        """``POST /few-shot``: ``{"class": name, "input": nested list of numbers}``."""
        unknown = sorted(set(body) - {"class", "input"})
        if unknown or "class" not in body or "input" not in body:
            raise SupportSetError(f"body must be {{\"class\": ..., \"input\": [...]}}, unknown keys {unknown}")
        try:
            arr = np.asarray(body["input"])
        except (ValueError, TypeError) as exc:
            raise SupportSetError(f"input is not a numeric array: {exc}") from exc
        if arr.dtype.kind not in "iuf" or arr.dtype == np.bool_:
            raise SupportSetError(f"input must be a nested list of numbers, got dtype {arr.dtype}")
        if arr.dtype.kind in "iu" and arr.size and (arr.min() < 0 or arr.max() > 255):
            raise SupportSetError("integer inputs must lie in [0, 255]")
        if arr.dtype.kind in "iu":
            arr = arr.astype(np.uint8)
        path = self.add(body["class"], arr)
        status = self.status()
        return {"class": body["class"], "file": path.name, "classes": status["classes"],
                "shots": status["shots"], "samples": status["samples"]}

    # -- internals ---------------------------------------------------------------------------

    def _list(self) -> tuple:
        out = []
        try:
            dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and CLASS_NAME.match(p.name))
        except OSError:
            return ()
        for d in dirs[: self.max_classes]:
            try:
                files = sorted(f for f in d.iterdir() if f.suffix.lower() in _SUFFIXES
                               and ".tmp-" not in f.name and f.is_file())
            except OSError:
                continue
            for f in files[: self.max_per_class]:
                try:
                    st = f.stat()
                except OSError:
                    continue
                out.append((d.name, f.name, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def _load(self, listing: tuple, shape: tuple[int, ...]) -> Snapshot:
        xs: dict[str, list[np.ndarray]] = {}
        rejected = []
        for cls, name, _size, _mtime in listing:
            path = self.root / cls / name
            try:
                xs.setdefault(cls, []).append(load_input_file(path, shape))
            except (BadInputFile, OSError) as exc:
                rejected.append(f"{cls}/{name}: {exc}")
        if rejected:
            log.warning("few-shot: %d support files do not load, e.g. %s", len(rejected), rejected[0])
        classes = tuple(sorted(c for c, v in xs.items() if v))
        if not classes:
            return Snapshot((), _EMPTY.x, _EMPTY.y, "", tuple(rejected))
        arrays = [a for c in classes for a in xs[c]]
        if len({a.dtype for a in arrays}) > 1:  # uint8 images beside float .npy: one scale
            arrays = [a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a for a in arrays]
        x = np.stack(arrays)
        y = np.concatenate([np.full(len(xs[c]), i, np.int64) for i, c in enumerate(classes)])
        h = hashlib.sha256(json.dumps(classes).encode())
        h.update(y.tobytes())
        h.update(str(x.dtype).encode() + repr(x.shape).encode())
        h.update(np.ascontiguousarray(x).tobytes())
        return Snapshot(classes, x, y, h.hexdigest(), tuple(rejected))


def learner_overrides(support: SupportSet, governor: Any) -> Callable[[], dict[str, Any]]:
    """The pmeta learner's live config fields: the governor's memory budget in force and the
    support set's classes and fingerprint (``LearnerService(config_overrides=...)``)."""

    def overrides() -> dict[str, Any]:
        snap = support.scan()
        return {"memory_budget_mb": governor.current_budget().memory_mb,
                "classes": json.dumps(list(snap.classes)), "support_hash": snap.fingerprint}

    return overrides
