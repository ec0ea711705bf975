"""Round trips of the sparse diff codec: bit-exact targets, residuals, chains, size targets."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.artefacts import decode_artefact, encode_full_model
from shared.codec import (
    DIFF_ENCODING,
    VALUE_FORMATS,
    DiffError,
    WrongBaseError,
    apply_chain,
    binary_entropy,
    decode_diff,
    encode_update,
    ideal_paper_bits,
    make_update,
    read_header,
    size_breakdown,
)
from shared.models import ArchSpec, build_model, default_spec, init_weights_from_seed, model_hash

# The codec hashes the architecture it is given with the tensors (a diff keeps its base's
# architecture); it does not build the model, so these states need not fit it.
ARCH = ArchSpec("mlp", (4,), 4, hidden=())


def mhash(state) -> str:
    return model_hash(ARCH, state)


FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DTYPES = FLOATS + (torch.int64, torch.int32, torch.uint8, torch.bool)
NAMES = ("a.weight", "b.bias", "bn.num_batches_tracked", "conv.weight", "z", "ü.weight", "A")


def _random_tensor(
    rng: np.random.Generator, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.from_numpy(np.asarray(rng.standard_normal(shape), dtype=np.float32)).to(dtype)
    if dtype == torch.bool:
        return torch.from_numpy(np.asarray(rng.random(shape) < 0.5))
    return torch.from_numpy(np.asarray(rng.integers(0, 200, size=shape))).to(dtype)


def _changed(rng: np.random.Generator, t: torch.Tensor, k: float) -> torch.Tensor:
    """``t`` with a random fraction ``k`` of its elements changed."""
    mask = torch.from_numpy(np.asarray(rng.random(tuple(t.shape)) < k))
    if t.dtype.is_floating_point:
        scale = float(10 ** rng.uniform(-4, 0))
        noise = (
            torch.from_numpy(np.asarray(rng.standard_normal(tuple(t.shape)), dtype=np.float32))
            * scale
        )
        return torch.where(mask, (t.float() + noise).to(t.dtype), t)
    if t.dtype == torch.bool:
        return torch.where(mask, ~t, t)
    return torch.where(mask, t + 1, t)


@st.composite
def state_pairs(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))
    base, target = {}, {}
    for name in names:
        dtype = draw(st.sampled_from(DTYPES))
        shape = tuple(draw(st.lists(st.integers(1, 40), min_size=0, max_size=3)))
        k = draw(st.sampled_from([0.0, 0.002, 0.05, 0.3, 0.7, 1.0]))
        base[name] = _random_tensor(rng, dtype, shape)
        target[name] = _changed(rng, base[name], k)
    return base, target


def _assert_same_state(a: dict, b: dict) -> None:
    assert mhash(a) == mhash(b)


@settings(max_examples=40, deadline=None)
@given(pair=state_pairs(), value_format=st.sampled_from(VALUE_FORMATS))
def test_round_trip_is_bit_exact(pair, value_format):
    base, target = pair
    base_copy = {k: v.clone() for k, v in base.items()}
    update = make_update(base, target, value_format, arch=ARCH)
    blob = encode_update(update, mhash(base))
    out = decode_diff(blob, base, base_arch=ARCH)
    assert out.model_hash == update.target_hash == mhash(update.target)
    assert out.base_hash == mhash(base)
    _assert_same_state(out.state, update.target)
    _assert_same_state(update.apply(base), update.target)
    _assert_same_state(base, base_copy)  # decoding does not touch the base
    if value_format == "fp32":
        _assert_same_state(update.target, target)
    for name, res in update.residual.items():
        want = target[name].double() - update.target[name].double()
        assert torch.equal(res, want.to(res.dtype)), name
    assert sum(
        size_breakdown(blob)[k]
        for k in ("header", "table", "indices", "values", "dense", "checksum")
    ) == len(blob)


def _mlp_base(seed: int = 0) -> dict[str, torch.Tensor]:
    model = init_weights_from_seed(build_model(default_spec("mlp", (1, 28, 28), 10)), seed)
    return {n: t.clone() for n, t in model.state_dict().items()}


def _dpu_target(base: dict, k: float, seed: int) -> dict[str, torch.Tensor]:
    """A DPU-style target: the top-k fraction (over the whole model) of a random change."""
    gen = torch.Generator().manual_seed(seed)
    deltas = {n: torch.randn(t.shape, generator=gen) * 1e-2 for n, t in base.items()}
    flat = torch.cat([d.abs().flatten() for d in deltas.values()])
    thr = flat.topk(max(1, round(k * flat.numel()))).values[-1]
    return {n: torch.where(deltas[n].abs() >= thr, base[n] + deltas[n], base[n]) for n in base}


def _mlp_pair(k: float, seed: int = 0):
    base = _mlp_base(seed)
    return base, _dpu_target(base, k, seed)


@pytest.mark.parametrize("value_format", VALUE_FORMATS)
def test_mlp_diff_decodes_through_the_registry(value_format):
    base, target = _mlp_pair(0.01)
    arch = default_spec("mlp", (1, 28, 28), 10)
    update = make_update(base, target, value_format, arch=arch)
    blob = encode_update(update, model_hash(arch, base))
    out = decode_artefact(blob, base, base_arch=arch)
    assert out.encoding == DIFF_ENCODING
    assert out.model_hash == update.target_hash
    head = read_header(blob)
    assert (head.base_hash, head.target_hash, head.total_bytes) == (
        model_hash(arch, base),
        update.target_hash,
        len(blob),
    )
    assert {t.name for t in head.tensors} == set(update.deltas)
    assert sum(t.nnz for t in head.tensors if t.layout == "sparse") <= update.nnz
    # The base's architecture is part of its identity: the same tensors under an MLP over
    # [784] inputs are another model, which this diff does not apply to.
    flat = default_spec("mlp", (784,), 10)
    with pytest.raises(WrongBaseError):
        decode_artefact(blob, base, base_arch=flat)
    with pytest.raises(DiffError, match="architecture"):
        decode_artefact(blob, base)
    # full models still decode: the diff sniffer must not shadow safetensors
    full, digest = encode_full_model(arch, base)
    assert decode_artefact(full).model_hash == digest


def test_quantised_residuals_are_bounded_by_half_a_step():
    base, target = _mlp_pair(0.02, seed=3)
    update = make_update(base, target, "int8", arch=ARCH)
    for name, d in update.deltas.items():
        if d.coding != "int8":
            continue
        res = update.residual[name].abs().max().item()
        ulp = torch.finfo(torch.float32).eps * float(target[name].abs().max())
        assert res <= float(d.scale) / 2 + 2 * ulp, name
    # shipped exactly: biases (dim 1) even under int8
    assert all(update.residual[n].abs().max() == 0 for n in base if base[n].dim() <= 1)


def test_int8_apply_matches_an_independent_float32_computation():
    """The decoder's arithmetic equals plain torch float32 ops: base + float(q) * scale."""
    base, target = _mlp_pair(0.05, seed=5)
    update = make_update(base, target, "int8", arch=ARCH)
    d = update.deltas["net.3.weight"]
    assert d.coding == "int8"
    idx = torch.from_numpy(d.indices)
    q = torch.from_numpy(d.values.astype(np.int8)).to(torch.float32)
    scale = torch.tensor(float(d.scale), dtype=torch.float32)
    expect = base["net.3.weight"].flatten().clone()
    expect[idx] = expect[idx] + q * scale
    assert torch.equal(update.target["net.3.weight"].flatten(), expect)


