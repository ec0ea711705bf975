#!/usr/bin/env bash
# Install EdgeLoop into ./.venv and run the local fleet: a server and 3 agents on loopback,
# SQLite and a temporary data directory, two update rounds triggered through the REST API;
# TLS on both ports (the agents pin the server's local CA), operator and enrollment tokens on.
# At start it prints the web console's URL (<REST base>/ui) and the admin token to log in with.
#   scripts/fleet.sh                       # defaults
#   scripts/fleet.sh --agents 5 --rounds 4 # any `edgeloop fleet run` option
#   scripts/fleet.sh --plots charts/       # also write the fleet charts as PNG (installs matplotlib)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=server,data
for arg in "$@"; do
  case "$arg" in --plots|--plots=*) extras=server,data,bench ;; esac
done
bash scripts/install.sh "$extras"
exec .venv/bin/edgeloop fleet run "$@"
