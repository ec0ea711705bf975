"""The update planner searches only the target's ancestry (issue 12): it reads the artefacts
whose target is the requested version or one of its ancestors, in a constant number of
queries, however many other versions and diffs exist, and picks the same plan as a search over
every artefact would. Rows are counted with SQLAlchemy's ``loaded_as_persistent`` event and
statements with ``before_cursor_execute``; on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import random
from collections import Counter

from sqlalchemy import event, select

from server.db.engine import transaction
from server.db.models import Artefact, ModelVersion
from server.domain.versions import ancestry, plan_update
from shared.artefacts import FULL_MODEL_ENCODING, SEED_MODEL_ENCODING

DIFF = "diff/sparse-v1"


def h(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


class Graph:
    """Versions and artefacts inserted as rows (the planner reads rows, never blobs), in one
    transaction (flushed row by row: the parent links are foreign keys)."""

    def __init__(self, session) -> None:
        self.s = session
        self.number = (session.scalar(select(ModelVersion.number).order_by(ModelVersion.number.desc())) or 0) + 1
        self.parent: dict[str, str | None] = {}

    def _add(self, row) -> None:
        self.s.add(row)
        self.s.flush()

    def version(self, name: str, parent: str | None, full_size: int = 10_000) -> str:
        self._add(Artefact(sha256=h(f"full:{name}"), encoding=FULL_MODEL_ENCODING, size=full_size,
                           target_model_hash=h(name)))
        self._add(ModelVersion(model_hash=h(name), number=self.number, parent_hash=h(parent) if parent else None,
                               arch_json="{}", full_artefact_sha256=h(f"full:{name}"), method="full"))
        self.number += 1
        self.parent[name] = parent
        return h(name)

    def diff(self, base: str, target: str, size: int) -> None:
        self._add(Artefact(sha256=h(f"diff:{base}->{target}"), encoding=DIFF, size=size, base_model_hash=h(base),
                           target_model_hash=h(target)))

    def seed(self, target: str, size: int = 200) -> None:
        self._add(Artefact(sha256=h(f"seed:{target}"), encoding=SEED_MODEL_ENCODING, size=size,
                           target_model_hash=h(target)))


def every_artefact_plan(session, have: str, target: str) -> tuple[str, int]:
    """The planner before issue 12, as the reference: the same search over every artefact."""
    diffs = list(session.scalars(select(Artefact).where(Artefact.base_model_hash.is_not(None))))
    seeds = list(session.scalars(select(Artefact).where(Artefact.encoding == SEED_MODEL_ENCODING)))
    edges: dict[str, list[Artefact]] = {}
    for a in diffs:
        edges.setdefault(a.base_model_hash, []).append(a)
    best = {have: (0, [])}
    frontier = [have]
    for a in seeds:
        if a.target_model_hash != have and (a.target_model_hash not in best or a.size < best[a.target_model_hash][0]):
            best[a.target_model_hash] = (a.size, [a])
            frontier.append(a.target_model_hash)
    for _ in range(32):
        nxt = []
        for node in frontier:
            cost, path = best[node]
            for a in edges.get(node, []):
                if a.target_model_hash not in best or cost + a.size < best[a.target_model_hash][0]:
                    best[a.target_model_hash] = (cost + a.size, [*path, a])
                    nxt.append(a.target_model_hash)
        frontier = nxt
    full = session.get(Artefact, session.get(ModelVersion, target).full_artefact_sha256)
    path = best[target][1] if target in best and target != have else None
    if path and sum(a.size for a in path) < full.size:
        return path[0].sha256, sum(a.size for a in path)
    return full.sha256, full.size


def test_the_planner_reads_only_the_targets_ancestry(server_ctx):
    chain = [f"m{i}" for i in range(13)]
    with transaction(server_ctx.factory) as s:
        g = Graph(s)
        g.version("m0", None)
        for prev, cur in zip(chain, chain[1:], strict=False):
            g.version(cur, prev)
            g.diff(prev, cur, 300)
        # A busy side branch (another lineage): hundreds of diffs the planner must not read.
        g.version("s0", "m2")
        g.diff("m2", "s0", 300)
        for i in range(1, 150):
            g.version(f"s{i}", f"s{i - 1}")
            g.diff(f"s{i - 1}", f"s{i}", 300)
            g.diff(f"m{i % 12}", f"s{i}", 250)  # diffs from main-line versions too
    loaded: Counter = Counter()
    statements: list[str] = []

    def on_load(_session, obj) -> None:
        loaded[type(obj).__name__] += 1

    def on_sql(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement)

    with server_ctx.factory() as s:
        event.listen(s, "loaded_as_persistent", on_load)
        event.listen(s.get_bind(), "before_cursor_execute", on_sql)
        try:
            plan = plan_update(s, have_hash=h("m3"), target_hash=h("m12"))
        finally:
            event.remove(s.get_bind(), "before_cursor_execute", on_sql)
        assert ancestry(s, h("m12")) == [h(f"m{i}") for i in range(12, -1, -1)]
    assert plan.artefact.sha256 == h("diff:m3->m4")
    assert plan.chain_bytes == 9 * 300 and plan.final_hash == h("m12")
    # The 12 diffs of the ancestry and the full model: none of the ~300 side-branch diffs.
    assert loaded["Artefact"] <= 13 and loaded["ModelVersion"] <= 1
    assert len(statements) <= 4  # the version, its full artefact, the ancestry and its artefacts


def test_ancestry_plans_equal_plans_over_every_artefact(server_ctx):
    """A random tree of versions with parent diffs, grandparent diffs (a re-initialised version
    in between) and seeds: every (have, target) pair gets the reference's plan."""
    rng = random.Random(0)
    names = ["v0"]
    with transaction(server_ctx.factory) as s:
        g = Graph(s)
        g.version("v0", None, full_size=5000)
        for i in range(1, 10):
            parent = rng.choice(names)
            g.version(f"v{i}", parent, full_size=5000)
            if rng.random() < 0.85:
                g.diff(parent, f"v{i}", rng.randint(100, 3000))
            if rng.random() < 0.2:
                g.seed(f"v{i}", size=rng.randint(100, 400))
            grand = g.parent[parent]
            if grand and rng.random() < 0.3:
                g.diff(grand, f"v{i}", rng.randint(100, 6000))
            names.append(f"v{i}")
    with server_ctx.factory() as s:
        for have in [*names, "unknown"]:
            for target in names:
                if have == target:
                    continue
                plan = plan_update(s, have_hash=h(have), target_hash=h(target))
                assert (plan.artefact.sha256, plan.chain_bytes) == every_artefact_plan(s, h(have), h(target)), \
                    (have, target)
