"""The console in headless chromium against a real server with real agents and real rounds:
sign in with a token, see the fleet's devices, trigger a round from the form and watch it
finish (pushed over server-sent events), label a sample with the keyboard, act as admin; a
``read`` token sees no action buttons and the API refuses its writes. Screenshots go to
test-artifacts/console/ (EDGELOOP_TEST_ARTIFACTS overrides)."""

from __future__ import annotations

import json
import re

from playwright.sync_api import expect

from tests.console.conftest import shot

ROUND_TIMEOUT_MS = 120_000  # a bound on a loaded machine, not a target: the waits end on the event


def _audit(fleet, action: str) -> list[dict]:
    with fleet.api() as c:
        return [e for e in c.get("/audit?limit=200").json()["data"] if e["action"] == action]


def test_operator_sees_the_fleet_runs_a_round_and_labels_a_sample(fleet, page_for):
    page = page_for(fleet.admin_token)
    assert page.text_content("#scope") == "admin"
    page.goto(fleet.base + "/ui/#/devices")
    page.wait_for_selector("#device-table tbody tr td:text('sim-0')")
    page.wait_for_selector("#device-table tbody tr td:text('sim-1')")
    page.select_option("#f-tag", "site-1")  # the tag filter leaves one device
    assert page.locator("#device-table tbody tr").count() == 1
    shot(page, "devices")

    # The form shows the API's validation error, then starts a real round.
    page.goto(fleet.base + "/ui/#/rounds")
    page.wait_for_selector("#round-form")
    page.select_option("#r-method", "full")
    page.fill("#r-params", json.dumps({"epochs": 0}))
    page.click("#r-submit")
    error = page.wait_for_selector("#round-error .error")
    assert "invalid params for method 'full': epochs" in error.text_content()
    page.fill("#r-params", json.dumps({"epochs": 3, "skip_if_worse": False}))
    page.click("#r-submit")
    page.wait_for_url("**/ui/#/rounds/*")
    round_id = page.url.rsplit("/", 1)[-1]
    # A second round of the same lineage waits in the queue behind it: cancel it from its page.
    with fleet.api() as c:
        queued = c.post("/rounds", json={"method": "full", "cohort": {"all": True}}).json()["id"]
    page.goto(f"{fleet.base}/ui/#/rounds/{queued}")
    page.click("#round-head button[data-action=cancel]")
    expect(page.locator("#round-status")).to_have_text("failed")  # pushed by the event stream
    expect(page.locator("#round-head")).to_contain_text("cancelled by an operator")
    page.goto(f"{fleet.base}/ui/#/rounds/{round_id}")
    page.wait_for_selector("#live:text('live')")  # the event stream is open
    page.wait_for_selector("#round-status .pill:text('done')", timeout=ROUND_TIMEOUT_MS)
    # Delivery: both devices get the new version's bytes, shown with the artefact chain.
    chain = page.locator("#round-chain tbody tr")
    expect(chain).to_have_count(2, timeout=ROUND_TIMEOUT_MS)
    for i in range(2):
        expect(chain.nth(i)).to_contain_text(re.compile(r"(full|diff|seed) "), timeout=ROUND_TIMEOUT_MS)
    # ...and the stream keeps pushing after "done": both devices commit the version.
    expect(page.locator("#round-body")).to_contain_text("2 / 0 / 2", timeout=ROUND_TIMEOUT_MS)
    shot(page, "round")
    with fleet.api() as c:
        report = c.get(f"/rounds/{round_id}").json()
    assert report["status"] == "done" and report["method"] == "full" and report["params"]["epochs"] == 3

    # Label an unlabelled sample with the keyboard: select, type the class, Enter saves.
    page.goto(fleet.base + "/ui/#/samples")
    first = page.wait_for_selector("#sample-grid .sample")
    sample_id = first.get_attribute("data-sample")
    expect(page.locator("#sample-grid .sample img").first).to_have_attribute("src", re.compile("^blob:"))
    assert first.eval_on_selector("img", "img => img.decode().then(() => img.naturalWidth)") == 8  # 8x8 digits
    first.click()
    page.keyboard.press("3")
    assert page.text_content(f"#sample-grid .sample[data-sample='{sample_id}'] .lab") == "3"
    page.keyboard.press("Enter")
    page.wait_for_selector("#labels-saved:text('saved')")
    with fleet.api() as c:
        labelled = c.get("/samples?labelled=true&limit=1000&device_id=" + fleet_device(fleet, "sim-1")).json()["data"]
    assert [s["label"] for s in labelled if s["sample_id"] == sample_id] == [3]

    page.goto(fleet.base + "/ui/#/overview")
    page.wait_for_selector("#charts .chart canvas")
    shot(page, "overview")
    assert page.errors == []
    assert set(page.refused) <= {(422, "/api/v1/rounds"), (404, "/favicon.ico")}, page.refused
    # Every action went through the audited API under the token's name (newest first).
    with fleet.api() as c:
        me = c.get("/whoami").json()["name"]
    created = _audit(fleet, "rounds-create_round")
    assert [(e["status"], e["token_name"]) for e in created] == [(202, me), (202, me), (422, me)]
    assert [(e["status"], e["target"]) for e in _audit(fleet, "rounds-cancel_round")] == [(200, f"round_id={queued}")]
    assert [(e["status"], e["token_name"]) for e in _audit(fleet, "samples-set_labels")] == [(200, me)]


