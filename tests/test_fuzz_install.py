"""Fuzz the agent's install path with mutated real artefacts (issue 8, fault 4).

Real artefacts of a small MLP (a full model, its seed artefact, an fp32 and an int8 DPU diff)
are mutated (bit flips, truncation, extension, spliced and random bytes, and edits that keep
the container valid so the decoder's deeper checks run: safetensors JSON header and metadata
edits, seed JSON edits, diff header and tensor-table fields with a recomputed CRC, recompressed
sections) and pushed through what the agent runs on an update: ``Updater.verify``'s decode
(``decode_artefact`` with the base state for a diff, the agent's ``max_model_parameters``),
its target-hash check, then ``ModelStore.install`` into a real directory.

Asserted: no exception outside the project's typed errors (``ArtefactError`` and its codec
subclasses, ``ModelStoreError``), nothing installed but the exact target, and per-case time
and memory bounds. The figures are printed and written to ``fuzz_install.json`` under the
test's tmp dir: run with ``-s`` to read them.
"""

from __future__ import annotations

import json
import random
import resource
import struct
import time
import traceback
import tracemalloc
import warnings
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from safetensors.torch import load as st_load

import shared.codec  # noqa: F401 - registers the diff decoder, as the agent's updater does
from edge_agent.model_store import ModelStore, ModelStoreError
from edge_agent.settings import AgentSettings
from shared.artefacts import (
    ArtefactError,
    decode_artefact,
    encode_full_model,
    encode_seed_model,
)
from shared.codec import encode_update, make_update
from shared.codec.bitio import ByteReader
from shared.codec.dtypes import WIRE_DTYPES
from shared.codec.wire import (
    C_NONE,
    C_SHUFFLE_ZSTD,
    C_ZSTD,
    CHECKSUM_BYTES,
    Entry,
    Section,
    pack_header,
    parse_header,
    read_entry,
    write_entry,
)
from shared.dpu.selection import global_topk_mask, magnitude_scores
from shared.models import ArchSpec, build_model, init_weights_from_seed, model_hash
from shared.tensors import tensors_hash

ARCH = ArchSpec("mlp", (1, 12, 12), 5, hidden=(24,))
SEED = 7
TYPED = (ArtefactError, ModelStoreError)  # the project's refusals; anything else is a bug
MAX_CASE_SECONDS = 5.0  # generous for two shared CPU cores; typical cases take milliseconds
MAX_CASE_TRACED_BYTES = 64 << 20  # Python/numpy allocations of one case (tracemalloc)
MAX_RSS_GROWTH_BYTES = 512 << 20  # process peak over the whole run (torch's allocator too)
MAX_PARAMETERS = AgentSettings.model_fields["max_model_parameters"].default


# ---------------------------------------------------------------- the real artefacts


@dataclass(frozen=True)
class Artefact:
    kind: str  # full | seed | diff-fp32 | diff-int8
    data: bytes
    target: str  # the model hash the server announces
    base: dict | None  # the model the agent holds (diffs only)


def _dpu_target(base: dict, seed: int) -> dict:
    """What a DPU round ships: the k = 10 % largest changes of a 'trained' model (Alg. 5.2)."""
    gen = torch.Generator().manual_seed(seed)
    trained = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    change = {k: trained[k] - base[k] for k in base}
    mask = global_topk_mask(magnitude_scores(change), 0.1)
    return {k: torch.where(mask[k], trained[k], base[k]) for k in base}


def real_artefacts() -> list[Artefact]:
    base = {k: v.detach().clone() for k, v in
            init_weights_from_seed(build_model(ARCH), SEED).state_dict().items()}
    base_hash = model_hash(ARCH, base)
    full, digest = encode_full_model(ARCH, base, extra={"round": "r1"})
    out = [Artefact("full", full, digest, None),
           Artefact("seed", encode_seed_model(ARCH, SEED, base_hash), base_hash, None)]
    for i, fmt in enumerate(("fp32", "int8")):
        update = make_update(base, _dpu_target(base, i), fmt, arch=ARCH)
        out.append(Artefact(f"diff-{fmt}", encode_update(update, base_hash), update.target_hash,
                            base))
    return out


