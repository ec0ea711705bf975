#!/usr/bin/env bash
# Install EdgeLoop with its test dependencies into ./.venv and run the test suite.
#   scripts/test.sh            # the CI suite (skips tests marked slow)
#   scripts/test.sh -m slow    # extra pytest arguments are passed through
# Without arguments (the CI suite) it lints and type-checks first: ruff on the tree, mypy on
# the files [tool.mypy] in pyproject.toml names (shared/, server/training); a lint or type
# error fails the run before pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh server,data,bench,dev
if [ "$#" -eq 0 ]; then
  .venv/bin/python -m ruff check .
  echo "mypy: $(.venv/bin/python -m mypy --version)"
  .venv/bin/python -m mypy
  set -- -m "not slow" --durations=25  # the slowest tests, to keep the suite near 15 min
fi
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "no tests collected"; exit 1; fi
exit "$rc"
