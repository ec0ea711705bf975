"""How every benchmark takes its data: ``--dataset`` as the agent and ``edgeloop data info`` take
it (shared.data.load_dataset: a built-in name, an ``.npz`` file or a folder of class
sub-folders), and one clear exit when a split cannot hold what the setting asks of it.

A bench that silently scored an empty split would report 0.0 accuracy as a result, so every
size a setting depends on is checked here before any training starts.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from shared.data import BUILTIN, Dataset, DatasetUnavailableError, load_dataset

DEFAULT_DATASET = "fashion-mnist"
USAGE_ERROR = 2  # argparse's exit status for a bad command line: a too-small split is one too


class BenchDataError(SystemExit):
    """The dataset cannot run the requested setting; exits with status 2 and says why."""

    def __init__(self, message: str) -> None:
        super().__init__(USAGE_ERROR)
        self.message = message

    def __str__(self) -> str:
        return self.message


def add_dataset_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        help=f"a built-in dataset ({', '.join(BUILTIN)}), an .npz file (images/labels, "
        "optionally images_test/labels_test) or a folder of class sub-folders "
        f"(default {DEFAULT_DATASET})",
    )


def fail(message: str) -> NoReturn:
    """Print ``message`` to stderr and exit with status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise BenchDataError(message)


def load_bench_dataset(spec: str) -> Dataset:
    """shared.data.load_dataset, with its errors turned into exit status 2 and a message."""
    try:
        return load_dataset(spec)
    except (DatasetUnavailableError, ValueError) as exc:
        fail(f"--dataset {spec}: {exc}")


def require_split(ds: Dataset, split: str, size: int, need: int, purpose: str, fix: str = "") -> None:
    """Exit (status 2) unless the ``split`` of ``ds``, holding ``size`` samples, has ``need``."""
    if need < 1:
        fail(f"{ds.name}: {purpose} must take at least 1 sample from the {split} split")
    if size < need:
        fail(
            f"{ds.name}: the {split} split has {size} samples but {purpose} needs {need}"
            + (f"; {fix}" if fix else "")
        )