# ---------------------------------------------------------------- mutations

Mutator = Callable[[random.Random, Artefact], bytes]


def flip_bits(rng: random.Random, a: Artefact) -> bytes:
    data = bytearray(a.data)
    for _ in range(rng.choice((1, 1, 2, 3, 8))):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def truncate(rng: random.Random, a: Artefact) -> bytes:
    return a.data[: rng.randrange(len(a.data))]


def extend(rng: random.Random, a: Artefact) -> bytes:
    tail = rng.choice((rng.randbytes(rng.randint(1, 64)), a.data[-rng.randint(1, 64):], b"\0"))
    return a.data + tail


def splice(rng: random.Random, a: Artefact) -> bytes:
    """Overwrite, insert or delete a random span."""
    i = rng.randrange(len(a.data))
    j = min(len(a.data), i + rng.randint(1, 32))
    fill = rng.choice((rng.randbytes(j - i), b"\0" * (j - i), b"\xff" * (j - i)))
    return rng.choice((a.data[:i] + fill + a.data[j:], a.data[:i] + fill + a.data[i:],
                       a.data[:i] + a.data[j:]))


def random_bytes(rng: random.Random, a: Artefact) -> bytes:
    """Random bytes, sometimes behind a real magic so the sniffer routes them to a decoder."""
    prefix = rng.choice((b"", b"ELDF", b"ELDF\x01\x00", b"ELSEED1\n", b"ELSEED2\n", a.data[:9], a.data[:72]))
    return prefix + rng.randbytes(rng.randrange(2 * len(a.data)))


GENERIC: tuple[Mutator, ...] = (flip_bits, truncate, extend, splice, random_bytes)


def _huge_or_odd_int(rng: random.Random) -> object:
    return rng.choice((0, -1, 1, 2, 3, 16384, 65536, 65537, 2**31, 2**63, 10**400, 1.5, True,
                       None, "8", [4], rng.randint(1, 300)))


def mutate_arch(rng: random.Random, arch: dict) -> object:
    """An edited architecture spec (dict), or something that is not one."""
    arch = json.loads(json.dumps(arch))
    edit = rng.randrange(9)
    if edit == 0:
        arch["hidden"] = rng.choice(([16384, 16384], [65536, 65536], [65536] * 64, [1] * 65,
                                     [24, 24], [], [_huge_or_odd_int(rng)]))
    elif edit == 1:
        arch["input_shape"] = rng.choice(([144], [12, 12], [1, 12, 13], [65536, 65536, 3],
                                          [4096, 4096], [], [_huge_or_odd_int(rng)]))
    elif edit == 2:
        arch["num_classes"] = _huge_or_odd_int(rng)
    elif edit == 3:
        arch["kind"] = rng.choice(("cnn", "rnn", "", None, 3))
        arch["channels"] = rng.choice(([4], [65536] * 16, [8] * 17, []))
    elif edit == 4:
        n = rng.choice((1, 4, 100, 2000))
        arch["extra"] = {"dress": {"sparsities": [i / (n + 1) for i in range(n)],
                                   "gamma": rng.choice((0.5, -1e308, float("inf"), "x", 10**400))}}
    elif edit == 5:
        arch["extra"] = rng.choice(({"nosuch": {}}, {"dress": None}, {"dress": [0.5]}, [], "x"))
    elif edit == 6:
        arch.pop(rng.choice(sorted(arch)))
    elif edit == 7:
        arch[rng.choice(("x", "hidden", "extra"))] = [[[]]] * 3 if rng.random() < 0.5 else {}
    else:
        return rng.choice(([], "mlp", None, 7, {"kind": "mlp"}, [[[[[[]]]]]] * 2))
    return arch


CANONICAL = {"sort_keys": True, "separators": (",", ":")}
SAME_TENSOR_SHAPES = ([144], [12, 12], [1, 144], [144, 1, 1], [2, 6, 12], [4, 36], [3, 4, 12])


def same_tensors_arch(rng: random.Random) -> ArchSpec:
    """``ARCH`` over another input shape of 144 elements: the same state-dict shapes."""
    return ArchSpec("mlp", tuple(rng.choice(SAME_TENSOR_SHAPES)), ARCH.num_classes, hidden=ARCH.hidden)


