"""The read endpoints the console adds (server/api/routes/console.py), in-process on SQLite:
who the token is, the fleet summary, round bytes, the lineage graph, a sample as a PNG."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from server.console.png import NotAnImageError, encode_png, to_pixels
from server.db.engine import transaction
from server.domain import operators as ops
from server.domain import rounds as R
from tests.server.test_rest_api import ingest, make_client, random_images, register

SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the database is incidental


@SQLITE
def test_whoami_names_the_tokens_scope_and_a_read_token_cannot_write(server_ctx):
    c = make_client(server_ctx)
    assert c.get("/api/v1/whoami").json()["scope"] == "admin"
    with transaction(server_ctx.factory) as s:
        row, secret = ops.create_token(s, name="viewer", scope="read")
    viewer = {"Authorization": f"Bearer {secret}"}
    me = c.get("/api/v1/whoami", headers=viewer).json()
    assert me == {"token_id": row.id, "name": "viewer", "scope": "read", "expires_at": None}
    assert c.post("/api/v1/rounds", json={}, headers=viewer).status_code == 403
    assert c.get("/api/v1/whoami", headers={"Authorization": "Bearer nope"}).status_code == 401


@SQLITE
def test_fleet_summary_rounds_versions_and_sample_images(server_ctx):
    c = make_client(server_ctx)
    a = register(server_ctx, "hw-a", tags=["lab"]).device
    register(server_ctx, "hw-b")
    images = random_images(2, seed=3)
    ids = ingest(server_ctx, a.id, images, [1, None])
    c.post(f"/api/v1/devices/{a.id}/revoke")
    fleet = c.get("/api/v1/console/fleet").json()
    assert (fleet["devices"], fleet["revoked"], fleet["online"], fleet["offline"]) == (2, 1, 1, 0)
    assert (fleet["samples_labelled"], fleet["samples_unlabelled"], fleet["latest_version"]) == (1, 1, 0)
    # The one active device registered on version 0 but reports nothing yet: behind.
    assert fleet["behind"] == 1 and fleet["versions_in_use"] == [{"model_hash": "", "number": None, "devices": 1}]
    with transaction(server_ctx.factory) as s:
        rid = R.create_round(s, method="full", cohort={"all": True}, params={}).id
    stats = c.get("/api/v1/console/rounds").json()
    assert [r["id"] for r in stats["data"]] == [rid] and stats["data"][0]["bytes_sent"] == 0
    assert stats["data"][0]["delivery_s"] is None
    assert c.get(f"/api/v1/console/rounds/{rid}/deliveries").json()["data"] == []
    assert c.get("/api/v1/console/rounds/nope/deliveries").status_code == 404
    graph = c.get("/api/v1/console/versions").json()["data"]
    assert [(v["number"], v["parent_hash"], v["method"]) for v in graph] == [(0, None, "init")]
    assert graph[0]["full_size"] > 0
    assert c.get("/api/v1/console/subnets").json() == {"data": [], "count": 0}
    assert c.get(f"/api/v1/console/devices/{a.id}/history").json()["data"] == []
    assert c.get("/api/v1/console/devices/nope/history").status_code == 404
    # A sample as a PNG: exactly its pixels.
    png = c.get(f"/api/v1/console/samples/{ids[1]}/image.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.content))), images[1][0])
    assert c.get(f"/api/v1/console/samples/{'0' * 64}/image.png").status_code == 404
    assert c.get("/api/v1/console/samples/xyz/image.png").status_code == 422


def test_png_encoder_round_trips_grey_and_rgb_and_refuses_non_images():
    rng = np.random.default_rng(0)
    for x in (rng.integers(0, 256, (7, 5), dtype=np.uint8), rng.integers(0, 256, (3, 4, 6), dtype=np.uint8)):
        pixels = to_pixels(x)
        back = np.asarray(Image.open(io.BytesIO(encode_png(pixels))))
        assert np.array_equal(back, pixels)
    scaled = to_pixels(np.array([[[-1.0, 0.0], [1.0, 3.0]]], dtype=np.float32))
    assert scaled.tolist() == [[0, 64], [128, 255]]
    with pytest.raises(NotAnImageError):
        to_pixels(np.zeros(64, dtype=np.float32))
