"""Training memory of DA³ and its baselines, counted two ways (the third, peak RSS of a training
run in a fresh process, is measured by bench/da3.py).

*Analytic* (:func:`analytic_training_memory`): the DA³ paper's Table 1 counts the activation
memory a method must keep for its backward. We do not have the table itself (only the
supplementary, which refers to it), so the definition here is the one its text states and
TinyTL uses: bytes of every activation the backward needs, float32, per layer:

- a layer whose weight trains keeps its input (for ``dW``);
- a BatchNorm in batch mode (fine-tuning) keeps its input;
- a ReLU that a gradient passes through keeps a 1-bit mask (fine-tuning: its float output,
  which stock PyTorch keeps and which is the next conv's input anyway);
- frozen convs and eval-mode BatchNorm keep nothing (their input gradient needs the weight
  only);
- DA³'s block additionally keeps its correction input ``A`` (int8 with a per-channel scale,
  ``store_bits=8``, or float32), the 1-bit gate mask, the gate's pooled map ``H_s(A)`` (G's
  input, int8 with a scale per channel: 2 bytes per position) and the straight-through factor
  ``dp/dz`` of Eq. (1)-(3) (bfloat16, 2 bytes per position);
- the head keeps its input; the loss its log-softmax output, the int64 labels and a scalar.

*Saved for backward* (:class:`SavedTensorsCounter`): every tensor autograd saves in a step,
through ``torch.autograd.graph.saved_tensors_hooks``, counted once per storage, leaving out the
model's own parameters and buffers (resident anyway). For DA³, :func:`da3_block_bytes` states
what each block saves; the test suite checks it against the hook byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from shared.da3.net import BlockShape, block_shapes
from shared.da3.spec import DA3Error, section_of
from shared.models.spec import ArchSpec, conv4_input_shape

METHODS = ("da3", "finetune", "last", "bias", "tinytl", "series", "parallel", "piggyback")
# The adaptor a method needs in the spec (None: the spec's adaptor must be "none").
METHOD_ADAPTOR = {"da3": "da3", "tinytl": "tinytl", "series": "series", "parallel": "parallel",
                  "piggyback": "piggyback", "finetune": "none", "last": "none", "bias": "none"}  # fmt: skip
F32 = 4


def check_method(arch: ArchSpec, method: str) -> None:
    """DA3Error unless ``method`` is known and ``arch``'s adaptor is the one it trains."""
    if method not in METHODS:
        raise DA3Error(f"unknown method {method!r}; expected one of {METHODS}")
    adaptor = section_of(arch).adaptor
    if adaptor != METHOD_ADAPTOR[method]:
        raise DA3Error(
            f"method {method!r} needs a spec with da3.adaptor={METHOD_ADAPTOR[method]!r}, "
            f"this one has {adaptor!r} (build it with da3_spec(backbone, adaptor=...))"
        )


def _bits(n: int) -> int:
    return (n + 7) // 8


def _pos(b: BlockShape) -> int:
    return b.h_out * b.w_out


@dataclass(frozen=True)
class BlockBytes:
    """What one DA³ block saves for the backward, in bytes, for a batch."""

    relu1_mask: int  # 1 bit per conv1 output element (0 for the first block: no grad yet)
    relu2_mask: int  # 1 bit per block output element
    correction_input: int  # A [N, C_in, H_out, W_out]: int8 + a float32 scale per channel, or float32
    gate_mask: int  # 1 bit per output position
    gate_pooled: int  # H_s(A) [N, 2, H_out, W_out], G's input: int8 + 2 float32 scales
    gate_relaxed: int  # the straight-through factor dp/dz of Eq. (1)-(3), bfloat16 [N, 1, H_out, W_out]

    @property
    def total(self) -> int:
        return (self.relu1_mask + self.relu2_mask + self.correction_input + self.gate_mask
                + self.gate_pooled + self.gate_relaxed)  # fmt: skip