def _deep(rng: random.Random) -> str:
    depth = rng.choice((100, 5000, 100000))
    return "[" * depth + "]" * depth


def _st_split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _st_join(header: dict | str, body: bytes, pad: bool = True) -> bytes:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


def safetensors_edit(rng: random.Random, a: Artefact) -> bytes:
    """Edit the safetensors JSON header (tensor entries or EdgeLoop metadata), keeping the
    length prefix consistent so the edit reaches the decoder's checks."""
    header, body = _st_split(a.data)
    meta = header["__metadata__"]
    names = sorted(k for k in header if k != "__metadata__")
    name = rng.choice(names)
    edit = rng.randrange(14)
    if edit == 0:
        header[name]["dtype"] = rng.choice(("F16", "F64", "I64", "BOOL", "U8", "BF16", "C64", "X"))
    elif edit == 1:
        shape = header[name]["shape"]
        header[name]["shape"] = rng.choice((shape[::-1], shape + [1], shape[:-1], [0],
                                            [2**40], [-1], [1] * 9, "x"))
    elif edit == 2:
        lo, hi = header[name]["data_offsets"]
        header[name]["data_offsets"] = rng.choice(([lo, hi + 4], [lo + 4, hi + 4], [hi, lo],
                                                   [lo, 2**62], [0, 0], [lo], "x"))
    elif edit == 3:
        header.pop(name)
    elif edit == 4:
        header[rng.choice(("extra", name + "x"))] = dict(header[name])
    elif edit == 5:  # canonical or not: a canonical edit reaches the spec and hash checks
        arch = mutate_arch(rng, json.loads(meta["edgeloop.arch"]))
        meta["edgeloop.arch"] = json.dumps(arch, **rng.choice(({}, CANONICAL)))
    elif edit in (12, 13):
        # Issue 8 fault 1: another architecture that builds exactly the same tensors (an MLP
        # flattens its input), claiming the original hash, the v1 (tensors-only) hash, or the
        # edited model's own v2 hash (then it is not the model the server announced).
        meta["edgeloop.arch"] = same_tensors_arch(rng).to_json()
        if edit == 13:
            state = st_load(a.data)
            meta["edgeloop.model_hash"] = rng.choice(
                (tensors_hash(state), model_hash(ArchSpec.from_json(meta["edgeloop.arch"]), state)))
    elif edit == 6:
        meta["edgeloop.arch"] = rng.choice((_deep(rng), "", "{", "null", ARCH.to_json() + "x"))
    elif edit == 7:
        key = rng.choice(("edgeloop.model_hash", "edgeloop.encoding", "edgeloop.parent"))
        meta[key] = rng.choice(("", "0" * 64, "model/seed-v1", "model/seed-v2", "diff/sparse-v1", a.target[::-1],
                                rng.randbytes(8).hex()))
    elif edit == 8:
        meta.pop(rng.choice(sorted(meta)))
    elif edit == 9:
        meta[rng.choice(sorted(meta))] = rng.choice((7, None, [1], {"a": "b"}))
    elif edit == 10:
        header["__metadata__"] = rng.choice(([], "x", None, 3))
    else:
        return _st_join(rng.choice(("[]", "{}", "{" + _deep(rng) + "}", '{"a": ' + _deep(rng) + "}")),
                        body, pad=False)
    data = _st_join(header, body)
    if rng.random() < 0.1:  # a lying length prefix
        n = int.from_bytes(data[:8], "little") + rng.choice((-1, 1, 8, 2**40, -(2**10)))
        data = max(n, 0).to_bytes(8, "little") + data[8:]
    return data


