"""The data directory's byte budget, and the share of it a download may take.

The agent's data directory holds bounded components: the upload queue (``queue_max_bytes``),
the local labelled inputs (``local_data_max_items``), the models kept (current, previous and
one being installed; personal models beside them) and ``downloads/`` (after housekeeping, at
most the part file of the one download being resumed). Everything but ``downloads/`` is
measured on disk when a download starts; a component that may still grow up to a known bound
(the queue) counts at that bound. What remains is the downloads' share, and an artefact (or
the model file its install will write, whichever is larger: the artefact is deleted before
the install) that does not fit it is refused before a byte is written.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DOWNLOADS = "downloads"


class DiskBudgetError(ValueError):
    """An artefact would push the data directory past ``max_data_dir_bytes``."""


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (a file: its size; missing: 0). Files that
    vanish while being counted are skipped (other threads delete temp files)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    if not os.path.isdir(path) or os.path.islink(path):
        return st.st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue
    return total


@dataclass(frozen=True)
class DataDirBudget:
    """``max_bytes`` for everything under ``data_dir`` (0: no bound). ``reserved`` maps a glob
    of top-level names to the bytes that component may grow to (counted as at least that)."""

    data_dir: Path
    max_bytes: int
    reserved: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {self.max_bytes}")

    def usage(self) -> dict[str, int]:
        """Bytes per top-level entry (grouped by ``reserved`` glob), ``downloads/`` excluded."""
        groups: dict[str, int] = {pattern: 0 for pattern in self.reserved}
        try:
            entries = sorted(os.listdir(self.data_dir))
        except FileNotFoundError:
            entries = []
        for name in entries:
            if name == DOWNLOADS:
                continue
            key = next((p for p in self.reserved if fnmatch.fnmatchcase(name, p)), name)
            groups[key] = groups.get(key, 0) + tree_bytes(Path(self.data_dir) / name)
        return groups

    def committed(self) -> tuple[int, dict[str, int]]:
        """Bytes the other components use or may grow to, and the breakdown."""
        usage = self.usage()
        counted = {k: max(v, self.reserved.get(k, 0)) for k, v in usage.items()}
        return sum(counted.values()), counted

    def download_share(self) -> int:
        """Bytes ``downloads/`` may hold now (unbounded budget: effectively infinite)."""
        if not self.max_bytes:
            return 1 << 62
        return max(0, self.max_bytes - self.committed()[0])

    def check_download(self, artefact_bytes: int, install_bytes: int) -> None:
        """Raise :class:`DiskBudgetError` if this artefact, or the model file its install
        writes, does not fit what the other components leave."""
        if not self.max_bytes:
            return
        total, counted = self.committed()
        share = max(0, self.max_bytes - total)
        need = max(artefact_bytes, install_bytes)
        if need > share:
            biggest = ", ".join(f"{k} {v}" for k, v in sorted(counted.items(), key=lambda kv: -kv[1])[:4])
            raise DiskBudgetError(
                f"artefact of {artefact_bytes} bytes (install needs ~{install_bytes}) exceeds the "
                f"downloads share of {share} bytes: max_data_dir_bytes={self.max_bytes}, "
                f"{total} in use or reserved ({biggest})")
