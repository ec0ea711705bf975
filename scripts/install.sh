#!/usr/bin/env bash
# Install EdgeLoop into ./.venv (or $EDGELOOP_VENV) on a fresh machine.
#   scripts/install.sh [extras]      default extras: server,data
# Keeps an existing torch (a Jetson or Raspberry Pi ships its own build); otherwise installs
# the CPU wheel torch==2.13.0. Installs the Fashion-MNIST and strace Debian packages when run
# as root and they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-server,data}"
VENV="${EDGELOOP_VENV:-.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  # --system-site-packages lets a system-wide torch (Jetson wheel) be seen and kept.
  "$PY" -m venv --system-site-packages "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true

if "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "install: keeping existing torch $("$VPY" -c 'import torch; print(torch.__version__)')"
else
  # On this project's machines a CPU wheel of torch 2.13.0 is on pip's find-links path; elsewhere
  # on x86_64 set PIP_INDEX_URL=https://download.pytorch.org/whl/cpu to avoid the CUDA build.
  echo "install: installing torch==2.13.0 (CPU)"
  "$VPY" -m pip install -q "torch==2.13.0"
fi

"$VPY" -m pip install -q -e ".[${EXTRAS}]"

FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "install: installing Debian package dataset-fashion-mnist"
  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }) \
    || echo "install: could not install dataset-fashion-mnist; Fashion-MNIST runs will fail with a hint"
fi
# strace: tests/test_durable_writes.py records the syscalls of durable writes (fails under CI
# without it).
if ! command -v strace >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "install: installing Debian package strace"
  (apt-get install -y -qq strace >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq strace >/dev/null 2>&1; }) \
    || echo "install: could not install strace; tests/test_durable_writes.py will skip (fail in CI)"
fi
# chromium: the console's browser tests (tests/console) drive Debian's /usr/bin/chromium through
# Playwright (dev extra); Playwright never downloads a browser of its own here.
case ",$EXTRAS," in
  *,dev,*)
    if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "install: installing Debian package chromium"
      (apt-get install -y -qq chromium >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; }) \
        || echo "install: could not install chromium; tests/console will fail"
    fi ;;
esac
echo "install: done ($VENV)"