def fleet_device(fleet, name: str) -> str:
    with fleet.api() as c:
        return next(d["id"] for d in c.get("/devices").json()["data"] if d["name"] == name)


def test_a_read_token_sees_no_actions_and_its_writes_are_refused(fleet, page_for):
    with fleet.api() as c:
        read = c.post("/tokens", json={"name": "viewer", "scope": "read"}).json()["token"]
    page = page_for(read)
    assert page.text_content("#scope") == "read"
    assert page.locator("#nav-enrollment").count() == 0
    for route, ready in (("rounds", "#round-list table"), ("devices", "#device-table table"),
                         ("samples", "#sample-grid")):
        page.goto(f"{fleet.base}/ui/#/{route}")
        page.wait_for_selector(ready)
        assert page.locator("button[data-action], #round-form, #save-labels").count() == 0, route
        assert "null" not in page.text_content("main") and "undefined" not in page.text_content("main"), route
    expect(page.locator("#sample-grid .sample img").first).to_have_attribute("src", re.compile("^blob:"))
    shot(page, "read-only")  # a read token still sees the samples, as images
    status = page.evaluate("""async (t) => (await fetch('/api/v1/rounds', {method: 'POST',
        headers: {Authorization: 'Bearer ' + t, 'Content-Type': 'application/json'}, body: '{}'})).status""", read)
    assert status == 403
    assert [e["token_name"] for e in _audit(fleet, "rounds-create_round") if e["status"] == 403] == ["viewer"]
    assert page.errors == []
    # The event stream as any client reads it (docs/console.md): a read token may follow it.
    with fleet.api(read) as c:
        assert c.get("/events", params={"round_id": "nope"}).status_code == 404
        with c.stream("GET", "/events") as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            lines = resp.iter_lines()
            assert next(lines) == "retry: 2000" and next(lines) == ""
            assert next(lines) == "id: 1" and next(lines) == "event: rounds"
            data = next(lines)
    payload = json.loads(data.removeprefix("data: "))
    with fleet.api(read) as c:
        assert payload == c.get("/rounds", params={"limit": 20}).json()  # the same items as the list


def test_admin_revokes_and_restores_a_device_and_creates_an_enrollment_token(fleet, page_for):
    page = page_for(fleet.admin_token)
    device = fleet_device(fleet, "sim-1")
    with fleet.api() as c:  # the server samples each device's accuracy at every heartbeat interval
        points = fleet.wait(lambda: c.get(f"/console/devices/{device}/history").json()["data"], 30, "history")
    assert points[-1]["model_hash"]  # the first ones may predate its first heartbeat
    page.goto(f"{fleet.base}/ui/#/devices/{device}")
    page.wait_for_selector(".chart[data-chart='Accuracy over time'] canvas")
    page.click("button[data-action=revoke]")
    page.wait_for_selector("button[data-action=restore]")
    page.click("button[data-action=restore]")
    page.wait_for_selector("button[data-action=revoke]")
    page.goto(f"{fleet.base}/ui/#/enrollment")
    page.fill("#e-name", "site-b")
    page.fill("#e-tags", "site-b")
    page.click("#e-submit")
    secret = page.wait_for_selector("#enroll-secret").text_content()
    assert secret.startswith("elen_")
    page.wait_for_selector("#enroll-list td:text('site-b')")
    page.wait_for_selector("#audit-list td:text('devices-restore_device')")
    assert [e["status"] for e in _audit(fleet, "devices-revoke_device")] == [200]
    assert [e["status"] for e in _audit(fleet, "enrollment-create_enrollment_token")] == [201]
    assert page.errors == []
