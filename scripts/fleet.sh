#!/usr/bin/env bash
# Install EdgeLoop into ./.venv and run the local fleet: a server and 3 agents on loopback,
# SQLite and a temporary data directory, two update rounds triggered through the REST API;
# TLS on both ports (the agents pin the server's local CA), operator and enrollment tokens on.
#   scripts/fleet.sh                       # defaults
#   scripts/fleet.sh --agents 5 --rounds 4 # any `edgeloop fleet run` option
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh server,data
exec .venv/bin/edgeloop fleet run "$@"