def seed_edit(rng: random.Random, a: Artefact) -> bytes:
    magic, body = a.data[:8], json.loads(a.data[8:])
    edit = rng.randrange(6)
    if edit == 0:  # the arch travels as canonical JSON text (seed-v2) or an object (seed-v1)
        arch = body["arch"]
        mutated = mutate_arch(rng, json.loads(arch) if isinstance(arch, str) else arch)
        body["arch"] = json.dumps(mutated, **CANONICAL) if isinstance(arch, str) else mutated
    elif edit == 1:
        body["seed"] = rng.choice((SEED + 1, -1, 2**63, 2**64, 10**400, 1.5, 1e308, float("inf"),
                                   "7", None, True, [7]))
    elif edit == 2:
        body["model_hash"] = rng.choice(("", "0" * 64, None, 7, [a.target], a.target.upper()))
    elif edit == 3:
        body.pop(rng.choice(sorted(body))) if rng.random() < 0.5 else body.update(x=1)
    elif edit == 4:
        return magic + _deep(rng).encode()
    else:
        body = rng.choice(([], "x", None, 3, [body]))
    return magic + json.dumps(body).encode()


# --- diffs: parse the table, edit one field, write it back with a valid CRC


def _diff_split(data: bytes) -> tuple[object, list[tuple[Entry, bytes]]]:
    h = parse_header(data)
    r = ByteReader(data, h.header_len, h.header_len + h.table_len, "table")
    offset, entries = h.header_len + h.table_len, []
    for _ in range(h.n_tensors):
        e = read_entry(r)
        n = (e.index.stored_len if e.index else 0) + e.values.stored_len
        entries.append((e, data[offset : offset + n]))
        offset += n
    return h, entries


def _diff_join(h, entries: list[tuple[Entry, bytes]], target: str | None = None,
               base: str | None = None) -> bytes:
    table = b"".join(write_entry(e) for e, _ in entries)
    sections = b"".join(s for _, s in entries)
    body = pack_header(base or h.base_hash, target or h.target_hash, len(entries), len(table),
                       len(sections)) + table + sections
    return body + struct.pack("<I", zlib.crc32(body))


def _recrc(data: bytes) -> bytes:
    body = data[:-CHECKSUM_BYTES]
    return body + struct.pack("<I", zlib.crc32(body))


def _odd_size(rng: random.Random, v: int) -> int:
    return max(0, rng.choice((0, 1, v - 1, v + 1, v * 2, v + 3, 1 << 20, (1 << 31) - 1,
                              rng.randrange(max(v, 1) * 4 + 8))))


def _field_edit(rng: random.Random, e: Entry, stored: bytes) -> tuple[Entry, bytes]:
    f = rng.randrange(12)
    if f == 0:
        return replace(e, nnz=_odd_size(rng, e.nnz)), stored
    if f == 1:
        shape = rng.choice((e.shape[::-1], e.shape + (1,), e.shape[:-1], (0,), (1 << 16,) * 2,
                            tuple(_odd_size(rng, d) for d in e.shape)))
        return replace(e, shape=shape), stored
    if f == 2:
        return replace(e, layout=rng.choice((0, 1, 2))), stored
    if f == 3:
        return replace(e, value_coding=rng.randrange(5)), stored
    if f == 4 and e.index is not None:
        return replace(e, index_coding=rng.randrange(4), index_m=max(1, e.index_m)), stored
    if f == 5:
        return replace(e, index_m=rng.choice((1, 2, 3, 1 << 20, 1 << 31)),
                       value_m=rng.choice((1, 2, 127, 128, 1 << 31))), stored
    if f == 6:
        return replace(e, qmin=rng.randrange(256), scale=e.scale), stored
    if f == 7:
        scale = rng.choice((0.0, -1.0, float("nan"), float("inf"), 1e-45, 3e38, 1.0))
        return replace(e, scale=np.float32(scale)), stored
    if f == 8:
        wd = rng.choice(WIRE_DTYPES)
        return replace(e, wd=wd), stored
    if f == 9:  # a section's compression byte or declared lengths
        which = "values" if e.index is None or rng.random() < 0.5 else "index"
        sec: Section = getattr(e, which)
        sec = replace(sec, compression=rng.randrange(4), raw_len=_odd_size(rng, sec.raw_len))
        return replace(e, **{which: sec}), stored
    if f == 10:  # recompress a mutated copy of the values: reaches unshuffle and the codings
        n_idx = e.index.stored_len if e.index else 0
        raw = rng.choice((rng.randbytes(_odd_size(rng, e.values.raw_len) % (1 << 16)),
                          stored[n_idx:][: rng.randrange(len(stored) - n_idx + 1)]))
        comp = rng.choice((C_ZSTD, C_SHUFFLE_ZSTD, C_NONE))
        frame = raw if comp == C_NONE else zstandard.ZstdCompressor().compress(raw)
        values = Section(comp, len(frame), len(raw))
        return replace(e, values=values), stored[:n_idx] + frame
    name = rng.choice(("", e.name + "x", "\u00e9", e.name[:-1], "a" * 2000))
    return replace(e, name=name), stored


