"""Download and verify one artefact of an update: the update machine's two network-side phases.

Plan, check, then switch last: bytes stream into a resumable part file (hashed while written);
:meth:`Updater.verify` checks the artefact's size and SHA-256, its Ed25519 signature by a pinned
key (:mod:`edge_agent.trust`; also checked on the UpdateInfo before a byte is fetched), decodes
it, and checks the model hash of what it produced (and a diff's base hash). Nothing here touches the model store or
the runner: a chain of diffs is walked in memory (:class:`Working`), and only the update
machine's ``installing`` state switches the model.

``downloads/`` holds at most one file that matters: the part file of the download being
resumed (named by ``download.json``). :meth:`Updater.tidy` deletes everything else; the update
machine calls it at start-up and after every outcome, so no sequence of crashes makes the
directory grow. A stream the server restarts from byte 0 discards what the part holds.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

import shared.codec  # noqa: F401 - registers the diff/sparse-v1 decoder
import shared.da3.artefact  # noqa: F401 - registers the da3/adaptor-v1 decoder
from edge_agent.client import FleetClient, PermanentError, TransientError
from edge_agent.disk_budget import DataDirBudget, DiskBudgetError
from edge_agent.download import DownloadIntegrityError, PartialDownload, fsync_dir
from edge_agent.trust import TrustStore
from protos.edgeloop.v1 import fleet_pb2 as pb
from shared.artefacts import DEFAULT_MAX_PARAMETERS, ArtefactError, decode_artefact
from shared.models import ArchSpec
from shared.signing import SignatureError

log = logging.getLogger(__name__)
MAX_CHAIN = 64  # diffs applied in one update before we give up (a cycle would be a server bug)
INSTALL_SLACK = 64 << 10  # model file bytes beyond its tensors (safetensors header, metadata)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class UpdateFailed(Exception):
    """This artefact cannot be installed; the old model stays. Reported in heartbeats."""


@dataclass(frozen=True)
class Working:
    """The model a chain of artefacts has reached so far (in memory; empty hash: none)."""

    model_hash: str
    arch: ArchSpec | None
    state: dict[str, torch.Tensor] | None


@dataclass(frozen=True)
class Downloaded:
    """One artefact, all bytes on disk, not yet verified."""

    info: pb.UpdateInfo
    part: PartialDownload


@dataclass
class UpdateStats:
    bytes_downloaded: int = 0
    artefacts_installed: int = 0
    failures: int = 0


class Updater:
    def __init__(self, client: FleetClient, data_dir: Path, *, max_artefact_bytes: int,
                 chunk_bytes: int, trust: TrustStore, budget: DataDirBudget | None = None,
                 max_parameters: int = DEFAULT_MAX_PARAMETERS) -> None:
        self.client = client
        self.trust = trust  # pinned signing keys: nothing installs without a signature by one
        self.download_dir = Path(data_dir) / "downloads"
        self.download_dir.mkdir(parents=True, exist_ok=True)
        self.state_file = Path(data_dir) / "download.json"  # the part file being resumed
        self.max_artefact_bytes = max_artefact_bytes
        self.chunk_bytes = chunk_bytes
        self.budget = budget
        self.max_parameters = max_parameters  # checked before an artefact's model is built
        self.stats = UpdateStats()

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

    def resumable(self, target: str) -> str | None:
        """The artefact whose part file a download towards ``target`` resumes, if any."""
        saved = self._saved()
        if not isinstance(saved, dict) or not target or saved.get("target") != target:
            return None
        sha = saved.get("artefact_sha256")
        return sha if isinstance(sha, str) and _SHA256.match(sha) else None

    def tidy(self, resume_target: str | None = None) -> list[str]:
        """Delete every file in ``downloads/`` but the part being resumed towards
        ``resume_target`` (None: no download is resumed, so nothing is kept); returns the
        names deleted. Abandoned parts, artefacts a crash left between finalise and unlink,
        and anything else go. Call it only when no download is running."""
        keep = self.resumable(resume_target) if resume_target else None
        if keep is None:
            self.state_file.unlink(missing_ok=True)
        self.state_file.with_suffix(".tmp").unlink(missing_ok=True)  # an interrupted _save
        self.download_dir.mkdir(parents=True, exist_ok=True)
        part, done = self.download_dir / f"{keep}.part", self.download_dir / f"{keep}.artefact"
        if keep is not None and done.is_file() and not part.exists():
            # Finalised but never verified (a crash in between): its bytes are the complete
            # part, so the resume asks for nothing more and re-verifies it.
            os.replace(done, part)
        removed = []
        for entry in self.download_dir.iterdir():
            if keep is not None and entry.name == part.name and entry.is_file():
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
        if removed:
            fsync_dir(self.download_dir)
            log.info("removed %d stale download files: %s", len(removed), ", ".join(sorted(removed))[:200])
        return removed

    def _check_fits(self, info: pb.UpdateInfo, have: Working) -> None:
        if info.artefact_size > self.max_artefact_bytes:
            raise UpdateFailed(f"artefact of {info.artefact_size} bytes exceeds max_artefact_bytes")
        if self.budget is None:
            return
        # What the install will write: a full artefact is the model file; a diff rebuilds
        # a model the size of its base.
        install = info.artefact_size
        if info.base_model_hash and have.state is not None:
            install = sum(t.numel() * t.element_size() for t in have.state.values()) + INSTALL_SLACK
        try:
            self.budget.check_download(info.artefact_size, install)
        except DiskBudgetError as exc:
            raise UpdateFailed(f"artefact {info.artefact_sha256[:12]} refused: {exc}") from exc

    def _check_signed(self, info: pb.UpdateInfo) -> str:
        """Learn rotated keys from the server's key statements, then check the artefact's
        statement is signed by a trusted key; returns that key's id, raises UpdateFailed."""
        self.trust.apply(info.key_announcements)
        try:
            return self.trust.check(info)
        except SignatureError as exc:
            raise UpdateFailed(f"artefact {info.artefact_sha256[:12]} refused: signature: {exc}") from exc

    # --- downloading ----------------------------------------------------------------------
    def download(self, have: Working, target: str) -> Downloaded:
        """Fetch the next artefact from ``have`` towards ``target``, resuming a part file.

        Raises TransientError (retry later; the part file is kept), PermanentError or
        UpdateFailed."""
        saved = self._saved()
        part: PartialDownload | None = None
        req = pb.GetUpdateRequest(target_model_hash=target, have_model_hash=have.model_hash,
                                  max_chunk_bytes=self.chunk_bytes)
        if saved and saved.get("target") == target:
            part = PartialDownload(self.download_dir, saved["artefact_sha256"], int(saved["size"]),
                                   self.max_artefact_bytes)
            req.artefact_sha256, req.offset = saved["artefact_sha256"], part.offset
        info: pb.UpdateInfo | None = None
        try:
            for msg in self.client.get_update(req):
                if msg.HasField("info"):
                    info = msg.info
                    self._check_fits(info, have)
                    self._check_signed(info)  # before a byte is fetched; verify() checks again
                    if part is not None and part.artefact_sha256 != info.artefact_sha256:
                        part.discard()  # the server prefers another artefact now
                        part = None
                    if part is None:  # may find a stale part file of this artefact
                        part = PartialDownload(self.download_dir, info.artefact_sha256, info.artefact_size,
                                               self.max_artefact_bytes)
                    if info.offset == 0 and part.offset:
                        # The server restarts the stream: what follows is byte 0, so the bytes
                        # held (a stale part, or one the server will not resume) must go.
                        log.info("server restarts %s from byte 0; discarding the %d bytes held",
                                 info.artefact_sha256[:12], part.offset)
                        part.discard()
                    elif info.offset != part.offset:
                        held = part.offset
                        part.discard()
                        raise PermanentError(f"server resumed {info.artefact_sha256[:12]} at byte "
                                             f"{info.offset}, we held {held}; discarded")
                    self._save(info)
                    log.info("downloading %s (%s, %d bytes, from byte %d)", info.artefact_sha256[:12],
                             info.encoding, info.artefact_size, info.offset)
                    continue
                if info is None or part is None:
                    raise PermanentError("GetUpdate sent a chunk before UpdateInfo")
                if msg.chunk.offset != part.offset:
                    raise PermanentError(f"chunk at offset {msg.chunk.offset}, expected {part.offset}")
                part.write(msg.chunk.data)
                self.stats.bytes_downloaded += len(msg.chunk.data)
        finally:
            if part is not None:
                part.close()  # the part file stays for a resume
        if info is None or part is None:
            raise PermanentError("GetUpdate ended without UpdateInfo")
        if not part.complete:
            raise TransientError(f"download interrupted at {part.offset}/{info.artefact_size} bytes")
        return Downloaded(info, part)

    # --- verifying ------------------------------------------------------------------------
    def verify(self, got: Downloaded, have: Working) -> Working:
        """Check size and SHA-256, the signature of the statement they match, decode, and check
        every hash and the encoding; returns the model reached.

        The artefact file is deleted either way (a refused one would be refused again)."""
        info = got.info
        try:
            path = got.part.finalize()  # checks size and SHA-256
        except DownloadIntegrityError as exc:
            self.state_file.unlink(missing_ok=True)
            self.stats.failures += 1
            raise UpdateFailed(f"artefact {info.artefact_sha256[:12]} failed its integrity check: {exc}") from exc
        try:
            vouched = self._check_signed(info)  # the bytes match info (finalize); info is signed
        except UpdateFailed:
            path.unlink(missing_ok=True)
            self.state_file.unlink(missing_ok=True)
            self.stats.failures += 1
            raise
        try:
            data = path.read_bytes()
            is_diff = bool(info.base_model_hash)
            if is_diff and info.base_model_hash != have.model_hash:
                raise ArtefactError(f"diff applies to {info.base_model_hash[:12]}, we hold {have.model_hash[:12]}")
            decoded = decode_artefact(data, have.state if is_diff else None,
                                      base_arch=have.arch if is_diff else None,
                                      max_parameters=self.max_parameters)
            if decoded.encoding != info.encoding:  # the signed statement names the encoding too
                raise ArtefactError(f"artefact decodes as {decoded.encoding}, the signed statement says {info.encoding}")
            if decoded.model_hash != info.target_model_hash:
                raise ArtefactError(f"artefact produced {decoded.model_hash[:12]}, server promised "
                                    f"{info.target_model_hash[:12]}")
            arch = decoded.arch or have.arch
            if arch is None:
                raise ArtefactError("a diff arrived but no base model is installed")
        except (ArtefactError, ValueError) as exc:
            self.stats.failures += 1
            raise UpdateFailed(f"artefact {info.artefact_sha256[:12]} refused: {exc}") from exc
        finally:
            path.unlink(missing_ok=True)
            self.state_file.unlink(missing_ok=True)
        log.info("verified %s -> model %s (%s, signed by %s)", info.artefact_sha256[:12],
                 info.target_model_hash[:12], info.encoding, vouched[:16])
        return Working(decoded.model_hash, arch, dict(decoded.state))