def test_dense_names_and_low_rank_tensors_are_exact():
    base, target = _mlp_pair(0.05, seed=1)
    update = make_update(base, target, "fp16", dense_names={"net.3.weight"}, arch=ARCH)
    assert update.deltas["net.3.weight"].coding == "raw"
    assert torch.equal(update.target["net.3.weight"], target["net.3.weight"])
    assert update.deltas["net.1.weight"].coding == "fp16"


def test_error_feedback_drives_the_agent_to_the_target():
    """Carrying the residual into the next round shrinks the error that int8 leaves."""
    base, target = _mlp_pair(0.02, seed=2)
    state = base
    errors = []
    intended = target
    for _ in range(4):
        update = make_update(state, intended, "int8", arch=ARCH)
        state = decode_diff(encode_update(update, mhash(state)), state, base_arch=ARCH).state
        errors.append(max(float((target[n] - state[n]).abs().max()) for n in target))
        intended = {n: (state[n].double() + update.residual[n].double()).float() for n in state}
    assert errors[-1] < errors[0] / 50


def test_cnn_with_batchnorm_buffers_round_trips():
    """BatchNorm running stats change densely and num_batches_tracked is an int64 scalar:
    both ship exactly (dense layout where that is smaller), conv weights ship as int8."""
    spec = default_spec("cnn", (1, 28, 28), 10)
    model = init_weights_from_seed(build_model(spec), 4)
    base = {n: t.clone() for n, t in model.state_dict().items()}
    target = _dpu_target(base, 0.01, seed=4)
    for name, t in base.items():
        if "running_" in name:
            target[name] = t + 0.1
        elif name.endswith("num_batches_tracked"):
            target[name] = t + 7
    update = make_update(base, target, "int8", arch=ARCH)
    blob = encode_update(update, mhash(base))
    out = decode_diff(blob, base, base_arch=ARCH)
    assert out.model_hash == update.target_hash
    layouts = {t.name: (t.layout, t.value_coding) for t in read_header(blob).tensors}
    assert layouts["features.1.running_mean"] == ("dense", "raw")
    assert layouts["features.1.num_batches_tracked"][1] == "raw"
    assert layouts["features.0.weight"][1].startswith("int8")
    for name, t in target.items():
        if "running_" in name or name.endswith("num_batches_tracked"):
            assert torch.equal(out.state[name], t), name


