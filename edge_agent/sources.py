"""Where the agent's inputs come from: a simulated sensor over a dataset shard, or a folder.

Both implement :class:`InputSource`: ``poll(max_items)`` returns what is available *now* and
never blocks, so one daemon loop can interleave capture, inference, upload and update checks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from edge_agent.download import atomic_write

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Observation:
    """One model input (uint8 or float32, shaped like the model's ``input_shape``)."""

    x: np.ndarray
    label: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class InputSource(Protocol):
    def poll(self, max_items: int) -> list[Observation]:
        """Up to ``max_items`` observations available now; never blocks."""
        ...

    def close(self) -> None: ...


def _check_max_items(max_items: int) -> None:
    if max_items < 0:
        raise ValueError(f"max_items must be >= 0, got {max_items}")


class DatasetShardSource:
    """A simulated sensor replaying one device's shard of a dataset.

    Observations come in a seeded shuffled order (a fresh permutation per pass when
    ``loop``), at ``rate_per_s`` on average: a token bucket filled by ``clock`` releases one
    observation per token. Tokens accumulate while nobody polls, as a real sensor's buffer
    would, but only up to ``max_backlog_s`` seconds' worth (the sensor's buffer overflows;
    those observations are simply never made). ``rate_per_s`` of 0 or infinity means "as
    fast as polled". Ground-truth labels are attached when ``send_labels`` (the simulation
    plays a user who labels every sample).
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        rate_per_s: float,
        seed: int,
        loop: bool = False,
        send_labels: bool = True,
        clock: Callable[[], float] = time.monotonic,
        max_backlog_s: float = 60.0,
    ) -> None:
        x = np.asarray(x)
        y = np.asarray(y)
        if x.dtype not in (np.uint8, np.float32):
            raise ValueError(f"shard inputs must be uint8 or float32, got {x.dtype}")
        if x.ndim < 2:
            raise ValueError(f"shard inputs must be (N, *input_shape), got shape {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"labels must have shape ({len(x)},), got {y.shape}")
        if not (rate_per_s >= 0):  # also refuses NaN
            raise ValueError(f"rate_per_s must be >= 0 (0 or inf: unthrottled), got {rate_per_s}")
        if not (math.isfinite(max_backlog_s) and max_backlog_s > 0):
            raise ValueError(f"max_backlog_s must be a positive finite number, got {max_backlog_s}")
        self._x, self._y = x, y.astype(np.int64)
        self._rng = np.random.default_rng(seed)
        self.loop = loop
        self.send_labels = send_labels
        self.unthrottled = rate_per_s == 0 or math.isinf(rate_per_s)
        self.rate_per_s = float(rate_per_s)
        self._clock = clock
        self._capacity = max(1.0, self.rate_per_s * max_backlog_s)
        self._tokens = 0.0
        self._last = clock()
        self._order = self._rng.permutation(len(x))
        self._pos = 0
        self.epoch = 0
        self.emitted = 0

    @property
    def exhausted(self) -> bool:
        """True once a non-looping source has emitted every observation (or has none)."""
        return len(self._x) == 0 or (not self.loop and self._pos >= len(self._order))

    def _available(self, max_items: int) -> int:
        if self.unthrottled:
            return max_items
        now = self._clock()
        self._tokens = min(
            self._capacity, self._tokens + max(0.0, now - self._last) * self.rate_per_s
        )
        self._last = now
        return min(max_items, int(self._tokens + 1e-9))  # 0.9999999 tokens is one sample

    def poll(self, max_items: int) -> list[Observation]:
        _check_max_items(max_items)
        out: list[Observation] = []
        n = self._available(max_items)
        while len(out) < n and not self.exhausted:
            if self._pos >= len(self._order):  # only reached when looping
                self._order = self._rng.permutation(len(self._x))
                self._pos = 0
                self.epoch += 1
            i = int(self._order[self._pos])
            self._pos += 1
            out.append(
                Observation(
                    x=self._x[i].copy(),
                    label=int(self._y[i]) if self.send_labels else None,
                    metadata={"source": "dataset", "index": str(i), "epoch": str(self.epoch)},
                )
            )
        if not self.unthrottled:
            self._tokens -= len(out)
        self.emitted += len(out)
        return out

    def close(self) -> None:
        pass


# -- folder watching ------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".pgm")
NPY_SUFFIX = ".npy"
PROCESSED_DIR = ".processed"
REJECTED_DIR = ".rejected"


class BadInputFile(ValueError):
    """A file in the watched folder cannot be turned into a model input."""


class ImageSupportMissing(RuntimeError):
    """An image file arrived but Pillow is not installed."""


def _import_pil():
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImageSupportMissing(
            "image inputs need Pillow: pip install 'pillow>=10' (or use .npy files)"
        ) from exc
    return Image


def _array_to_input(arr: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    """Fit a loaded array to ``input_shape``: exact, or channel-less / channel-last images."""
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise BadInputFile("array contains NaN or infinity")
        arr = arr.astype(np.float32)
    elif arr.dtype.kind in "ui" or arr.dtype == np.bool_:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise BadInputFile(
                f"integer array values must lie in [0, 255], got [{arr.min()}, {arr.max()}]"
            )
        arr = arr.astype(np.uint8)
    else:
        raise BadInputFile(f"unsupported array dtype {arr.dtype}")
    shape = tuple(input_shape)
    if arr.shape == shape:
        return np.ascontiguousarray(arr)
    if len(shape) == 3 and arr.shape == (shape[1], shape[2]) and shape[0] == 1:
        return np.ascontiguousarray(arr[None])
    if len(shape) == 3 and arr.shape == (shape[1], shape[2], shape[0]):
        return np.ascontiguousarray(arr.transpose(2, 0, 1))
    if arr.size == math.prod(shape) and len(shape) == 1:
        return np.ascontiguousarray(arr.reshape(shape))
    raise BadInputFile(f"array of shape {arr.shape} does not fit input shape {shape}")


def load_input_file(path: Path, input_shape: tuple[int, ...]) -> np.ndarray:
    """Read one .npy or image file as a model input. Raises :class:`BadInputFile`."""
    suffix = path.suffix.lower()
    if suffix == NPY_SUFFIX:
        try:
            arr = np.load(path, allow_pickle=False)  # pickles run code: never from a folder
        except (ValueError, OSError, EOFError) as exc:
            raise BadInputFile(f"unreadable .npy: {exc}") from exc
        return _array_to_input(np.asarray(arr), input_shape)
    if suffix in IMAGE_SUFFIXES:
        image_mod = _import_pil()  # ImageSupportMissing is not the file's fault: propagates
        if len(input_shape) == 3 and input_shape[0] in (1, 3):
            channels, height, width = input_shape
        elif len(input_shape) == 2:
            channels, (height, width) = 1, input_shape
        else:
            raise BadInputFile(
                f"input shape {input_shape} is not an image shape (C in 1 or 3, H, W)"
            )
        try:
            with image_mod.open(path) as img:
                img = img.convert("L" if channels == 1 else "RGB")
                img = img.resize((width, height), image_mod.Resampling.BILINEAR)
                arr = np.asarray(img, dtype=np.uint8)
        except (OSError, ValueError, image_mod.DecompressionBombError) as exc:
            raise BadInputFile(f"unreadable image: {exc}") from exc
        if channels == 1:
            arr = arr[None] if len(input_shape) == 3 else arr
        else:
            arr = arr.transpose(2, 0, 1)
        return np.ascontiguousarray(arr)
    raise BadInputFile(f"unsupported file type {suffix!r}")


class FolderWatchSource:
    """Ingests files dropped into a folder (e.g. by a camera script), each exactly once.

    Layout: ``path/<file>`` (no label) or ``path/<class name>/<file>`` (labelled when
    ``label_from_subfolder`` and the sub-folder names one of ``class_names``; without
    ``class_names`` a sub-folder named by an integer gives that label).

    Once-only, two ways (a restart never re-ingests):

    * ``state_file`` given: the folder is left untouched; processed files are remembered as
      ``{relative path: [mtime_ns, size]}`` in a JSON state file (written atomically). A file
      overwritten later (new mtime or size) counts as new. Entries of deleted files are pruned.
    * ``state_file`` None (default): processed files are moved to ``path/.processed/``, so the
      folder itself is the state and does not grow without bound.

    A file still being written is skipped until its mtime is ``settle_s`` old and its size has
    not changed since the previous poll. A file that cannot be read is moved to
    ``path/.rejected/`` with a warning; it never stops the agent. Image files wait in place
    (with one error logged) while Pillow is missing, so installing it later picks them up.
    """

    def __init__(
        self,
        path: Path,
        input_shape: tuple[int, ...],
        *,
        label_from_subfolder: bool = True,
        class_names: list[str] | None = None,
        state_file: Path | None = None,
        settle_s: float = 0.5,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not input_shape or any(int(d) < 1 for d in input_shape):
            raise ValueError(f"input_shape must be positive sizes, got {input_shape}")
        if not (settle_s >= 0):
            raise ValueError(f"settle_s must be >= 0, got {settle_s}")
        if class_names is not None and len(set(class_names)) != len(class_names):
            raise ValueError(f"class_names must be distinct, got {class_names}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.label_from_subfolder = label_from_subfolder
        self.class_names = list(class_names) if class_names is not None else None
        self.state_file = Path(state_file) if state_file is not None else None
        self.settle_s = float(settle_s)
        self._wall_clock = wall_clock
        self._last_sizes: dict[str, int] = {}
        self._seen: dict[str, list[int]] = self._load_state()
        self._warned_no_pil = False
        self.rejected = 0

    def _load_state(self) -> dict[str, list[int]]:
        if self.state_file is None or not self.state_file.exists():
            return {}
        try:
            data = json.loads(self.state_file.read_text())
            if not isinstance(data, dict):
                raise ValueError("not an object")
            return {str(k): [int(v[0]), int(v[1])] for k, v in data.items()}
        except (ValueError, TypeError, IndexError, OSError) as exc:
            # Losing the state re-ingests files (duplicates are deduplicated by content id
            # downstream); crashing would stop the device.
            logger.warning("folder state %s unreadable (%s); starting afresh", self.state_file, exc)
            return {}

    def _save_state(self) -> None:
        assert self.state_file is not None
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.state_file, json.dumps(self._seen, sort_keys=True).encode())
        except OSError as exc:  # read-only or full disk: carry on; the state is kept in memory
            logger.warning("cannot save folder state %s: %s", self.state_file, exc)

    def _label_for(self, rel: Path) -> int | None:
        if not self.label_from_subfolder or len(rel.parts) < 2:
            return None
        folder = rel.parts[0]
        if self.class_names is not None:
            return self.class_names.index(folder) if folder in self.class_names else None
        return int(folder) if folder.isdigit() else None

    def _candidates(self) -> list[tuple[int, str, os.stat_result]]:
        """Input files at depth 0 and 1 (hidden entries skipped), oldest first."""
        found = []
        dirs = [self.path]
        try:
            for entry in os.scandir(self.path):
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    dirs.append(Path(entry.path))
        except OSError as exc:
            logger.warning("cannot list %s: %s", self.path, exc)
            return []
        suffixes = (NPY_SUFFIX, *IMAGE_SUFFIXES)
        for directory in dirs:
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                if entry.name.startswith(".") or not entry.name.lower().endswith(suffixes):
                    continue
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # vanished between listing and stat
                rel = Path(entry.path).relative_to(self.path).as_posix()
                found.append((st.st_mtime_ns, rel, st))
        found.sort()
        return found

    def _settled(self, rel: str, age_s: float, size: int) -> bool:
        """Whether a file looks completely written: old enough, and not growing."""
        last = self._last_sizes.get(rel)
        if age_s < 0:
            # An mtime in the future (copied with another machine's timestamps, or the clock
            # stepped back after an NTP sync): the age means nothing, so require the size to
            # have stayed put across two polls instead of waiting for the future to arrive.
            return last == size
        return age_s >= self.settle_s and (last is None or last == size)

    def _move(self, rel: str, subdir: str) -> None:
        dest = self.path / subdir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path / rel, dest)

    def poll(self, max_items: int) -> list[Observation]:
        _check_max_items(max_items)
        if max_items == 0:
            return []
        now = self._wall_clock()
        sizes: dict[str, int] = {}
        out: list[Observation] = []
        state_changed = False
        candidates = self._candidates()
        for mtime_ns, rel, st in candidates:
            if len(out) >= max_items:
                break
            if self._seen.get(rel) == [mtime_ns, st.st_size]:
                continue
            sizes[rel] = st.st_size
            if not self._settled(rel, now - mtime_ns / 1e9, st.st_size):
                continue
            try:
                x = load_input_file(self.path / rel, self.input_shape)
            except ImageSupportMissing as exc:
                if not self._warned_no_pil:
                    logger.error("%s; leaving image files in %s", exc, self.path)
                    self._warned_no_pil = True
                continue
            except BadInputFile as exc:
                self._reject(rel, exc)
                continue
            except OSError as exc:  # vanished or unreadable right now: try next poll
                logger.debug("skipping %s for now: %s", rel, exc)
                continue
            if self.state_file is not None:
                self._seen[rel] = [mtime_ns, st.st_size]
                state_changed = True
            else:
                try:
                    self._move(rel, PROCESSED_DIR)
                except OSError as exc:
                    # Without the move it would be re-ingested forever: skip it instead.
                    logger.warning(
                        "cannot move %s to %s (%s); skipping it", rel, PROCESSED_DIR, exc
                    )
                    self._seen[rel] = [mtime_ns, st.st_size]
                    continue
            label = self._label_for(Path(rel))
            out.append(Observation(x=x, label=label, metadata={"source": "folder", "file": rel}))
        self._last_sizes = sizes
        # Forget processed files that no longer exist, so the state stays small.
        present = {rel for _, rel, _ in candidates}
        gone = [rel for rel in self._seen if rel not in present]
        for rel in gone:
            del self._seen[rel]
        if self.state_file is not None and (state_changed or gone):
            self._save_state()
        return out

    def _reject(self, rel: str, exc: Exception) -> None:
        self.rejected += 1
        try:
            self._move(rel, REJECTED_DIR)
            logger.warning("rejected %s (%s); moved to %s/", rel, exc, REJECTED_DIR)
        except OSError as move_exc:
            logger.warning("rejected %s (%s); could not move it (%s)", rel, exc, move_exc)
            st = (self.path / rel).stat() if (self.path / rel).exists() else None
            if st is not None:  # remember it so it is not retried on every poll
                self._seen[rel] = [st.st_mtime_ns, st.st_size]

    def close(self) -> None:
        if self.state_file is not None:
            self._save_state()