def da3_block_bytes(arch: ArchSpec, batch: int) -> list[BlockBytes]:
    """Per block, what a DA³ training step saves for the backward (docs/da3.md)."""
    section = section_of(arch)
    gate = section.gate
    out = []
    for b in block_shapes(arch):
        p = batch * _pos(b)
        out.append(BlockBytes(
            relu1_mask=_bits(p * b.c_out) if b.index > 0 else 0,
            relu2_mask=_bits(p * b.c_out),
            correction_input=p * b.c_in + F32 * b.c_in if section.store_bits == 8 else F32 * p * b.c_in,
            gate_mask=_bits(p),
            gate_pooled=2 * p + 2 * F32 if gate else 0,
            gate_relaxed=2 * p if gate else 0,
        ))  # fmt: skip
    return out


def head_loss_bytes(arch: ArchSpec, batch: int) -> int:
    """Head input (float32) + log-softmax output + int64 labels + the loss's scalar weight."""
    return F32 * batch * arch.channels[-1] + F32 * batch * arch.num_classes + 8 * batch + F32


def analytic_training_memory(spec: ArchSpec, method: str, batch: int) -> int:
    """Activation bytes ``method`` keeps for the backward of one training step on ``batch``
    samples (the definition in this module's docstring)."""
    check_method(spec, method)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise DA3Error(f"batch must be a positive integer, got {batch!r}")
    n = batch
    total = head_loss_bytes(spec, n)
    if method == "last":
        return total
    if method == "da3":
        return total + sum(b.total for b in da3_block_bytes(spec, n))
    c0, h0, w0 = conv4_input_shape(spec)
    stem = n * spec.channels[0] * h0 * w0
    blocks = block_shapes(spec)
    if method == "finetune":  # stock modules: conv inputs, BN inputs, the last ReLU's output
        total += F32 * (n * c0 * h0 * w0 + stem)  # stem conv input, stem BN input
        for b in blocks:
            p = n * _pos(b)
            total += F32 * (n * b.c_in * b.h_in * b.w_in + 3 * p * b.c_out)  # conv1 in; bn1, conv2, bn2 in
            total += F32 * p * b.c_out if b.projection else 0  # the shortcut BN's input
        last = blocks[-1]
        return total + F32 * n * _pos(last) * last.c_out
    # Frozen backbone: ReLU masks wherever a gradient passes (from the stem on for bias,
    # TinyTL and Piggyback, whose first trainable tensor is the stem's; from the first block's
    # adapter on for the residual adapters).
    if method in ("bias", "tinytl", "piggyback"):
        total += _bits(stem)
    for b in blocks:
        p = n * _pos(b)
        total += 2 * _bits(p * b.c_out)
        if method == "tinytl":  # pooled input and the ReLU output inside the lite module
            hp, wp = (b.h_in // 2, b.w_in // 2) if min(b.h_in, b.w_in) >= 2 else (b.h_in, b.w_in)
            total += 2 * F32 * n * b.c_in * hp * wp
        elif method == "series":  # inputs of the two adapters: conv1's and conv2's outputs
            total += 2 * F32 * p * b.c_out
        elif method == "parallel":  # inputs of the two adapters: block input, relu1 output
            total += F32 * (n * b.c_in * b.h_in * b.w_in + p * b.c_out)
        elif method == "piggyback":  # every masked conv's input (the shortcut shares conv1's)
            total += F32 * (n * b.c_in * b.h_in * b.w_in + p * b.c_out)
    if method == "piggyback":
        total += F32 * n * c0 * h0 * w0  # the stem conv's input image
    return total


def trainable_state_bytes(num_params: int) -> int:
    """Gradient plus Adam's two moments per trainable parameter (float32)."""
    return 3 * F32 * num_params


class SavedTensorsCounter:
    """Counts the bytes autograd saves for the backward (``saved_tensors_hooks``): each storage
    once per step, the model's parameters and buffers left out. ``peak`` is the largest step."""

    def __init__(self, model: nn.Module) -> None:
        self._resident = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self._seen: dict[int, int] = {}
        self.peak = 0
        self.last = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._resident and ptr not in self._seen:
            self._seen[ptr] = storage.nbytes()
        return t

    @contextmanager
    def step(self) -> Iterator[None]:
        """Count what the forward inside the block saves (the backward may run after it)."""
        self._seen = {}
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield
        self.last = sum(self._seen.values())
        self.peak = max(self.peak, self.last)

