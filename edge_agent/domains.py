"""Several DA³ domain adaptors on one device, and which one serves (learner = ``da3``).

A device that moves between domains (a camera taken indoors and out, a site with two product
lines) keeps one adaptor per domain over the same frozen fleet backbone, so coming back to a
domain serves its adaptor again instead of learning it anew. Each domain's adaptors are
personal artefacts (``personal/v1``, verified on every load, never uploaded) in their own
directory::

    data_dir/models/models/domains/<domain>/<base_hash>.da3.safetensors

:class:`DomainStore` is the :class:`~edge_agent.personal_store.PersonalStore` the learner
service sees: loads, stores and deletes go to the **active** domain's directory; ``gc`` (a
new fleet base) prunes every domain, because an adaptor is trained against one backbone and
is re-adapted, not reused, on another.

Which domain is active (:class:`Domains`), in this order:

1. the operator's choice: ``PUT /domain {"domain": "<name>"}`` on the status endpoint, kept
   in ``data_dir/domain.json`` across restarts (``{"domain": null}`` clears it);
2. the ``learner_domain`` setting;
3. a device tag ``domain-<name>`` (the fleet operator's tags: a tag is also a server cohort,
   so a cohort's shipped adaptor and the device's local one name the same domain);
4. ``default``.

A confidence rule is deliberately not used: a domain adaptor is confident on inputs it was
never trained for as readily as on its own (softmax confidence is not calibrated across
domains), so picking the most confident adaptor would switch on noise; the operator, who
knows that the camera moved, or the fleet's tags decide. A switch makes the learner decide
again at once: it serves the stored adaptor of that domain for the current base (checked on
the held-out local data), or adapts one from the newest local samples.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from edge_agent.download import atomic_write
from edge_agent.personal_store import PersonalStore
from shared.personal import PersonalArtefact

log = logging.getLogger(__name__)

DOMAIN_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}\Z")  # also a directory name
DEFAULT_DOMAIN = "default"
TAG_PREFIX = "domain-"
STATE_FILE = "domain.json"


class DomainError(ValueError):
    """A bad domain name or request body (the status endpoint answers 400)."""


def check_domain(name: object) -> str:
    if not isinstance(name, str) or not DOMAIN_NAME.match(name):
        raise DomainError(f"a domain name must match {DOMAIN_NAME.pattern}, got {name!r:.80}")
    return name


class _DomainDir(PersonalStore):
    """A PersonalStore over one domain's directory."""

    def __init__(self, directory: Path) -> None:  # not super(): another directory
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.discarded = 0


class DomainStore:
    """The learner service's store, switched by :meth:`activate`. Thread-safe."""

    def __init__(self, root: Path, domain: str = DEFAULT_DOMAIN) -> None:
        self.root = Path(root) / "models" / "domains"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._dirs: dict[str, _DomainDir] = {}
        self._active = self._dir(check_domain(domain))
        self.active = domain

    def _dir(self, domain: str) -> _DomainDir:
        with self._lock:
            if domain not in self._dirs:
                self._dirs[domain] = _DomainDir(self.root / domain)
            return self._dirs[domain]

    def activate(self, domain: str) -> None:
        d = self._dir(check_domain(domain))
        with self._lock:
            self._active, self.active = d, domain

    def domains(self) -> list[str]:
        """Every domain with a directory (stored adaptors or not)."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and DOMAIN_NAME.match(p.name))

    def stored(self) -> dict[str, list[str]]:
        """Domain -> base hashes it holds an adaptor for (unverified listing)."""
        return {d: [b for b, _ in self._dir(d).entries()] for d in self.domains()}

    # -- the PersonalStore interface the learner service uses --------------------------------
    def put(self, data: bytes) -> PersonalArtefact:
        return self._active.put(data)

    def load(self, base_hash: str, learner: str) -> PersonalArtefact | None:
        return self._active.load(base_hash, learner)

    def delete(self, base_hash: str, learner: str) -> bool:
        return self._active.delete(base_hash, learner)

    def entries(self) -> list[tuple[str, str]]:
        return self._active.entries()

    def gc(self, keep_bases: Collection[str]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for d in self.domains():
            out += self._dir(d).gc(keep_bases)
        return sorted(out)

    @property
    def discarded(self) -> int:
        with self._lock:
            return sum(d.discarded for d in self._dirs.values())


class Domains:
    """Which domain is active and why; ``on_put`` serves ``PUT /domain``."""

    def __init__(self, data_dir: Path, store: DomainStore, *, setting: str = "",
                 tags: Collection[str] = (), on_change: Callable[[str], None] | None = None) -> None:
        self.path = Path(data_dir) / STATE_FILE
        self.store = store
        self.on_change = on_change
        self._lock = threading.Lock()
        self.switches = 0
        self._setting = check_domain(setting) if setting else None
        tagged = sorted(t[len(TAG_PREFIX):] for t in tags if t.startswith(TAG_PREFIX)
                        and DOMAIN_NAME.match(t[len(TAG_PREFIX):]))
        self._tag = tagged[0] if tagged else None
        self._operator = self._read()
        self.active, self.source = self._resolve()
        store.activate(self.active)

    def _read(self) -> str | None:
        try:
            data = json.loads(self.path.read_text())
            value = data.get("domain") if isinstance(data, dict) else None
            return check_domain(value) if value is not None else None
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as exc:  # a damaged file: fall back, say so
            log.warning("%s is unreadable (%s); ignoring the operator's domain", self.path, exc)
            return None

    def _resolve(self) -> tuple[str, str]:
        for value, source in ((self._operator, "operator"), (self._setting, "setting"),
                              (self._tag, "tag")):
            if value:
                return value, source
        return DEFAULT_DOMAIN, "default"

    def select(self, domain: str | None) -> dict[str, Any]:
        """The operator sets (``None``: clears) the domain; persisted before it takes effect."""
        if domain is not None:
            check_domain(domain)
        with self._lock:
            atomic_write(self.path, json.dumps({"domain": domain}).encode())
            self._operator = domain
            before = self.active
            self.active, self.source = self._resolve()
            changed = self.active != before
            if changed:
                self.switches += 1
                self.store.activate(self.active)
        if changed:
            log.info("domain switched from %s to %s (%s)", before, self.active, self.source)
            if self.on_change is not None:
                self.on_change(self.active)
        return self.status()

    def on_put(self, body: dict) -> dict[str, Any]:
        if set(body) != {"domain"}:
            raise DomainError('PUT /domain takes {"domain": "<name>"} or {"domain": null}')
        return self.select(body["domain"])

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"active": self.active, "source": self.source, "switches": self.switches,
                    "stored": {d: [b[:12] for b in bases] for d, bases in self.store.stored().items()}}

    def metrics(self) -> dict[str, float]:
        with self._lock:
            stored = sum(1 for bases in self.store.stored().values() if bases)
            return {"learner_domain_switches": float(self.switches),
                    "learner_domains_stored": float(stored),
                    "learner_domain_named": float(self.active != DEFAULT_DOMAIN)}
