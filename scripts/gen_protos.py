"""Regenerate the Python gRPC code from protos/edgeloop/v1/*.proto.

    python scripts/gen_protos.py            # writes next to the .proto files
    python scripts/gen_protos.py --out DIR  # writes under DIR (used by the sync test)

Protos are compiled with the repository root as the include path, so the generated modules
import each other as ``protos.edgeloop.v1.*`` and live in the installed ``protos`` package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def generate(out: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted((ROOT / "protos" / "edgeloop" / "v1").glob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(p.relative_to(ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out / "protos" / "edgeloop" / "v1").glob("*_pb2*.py*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT)
    written = generate(parser.parse_args().out)
    sys.stdout.write("".join(f"wrote {p}\n" for p in written))


if __name__ == "__main__":
    main()