def diff_edit(rng: random.Random, a: Artefact) -> bytes:
    """Header and tensor-table edits behind a valid CRC (a CRC only stops accidents)."""
    h, entries = _diff_split(a.data)
    edit = rng.randrange(6)
    try:
        if edit == 0:
            return _recrc(rng.choice(GENERIC)(rng, a))
        if edit == 1:
            return _diff_join(h, entries, target=rng.choice(("0" * 64, h.base_hash)),
                              base=rng.choice((None, "0" * 64, h.target_hash)))
        if edit == 2:
            i = rng.randrange(len(entries))
            return _diff_join(h, entries[:i] + entries[i + 1:] if rng.random() < 0.5
                              else entries[:i] + [entries[i]] + entries[i:])
        if edit == 3:  # header varints that disagree with the body
            body = a.data[:-CHECKSUM_BYTES]
            pre = body[:70]
            rest = pack_header(h.base_hash, h.target_hash, _odd_size(rng, h.n_tensors),
                               _odd_size(rng, h.table_len), _odd_size(rng, h.data_len))[70:]
            return _recrc(pre + rest + body[h.header_len:] + b"\0\0\0\0")
        i = rng.randrange(len(entries))
        for _ in range(1 if edit == 4 else rng.randint(2, 4)):
            entries[i] = _field_edit(rng, *entries[i])
        return _diff_join(h, entries)
    except (ValueError, struct.error, OverflowError):  # the edit itself cannot be written
        return _recrc(flip_bits(rng, a))


AWARE: dict[str, Mutator] = {"full": safetensors_edit, "seed": seed_edit,
                             "diff-fp32": diff_edit, "diff-int8": diff_edit}


# ---------------------------------------------------------------- the agent's install path


def install(a: Artefact, data: bytes, store: ModelStore) -> tuple[str, ArchSpec]:
    """What the agent does with downloaded bytes (edge_agent/updater.py ``Updater.verify``,
    then edge_agent/update_machine.py ``_installing``); returns the installed hash and the
    architecture the agent would then run."""
    is_diff = a.base is not None  # the server's UpdateInfo says whether it sent a diff
    decoded = decode_artefact(data, a.base if is_diff else None, base_arch=ARCH if is_diff else None,
                              max_parameters=MAX_PARAMETERS)
    if decoded.model_hash != a.target:
        raise ArtefactError(f"artefact produced {decoded.model_hash[:12]}, server promised "
                            f"{a.target[:12]}")
    arch = decoded.arch or ARCH  # a diff keeps the architecture of the model it applies to
    return store.install(arch, dict(decoded.state), expected_hash=decoded.model_hash), arch


