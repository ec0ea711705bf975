"""Sample ingest, counts, labelling and training-set assembly on SQLite and PostgreSQL, with
real Fashion-MNIST images."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import func, select

from server.db.engine import transaction
from server.db.models import Device, Sample
from server.domain import devices as D
from server.domain.errors import InvalidArgumentError, NotFoundError
from server.domain.samples import (
    SAMPLE_VALUE_ABS_MAX,
    SampleCache,
    SampleIn,
    ingest_samples,
    is_validation,
    label_samples,
    load_labelled,
    sample_counts,
)
from shared.data import load_dataset
from shared.samples import encode_sample, sample_id
from shared.tensors import to_model_input


@pytest.fixture(scope="module")
def fmnist():
    ds = load_dataset("fashion-mnist")
    return ds.x_test[:400], ds.y_test[:400]


def sample_in(x: np.ndarray, label: int | None = None, **kw) -> SampleIn:
    payload = encode_sample(x)
    return SampleIn(sample_id=kw.pop("sid", sample_id(payload)), payload=kw.pop("payload", payload), label=label,
                    metadata=kw.pop("metadata", {}), **kw)


def register(ctx, hardware_id: str) -> str:
    with transaction(ctx.factory) as s:
        return D.register_device(s, hardware_id=hardware_id).device.id


def ingest(ctx, device_id: str, samples: list[SampleIn]):
    with transaction(ctx.factory) as s:
        return ingest_samples(s, ctx.blobs, s.get(Device, device_id), samples, arch=ctx.settings.arch,
                              max_bytes=ctx.settings.max_sample_bytes)


def n_rows(ctx) -> int:
    with transaction(ctx.factory) as s:
        return s.scalar(select(func.count()).select_from(Sample))


def test_ingest_stores_rows_and_blobs_and_dedupes(server_ctx, fmnist):
    x, y = fmnist
    dev = register(server_ctx, "hw-1")
    batch = [sample_in(x[i], int(y[i]), metadata={"cam": "front"}, captured_at_ms=1_700_000_000_000) for i in range(10)]
    res = ingest(server_ctx, dev, batch + batch[:3])  # repeated within one stream too
    assert (res.accepted, res.duplicates, res.rejected) == (10, 0, [])
    assert sorted(res.committed_ids) == sorted(s.sample_id for s in batch)
    for s in batch:
        assert server_ctx.blobs.get(s.sample_id) == s.payload
    with transaction(server_ctx.factory) as s:
        row = s.scalars(select(Sample).where(Sample.sample_id == batch[0].sample_id)).one()
        assert row.shape == [1, 28, 28] and row.dtype == "uint8" and row.label == int(y[0])
        assert row.size == len(batch[0].payload) and row.meta == {"cam": "front"}
        assert row.captured_at is not None and row.captured_at.year == 2023
    # A re-sent stream (the ack was lost) is acknowledged again but stored once.
    again = ingest(server_ctx, dev, batch[5:] + [sample_in(x[20], int(y[20]))])
    assert (again.accepted, again.duplicates) == (1, 5)
    assert len(again.committed_ids) == 6
    assert n_rows(server_ctx) == 11
    # The same image from another device is that device's sample.
    other = register(server_ctx, "hw-2")
    assert ingest(server_ctx, other, batch[:2]).accepted == 2
    assert n_rows(server_ctx) == 13


def test_rejected_samples_carry_reasons_and_store_nothing(server_ctx, fmnist):
    x, _ = fmnist
    dev = register(server_ctx, "hw-1")
    good = sample_in(x[0], 1)
    wrong_shape = encode_sample(np.zeros((1, 28, 27), np.uint8))
    cases = {
        "bad id": sample_in(x[1], 1, sid="0" * 64),
        "shape": SampleIn(sample_id(wrong_shape), wrong_shape, 1, {}),
        "label": sample_in(x[2], 10),
        "negative": sample_in(x[3], -1),
        "payload": SampleIn(sample_id(b"ELS1garbage"), b"ELS1garbage", 1, {}),
        "float nan": sample_in(np.full((1, 28, 28), np.nan, np.float32), 1),
        "metadata": sample_in(x[4], 1, metadata={"k" * 65: "v"}),
        "too many meta": sample_in(x[5], 1, metadata={f"k{i}": "v" for i in range(33)}),
    }
    res = ingest(server_ctx, dev, [good, *cases.values()])
    assert res.accepted == 1 and res.committed_ids == [good.sample_id]
    reasons = dict(res.rejected)
    assert len(reasons) == len(cases)
    assert "SHA-256" in reasons["0" * 64]
    assert "does not match the fleet model input (1, 28, 28)" in reasons[cases["shape"].sample_id]
    assert "label 10 outside [0, 10)" in reasons[cases["label"].sample_id]
    assert "label -1" in reasons[cases["negative"].sample_id]
    assert reasons[cases["payload"].sample_id]  # the parser's message
    assert "NaN" in reasons[cases["float nan"].sample_id]
    assert "metadata" in reasons[cases["metadata"].sample_id]
    assert "metadata" in reasons[cases["too many meta"].sample_id]
    assert n_rows(server_ctx) == 1
    for sid, _ in res.rejected:
        if len(sid) == 64 and sid != "0" * 64:
            assert not server_ctx.blobs.has(sid)


def test_oversized_payload_is_rejected(server_ctx):
    dev = register(server_ctx, "hw-1")
    big = encode_sample(np.zeros((1, 28, 28), np.float32))
    with transaction(server_ctx.factory) as s:
        res = ingest_samples(s, server_ctx.blobs, s.get(Device, dev), [SampleIn(sample_id(big), big, None, {})],
                             arch=server_ctx.settings.arch, max_bytes=len(big) - 1)
    assert res.accepted == 0 and "exceeds" in res.rejected[0][1]


def test_float32_samples_of_the_right_shape_are_accepted(server_ctx):
    dev = register(server_ctx, "hw-1")
    x = np.random.default_rng(0).random((1, 28, 28), dtype=np.float32)
    assert ingest(server_ctx, dev, [sample_in(x, 3)]).accepted == 1


def test_float_samples_out_of_range_or_not_finite_are_refused_with_the_reason(server_ctx):
    dev = register(server_ctx, "hw-1")
    limit = server_ctx.settings.sample_value_abs_max
    assert limit == SAMPLE_VALUE_ABS_MAX  # the documented default
    one_spike = np.zeros((1, 28, 28), np.float32)
    one_spike[0, 13, 7] = -1e30  # a single element is enough
    bad = {
        "all 1e30": sample_in(np.full((1, 28, 28), 1e30, np.float32), 1),
        "one -1e30": sample_in(one_spike, 2),
        "just above": sample_in(np.full((1, 28, 28), np.nextafter(np.float32(limit), np.float32(np.inf))), 3),
        "nan": sample_in(np.full((1, 28, 28), np.nan, np.float32), 4),
        "inf": sample_in(np.full((1, 28, 28), np.inf, np.float32), 5),
        "-inf": sample_in(np.full((1, 28, 28), -np.inf, np.float32), 6),
    }
    good = [sample_in(np.full((1, 28, 28), -limit, np.float32), 7),  # the bound itself is allowed
            sample_in(np.full((1, 28, 28), 255, np.uint8), 8)]  # uint8 is [0, 1] to the model
    res = ingest(server_ctx, dev, [*bad.values(), *good])
    assert res.accepted == 2 and sorted(res.committed_ids) == sorted(g.sample_id for g in good)
    reasons = dict(res.rejected)
    assert set(reasons) == {b.sample_id for b in bad.values()}
    assert f"magnitude 1e+30 exceeds sample_value_abs_max={limit:g}" in reasons[bad["all 1e30"].sample_id]
    assert "magnitude 1e+30 exceeds" in reasons[bad["one -1e30"].sample_id]
    assert "exceeds sample_value_abs_max" in reasons[bad["just above"].sample_id]
    for key in ("nan", "inf", "-inf"):
        assert "NaN or infinity" in reasons[bad[key].sample_id]
    assert n_rows(server_ctx) == 2
    assert not any(server_ctx.blobs.has(b.sample_id) for b in bad.values())


def test_the_float_sample_bound_is_configurable(server_ctx):
    dev = register(server_ctx, "hw-1")
    small, large = (sample_in(np.full((1, 28, 28), v, np.float32), 1) for v in (2.5, 3.5))
    with transaction(server_ctx.factory) as s:
        res = ingest_samples(s, server_ctx.blobs, s.get(Device, dev), [small, large], arch=server_ctx.settings.arch,
                             max_bytes=server_ctx.settings.max_sample_bytes, value_abs_max=3.0)
    assert res.committed_ids == [small.sample_id]
    assert dict(res.rejected) == {large.sample_id: "float sample value of magnitude 3.5 exceeds "
                                                   "sample_value_abs_max=3 (inputs reach the model unscaled)"}


def test_uint8_images_beside_float_samples_load_on_the_model_scale(server_ctx, fmnist):
    """np.stack would promote the images to float unscaled (0..255); each must keep the scale
    shared.tensors.to_model_input gives it."""
    x, y = fmnist
    dev = register(server_ctx, "hw-1")
    floats = np.random.default_rng(0).random((30, 1, 28, 28), dtype=np.float32)
    ingest(server_ctx, dev, [sample_in(x[i], int(y[i])) for i in range(30)]
           + [sample_in(floats[i], 1) for i in range(30)])
    with transaction(server_ctx.factory) as s:
        d = load_labelled(s, SampleCache(server_ctx.blobs), server_ctx.settings.arch, 0.2)
    xs = np.concatenate([d.x_train, d.x_val])
    assert d.total == 60 and xs.dtype == np.float32 and 0.0 <= xs.min() and xs.max() <= 1.0
    got = {xi.tobytes() for xi in xs}
    for i in range(30):
        assert to_model_input(x[i]).numpy().tobytes() in got
        assert floats[i].tobytes() in got


def test_counts_and_labelling_is_all_or_nothing(server_ctx, fmnist):
    x, y = fmnist
    a, b = register(server_ctx, "hw-a"), register(server_ctx, "hw-b")
    unl = [sample_in(x[i]) for i in range(6)]
    ingest(server_ctx, a, unl[:4])
    ingest(server_ctx, b, unl[2:] + [sample_in(x[10], 7)])
    with transaction(server_ctx.factory) as s:
        counts = {(c["device_id"], c["label"]): c["count"] for c in sample_counts(s)}
    assert counts == {(a, None): 4, (b, None): 4, (b, 7): 1}

    sid = [u.sample_id for u in unl]
    # One bad entry (unknown sample, or label out of range) and nothing changes at all.
    for bad in ((("f" * 64), None, 1), (sid[1], None, 10)):
        with pytest.raises((NotFoundError, InvalidArgumentError)):
            with transaction(server_ctx.factory) as s:
                label_samples(s, [(sid[0], None, 1), bad], num_classes=10)
        with transaction(server_ctx.factory) as s:
            assert s.scalar(select(func.count()).select_from(Sample).where(Sample.label.is_not(None))) == 1

    with transaction(server_ctx.factory) as s:
        # device None: every device's copy; a device id: only that copy.
        assert label_samples(s, [(sid[2], None, 4), (sid[0], a, 5), (sid[5], b, 6)], num_classes=10) == 4
    with transaction(server_ctx.factory) as s:
        counts = {(c["device_id"], c["label"]): c["count"] for c in sample_counts(s)}
        with pytest.raises(NotFoundError):
            label_samples(s, [(sid[0], b, 1)], num_classes=10)  # b never sent sid[0]
    assert counts[(a, 4)] == 1 and counts[(b, 4)] == 1 and counts[(a, 5)] == 1 and counts[(b, 6)] == 1
    assert counts[(a, None)] == 2 and counts[(b, None)] == 2


def test_load_labelled_split_is_by_hash_and_stable(server_ctx, fmnist):
    x, y = fmnist
    arch, frac = server_ctx.settings.arch, server_ctx.settings.val_fraction
    a, b = register(server_ctx, "hw-a"), register(server_ctx, "hw-b")
    first = [sample_in(x[i], int(y[i])) for i in range(200)]
    ingest(server_ctx, a, first)
    ingest(server_ctx, b, first[:50])  # the same images from a second device count once
    cache = SampleCache(server_ctx.blobs)
    with transaction(server_ctx.factory) as s:
        d1 = load_labelled(s, cache, arch, frac)
    assert d1.total == 200
    assert d1.x_train.shape[1:] == (1, 28, 28) and d1.x_train.dtype == np.uint8
    assert 0.08 < len(d1.y_val) / d1.total < 0.35  # about val_fraction (0.2) of 200
    expected_val = {s.sample_id for s in first if is_validation(s.sample_id, frac)}
    val_rows = {sample_id(encode_sample(v)) for v in d1.x_val}
    assert val_rows == expected_val
    # Labels travel with their images.
    lookup = {first[i].sample_id: int(y[i]) for i in range(200)}
    for xi, yi in zip(d1.x_train, d1.y_train, strict=True):
        assert lookup[sample_id(encode_sample(xi))] == yi

    # More data later: no earlier sample moves between train and validation.
    ingest(server_ctx, a, [sample_in(x[i], int(y[i])) for i in range(200, 300)])
    with transaction(server_ctx.factory) as s:
        d2 = load_labelled(s, SampleCache(server_ctx.blobs), arch, frac)
    assert d2.total == 300
    assert val_rows <= {sample_id(encode_sample(v)) for v in d2.x_val}
    train1 = {sample_id(encode_sample(v)) for v in d1.x_train}
    assert train1 <= {sample_id(encode_sample(v)) for v in d2.x_train}


def test_load_labelled_when_empty(server_ctx):
    with transaction(server_ctx.factory) as s:
        d = load_labelled(s, SampleCache(server_ctx.blobs), server_ctx.settings.arch, 0.2)
    assert d.total == 0 and d.x_train.shape == (0, 1, 28, 28) and d.y_val.dtype == np.int64


def test_sample_cache_evicts_oldest(tmp_path):
    from server.store.blobs import BlobStore

    blobs = BlobStore(tmp_path)
    ids = [blobs.put(encode_sample(np.full(3, i, np.uint8))) for i in range(4)]
    cache = SampleCache(blobs, max_items=2)
    for sid in ids:
        cache.get(sid)
    assert list(cache._items) == ids[2:]
    np.testing.assert_array_equal(cache.get(ids[0]), np.zeros(3, np.uint8))
