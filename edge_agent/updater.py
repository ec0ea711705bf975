"""Download, verify and install new model versions.

Plan, check, then switch last: bytes stream into a resumable part file (hashed while written),
the artefact's SHA-256 is checked, the decoder checks the model hash of what it produced (and a
diff's base hash), the model store writes the new model atomically, and only then does the runner
swap it in. A failure at any step leaves the old model installed and running.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import shared.codec  # noqa: F401 - registers the diff/sparse-v1 decoder
from edge_agent.client import FleetClient, PermanentError, TransientError
from edge_agent.download import DownloadIntegrityError, PartialDownload
from edge_agent.model_store import ModelStore
from edge_agent.runner import ModelRunner
from protos.edgeloop.v1 import fleet_pb2 as pb
from shared.artefacts import ArtefactError, decode_artefact

log = logging.getLogger(__name__)
MAX_CHAIN = 64  # diffs applied in one update before we give up (a cycle would be a server bug)


class UpdateFailed(Exception):
    """This artefact cannot be installed; the old model stays. Reported in heartbeats."""


@dataclass
class UpdateStats:
    bytes_downloaded: int = 0
    artefacts_installed: int = 0
    failures: int = 0


class Updater:
    def __init__(self, client: FleetClient, store: ModelStore, runner: ModelRunner, data_dir: Path, *,
                 max_artefact_bytes: int, chunk_bytes: int) -> None:
        self.client = client
        self.store = store
        self.runner = runner
        self.download_dir = data_dir / "downloads"
        self.download_dir.mkdir(parents=True, exist_ok=True)
        self.state_file = data_dir / "download.json"
        self.max_artefact_bytes = max_artefact_bytes
        self.chunk_bytes = chunk_bytes
        self.stats = UpdateStats()
        self.state = "idle"

    # --- the download being resumed survives restarts -------------------------------------
    def _saved(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _save(self, info: pb.UpdateInfo) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"artefact_sha256": info.artefact_sha256, "size": info.artefact_size,
                                   "target": info.final_model_hash}))
        os.replace(tmp, self.state_file)

    def _clear(self) -> None:
        self.state_file.unlink(missing_ok=True)

    def update_to(self, target: str) -> None:
        """Walk from the running model to ``target`` (a chain of diffs or a full model).

        Raises TransientError (retry later; the partial download is kept) or UpdateFailed."""
        visited: set[str] = set()
        for _ in range(MAX_CHAIN):
            if self.runner.model_hash == target:
                self.state = "idle"
                return
            if self.runner.model_hash in visited:
                raise UpdateFailed(f"update path to {target[:12]} loops back to {self.runner.model_hash[:12]}")
            visited.add(self.runner.model_hash)
            self._one_artefact(target)
        raise UpdateFailed(f"still not on {target[:12]} after {MAX_CHAIN} artefacts")

    def _one_artefact(self, target: str) -> None:
        self.state = "downloading"
        saved = self._saved()
        part: PartialDownload | None = None
        req = pb.GetUpdateRequest(target_model_hash=target, have_model_hash=self.runner.model_hash,
                                  max_chunk_bytes=self.chunk_bytes)
        if saved and saved.get("target") == target:
            part = PartialDownload(self.download_dir, saved["artefact_sha256"], int(saved["size"]), self.max_artefact_bytes)
            req.artefact_sha256, req.offset = saved["artefact_sha256"], part.offset
        info: pb.UpdateInfo | None = None
        for msg in self.client.get_update(req):
            if msg.HasField("info"):
                info = msg.info
                if info.artefact_size > self.max_artefact_bytes:
                    raise UpdateFailed(f"artefact of {info.artefact_size} bytes exceeds max_artefact_bytes")
                if part is None or part.artefact_sha256 != info.artefact_sha256:
                    if part is not None:
                        part.discard()
                    part = PartialDownload(self.download_dir, info.artefact_sha256, info.artefact_size,
                                           self.max_artefact_bytes)
                    if info.offset != 0:
                        part.discard()
                        raise PermanentError("server resumed an artefact we do not hold")
                elif info.offset != part.offset:
                    raise PermanentError(f"server resumed at {info.offset}, we hold {part.offset} bytes")
                self._save(info)
                log.info("downloading %s (%s, %d bytes, from byte %d)", info.artefact_sha256[:12], info.encoding,
                         info.artefact_size, info.offset)
                continue
            if info is None or part is None:
                raise PermanentError("GetUpdate sent a chunk before UpdateInfo")
            if msg.chunk.offset != part.offset:
                raise PermanentError(f"chunk at offset {msg.chunk.offset}, expected {part.offset}")
            part.write(msg.chunk.data)
            self.stats.bytes_downloaded += len(msg.chunk.data)
        if info is None or part is None:
            raise PermanentError("GetUpdate ended without UpdateInfo")
        if not part.complete:
            raise TransientError(f"download interrupted at {part.offset}/{info.artefact_size} bytes")
        self._install(info, part)

    def _install(self, info: pb.UpdateInfo, part: PartialDownload) -> None:
        self.state = "installing"
        try:
            path = part.finalize()  # checks size and SHA-256
        except DownloadIntegrityError as exc:
            self._clear()
            self.stats.failures += 1
            raise UpdateFailed(f"artefact {info.artefact_sha256[:12]} failed its integrity check: {exc}") from exc
        try:
            data = path.read_bytes()
            is_diff = bool(info.base_model_hash)
            if is_diff and info.base_model_hash != self.runner.model_hash:
                raise ArtefactError(f"diff applies to {info.base_model_hash[:12]}, we run {self.runner.model_hash[:12]}")
            decoded = decode_artefact(data, self.runner.state if is_diff else None)
            if decoded.model_hash != info.target_model_hash:
                raise ArtefactError(f"artefact produced {decoded.model_hash[:12]}, server promised {info.target_model_hash[:12]}")
            arch = decoded.arch or self.runner.arch
            if arch is None:
                raise ArtefactError("a diff arrived but no base model is installed")
            self.store.install(arch, decoded.state, expected_hash=decoded.model_hash)
            self.runner.load(arch, decoded.state, decoded.model_hash)
        except (ArtefactError, ValueError) as exc:
            self.stats.failures += 1
            raise UpdateFailed(f"artefact {info.artefact_sha256[:12]} refused: {exc}") from exc
        finally:
            path.unlink(missing_ok=True)
            self._clear()
        self.stats.artefacts_installed += 1
        self.store.gc(keep=2)
        log.info("installed model %s (%s)", info.target_model_hash[:12], info.encoding)