@dataclass
class Figures:
    cases: int = 0
    installed_target: int = 0
    refused: Counter = field(default_factory=Counter)
    by_mutator: Counter = field(default_factory=Counter)
    untyped: list = field(default_factory=list)
    wrong_installs: list = field(default_factory=list)
    worst_seconds: float = 0.0
    worst_seconds_case: str = ""
    worst_traced_bytes: int = 0
    worst_traced_case: str = ""
    rss_growth_bytes: int = 0

    def as_json(self) -> dict:
        return {"cases": self.cases, "installed_target": self.installed_target,
                "typed_refusals": sum(self.refused.values()),
                "typed_refusals_by_type": dict(self.refused.most_common()),
                "cases_by_mutator": dict(self.by_mutator.most_common()),
                "untyped_errors": len(self.untyped), "untyped_examples": self.untyped[:10],
                "wrong_installs": self.wrong_installs,
                "worst_case_seconds": round(self.worst_seconds, 4),
                "worst_time_case": self.worst_seconds_case,
                "worst_case_traced_bytes": self.worst_traced_bytes,
                "worst_memory_case": self.worst_traced_case,
                "process_peak_rss_growth_bytes": self.rss_growth_bytes}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run_fuzz(n_cases: int, seed: int, root: Path) -> Figures:
    artefacts = real_artefacts()
    stores = {a.kind: ModelStore(root / a.kind) for a in artefacts}
    base_hash = model_hash(ARCH, artefacts[-1].base)
    for a in artefacts:  # positive control: the unmutated artefacts install
        assert install(a, a.data, stores[a.kind]) == (a.target, ARCH)
    rng, fig, rss0 = random.Random(seed), Figures(), _peak_rss()
    tracemalloc.start()
    try:
        for case in range(n_cases):
            a = rng.choice(artefacts)
            mutator = AWARE[a.kind] if rng.random() < 0.5 else rng.choice(GENERIC)
            data = mutator(rng, a)
            label = f"case {case} {a.kind}/{mutator.__name__} ({len(data)} bytes)"
            fig.by_mutator[f"{a.kind}/{mutator.__name__}"] += 1
            tracemalloc.reset_peak()
            traced0 = tracemalloc.get_traced_memory()[0]
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():  # a numeric warning is a bug too
                    warnings.simplefilter("error", RuntimeWarning)
                    got, arch = install(a, data, stores[a.kind])
            except TYPED as exc:
                fig.refused[type(exc).__name__] += 1
            except Exception as exc:  # noqa: BLE001 - what the fuzzer looks for
                frame = traceback.extract_tb(exc.__traceback__)[-1]
                fig.untyped.append(f"{label}: {type(exc).__name__}: {str(exc)[:160]} at "
                                   f"{frame.filename}:{frame.lineno}")
            else:
                fig.installed_target += 1
                if got != a.target or arch != ARCH:  # another model, or the right tensors
                    fig.wrong_installs.append(f"{label}: installed {got} as {arch.to_json()}")
            seconds = time.perf_counter() - t0
            traced = tracemalloc.get_traced_memory()[1] - traced0
            if seconds > fig.worst_seconds:
                fig.worst_seconds, fig.worst_seconds_case = seconds, label
            if traced > fig.worst_traced_bytes:
                fig.worst_traced_bytes, fig.worst_traced_case = traced, label
            fig.cases += 1
    finally:
        tracemalloc.stop()
    fig.rss_growth_bytes = _peak_rss() - rss0
    for a in artefacts:  # nothing but the target ever became current, and the base is intact
        store = stores[a.kind]
        if store.installed() != [a.target] or store.current_hash() != a.target:
            fig.wrong_installs.append(f"{a.kind} store holds {store.installed()}")
    assert model_hash(ARCH, artefacts[-1].base) == base_hash
    return fig


def _check(fig: Figures, n_cases: int, out: Path) -> None:
    report = fig.as_json()
    out.write_text(json.dumps(report, indent=2))
    print(f"\nfuzz figures ({out}):\n{json.dumps(report, indent=2)}")
    assert fig.cases == n_cases
    assert not fig.untyped, "untyped exceptions:\n" + "\n".join(fig.untyped[:20])
    assert not fig.wrong_installs, fig.wrong_installs
    assert sum(fig.refused.values()) > n_cases // 2  # the mutations did reach the decoders
    assert fig.worst_seconds < MAX_CASE_SECONDS, fig.worst_seconds_case
    assert fig.worst_traced_bytes < MAX_CASE_TRACED_BYTES, fig.worst_traced_case
    assert fig.rss_growth_bytes < MAX_RSS_GROWTH_BYTES


def test_fuzz_install_path(tmp_path):
    n = 5000  # ~7 s on two shared cores
    _check(run_fuzz(n, seed=8, root=tmp_path), n, tmp_path / "fuzz_install.json")


@pytest.mark.slow
def test_fuzz_install_path_long(tmp_path):
    n = 20000
    _check(run_fuzz(n, seed=20008, root=tmp_path), n, tmp_path / "fuzz_install.json")
