"""The console's static assets: served at /ui with a strict Content-Security-Policy, every
module they import present, nothing loaded from another origin, the vendored chart library as
recorded in VENDORED.md."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from server.console.serve import CSP, STATIC_DIR
from tests.server.test_rest_api import make_client

# Anything that makes a browser fetch: markup attributes, CSS url(), ES module specifiers, fetch().
REFERENCES = [
    re.compile(r"""\b(?:src|href|action)\s*=\s*["']([^"']+)["']"""),
    re.compile(r"""url\(\s*["']?([^"')]+)"""),
    re.compile(r"""\bimport\s*(?:[\w{}*,\s]+from\s*)?["']([^"']+)["']"""),
    re.compile(r"""\bimport\(\s*["']([^"']+)["']"""),
    re.compile(r"""\bfetch\(\s*["'`]([^"'`]+)"""),
]
SVG_NS = "http://www.w3.org/2000/svg"  # a namespace name that is never fetched


def assets() -> list[Path]:
    return sorted(p for p in STATIC_DIR.rglob("*") if p.is_file() and p.suffix in {".html", ".js", ".css"})


def _without_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"(?m)(^|[^:\"'`\\])//.*$", r"\1", text)


@pytest.fixture
def client(server_ctx):
    return make_client(server_ctx)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_every_asset_is_served_with_the_csp_and_security_headers(client):
    index = client.get("/ui/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert client.get("/ui", follow_redirects=False).headers["location"] == "/ui/"
    for path in assets():
        rel = path.relative_to(STATIC_DIR).as_posix()
        resp = client.get(f"/ui/{rel}")
        assert resp.status_code == 200, rel
        assert resp.content == path.read_bytes(), rel
        assert resp.headers["content-security-policy"] == CSP, rel
        assert resp.headers["x-content-type-options"] == "nosniff"
        if rel.endswith(".js"):  # a module script must come with a JavaScript MIME type
            assert resp.headers["content-type"].split(";")[0] in ("text/javascript", "application/javascript"), rel
    assert client.get("/ui/nope.js").status_code == 404
    # Self only, and no inline script or style anywhere.
    directives = dict(d.strip().split(" ", 1) for d in CSP.split(";"))
    assert directives["default-src"] == "'none'" and directives["script-src"] == "'self'"
    assert "unsafe" not in CSP and "http" not in CSP and "*" not in CSP


def test_no_asset_references_another_origin_and_every_local_reference_exists():
    checked = 0
    for path in assets():
        text = path.read_text(encoding="utf-8")
        code = _without_comments(text) if path.suffix in {".js", ".css"} else text
        for pattern in REFERENCES:
            for ref in pattern.findall(code):
                assert not re.match(r"^(?:[a-z][a-z0-9+.-]*:|//)", ref, re.I), f"{path.name}: external reference {ref!r}"
                if pattern.pattern.startswith(r"\bfetch") or ref.startswith("#") or "${" in ref:
                    continue  # API paths, in-page anchors, templates
                target = (path.parent / ref.split("?")[0]).resolve()
                assert target.is_file(), f"{path.name}: {ref!r} does not exist"
                checked += 1
        leftovers = [u for u in re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"'`)]*", code) if u != SVG_NS]
        assert not leftovers, f"{path.name}: URLs outside comments: {leftovers[:3]}"
        if path.suffix == ".html":
            assert "<script>" not in text and "style=" not in text and not re.search(r"\son\w+=", text), path.name
    assert checked >= 10


def test_the_vendored_chart_library_matches_vendored_md():
    record = (STATIC_DIR / "vendor" / "VENDORED.md").read_text()
    rows = re.findall(r"\|\s*`([^`]+)`\s*\|\s*([0-9a-f]{64})\s*\|", record)
    assert len(rows) >= 3
    for rel, sha in rows:
        assert hashlib.sha256((STATIC_DIR / "vendor" / rel).read_bytes()).hexdigest() == sha, rel
    assert "MIT" in (STATIC_DIR / "vendor" / "uplot" / "LICENSE").read_text()