def test_special_values_ship_raw():
    base = {"w": torch.tensor([[0.0, 1.0, 2.0, 3.0]]), "h": torch.zeros(2, 2, dtype=torch.float16)}
    target = {
        "w": torch.tensor([[-0.0, float("nan"), float("inf"), 3.0]]),
        "h": torch.full((2, 2), 7e4).half(),
    }
    for fmt in VALUE_FORMATS:
        update = make_update(base, target, fmt, arch=ARCH)
        out = decode_diff(encode_update(update, mhash(base)), base, base_arch=ARCH)
        assert out.model_hash == mhash(target)


def test_unchanged_state_costs_only_the_frame():
    base, _ = _mlp_pair(0.01)
    update = make_update(base, base, arch=ARCH)
    blob = encode_update(update, mhash(base))
    assert update.nnz == 0 and len(blob) <= 80
    assert decode_diff(blob, base, base_arch=ARCH).model_hash == mhash(base)


def test_apply_chain_follows_the_versions():
    v0 = _mlp_base(7)
    v1 = _dpu_target(v0, 0.01, seed=8)
    v2 = _dpu_target(v1, 0.01, seed=9)
    d1 = encode_update(make_update(v0, v1, arch=ARCH), mhash(v0))
    d2 = encode_update(make_update(v1, v2, arch=ARCH), mhash(v1))
    out = apply_chain(v0, [d1, d2], base_arch=ARCH)
    assert out.model_hash == mhash(v2) and out.base_hash == mhash(v0)
    assert out.meta["chain_length"] == "2"
    with pytest.raises(WrongBaseError, match="diff 1 of 2"):
        apply_chain(v0, [d2, d1], base_arch=ARCH)


def test_make_update_validates_inputs():
    a = {"w": torch.zeros(3)}
    with pytest.raises(ValueError, match="value_format"):
        make_update(a, a, "int4", arch=ARCH)
    with pytest.raises(ValueError, match="only in target"):
        make_update(a, {"w": torch.zeros(3), "x": torch.zeros(1)}, arch=ARCH)
    with pytest.raises(ValueError, match="float16"):
        make_update(a, {"w": torch.zeros(3, dtype=torch.float16)}, arch=ARCH)
    with pytest.raises(ValueError, match="dense_names"):
        make_update(a, a, dense_names={"nope"}, arch=ARCH)
    with pytest.raises(ValueError, match="complex64"):
        make_update(
            {"c": torch.zeros(2, dtype=torch.complex64)},
            {"c": torch.zeros(2, dtype=torch.complex64)}, arch=ARCH
        )
    update = make_update(a, {"w": torch.ones(3)}, arch=ARCH)
    with pytest.raises(ValueError, match="base_hash"):
        encode_update(update, "0" * 64)


@pytest.mark.parametrize("shape", [(512, 784), (512, 512)])
def test_sizes_meet_the_targets_against_the_paper_accounting(shape):
    """Index bits <= 1.05 H(k) I; total bytes (everything) <= 1.1x / 0.5x of S_w k I + H(k) I."""
    gen = torch.Generator().manual_seed(0)
    base = {"net.1.weight": (torch.rand(shape, generator=gen) * 2 - 1) / math.sqrt(shape[1])}
    delta = torch.randn(shape, generator=gen) * 1e-3
    num = shape[0] * shape[1]
    for k in (0.001, 0.005, 0.01, 0.05, 0.1, 0.2):
        thr = delta.abs().flatten().topk(round(k * num)).values[-1]
        target = {
            "net.1.weight": torch.where(
                delta.abs() >= thr, base["net.1.weight"] + delta, base["net.1.weight"]
            )
        }
        for fmt, budget in (("fp32", 1.1), ("int8", 0.5)):
            update = make_update(base, target, fmt, arch=ARCH)
            blob = encode_update(update, mhash(base))
            kk = update.density
            assert size_breakdown(blob)["indices"] * 8 <= 1.05 * binary_entropy(kk) * num, (k, fmt)
            assert len(blob) * 8 <= budget * ideal_paper_bits(kk, num), (k, fmt, len(blob))


DOC = Path(__file__).resolve().parents[2] / "docs" / "diff-format.md"


@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_the_spec_examples_are_what_the_code_produces(fmt):
    """docs/diff-format.md section 9 shows these exact bytes; keep spec and code in step."""
    base = {
        "fc.weight": torch.arange(16, dtype=torch.float32).reshape(4, 4) / 16,
        "fc.bias": torch.zeros(4),
    }
    target = {k: v.clone() for k, v in base.items()}
    target["fc.weight"][0, 2] = 1.5
    target["fc.weight"][2, 1] = -0.25
    target["fc.bias"][1] = 0.5
    blob = encode_update(make_update(base, target, fmt, arch=ARCH), mhash(base))
    block = re.search(rf"<!-- example:{fmt} -->\s*```\n(.*?)```", DOC.read_text(), re.S)
    assert block is not None
    assert bytes.fromhex("".join(block.group(1).split())) == blob
