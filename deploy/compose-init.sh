#!/bin/sh
# One-shot init step of docker-compose.yml (service `init`, server image), run before the server:
#   1. `edgeloop server migrate`: the database schema.
#   2. `edgeloop server tls init`: the local CA and the server certificate in the server's data
#      volume (kept across runs; re-issued only when EDGELOOP_TLS_HOSTNAMES changes or it nears
#      expiry, the CA never).
#   3. For the simulated agents, in the fleet-bootstrap volume ($BOOTSTRAP_DIR) they mount
#      read-only: ca.crt (the CA they pin) and enrollment-token (mode 0600, the image's user,
#      which the agent image shares: uid 10001), an operator-created token of the kind
#      `edgeloop server enrollment create` makes. A token that is still active is kept; an
#      expired, used-up or revoked one is replaced.
# Nothing secret is printed. The operator's admin token is the server's first-start file
# <data dir>/operator-token (docs/security.md#first-start).
set -eu

log() { echo "compose-init: $*" >&2; }

out="${BOOTSTRAP_DIR:-/var/lib/edgeloop/bootstrap}"
data_dir="${EDGELOOP_DATA_DIR:?EDGELOOP_DATA_DIR must be set}"
for dir in "$out" "$data_dir"; do  # the token is created from inside $out (below)
    case "$dir" in /*) ;; *) log "BOOTSTRAP_DIR and EDGELOOP_DATA_DIR must be absolute, got '$dir'"; exit 2 ;; esac
done
mkdir -p "$out"

log "edgeloop server migrate"
edgeloop server migrate
log "edgeloop server tls init"
edgeloop server tls init

tmp="$out/.ca.crt.tmp"
cp "$data_dir/tls/ca.crt" "$tmp"
chmod 0644 "$tmp"
mv -f "$tmp" "$out/ca.crt"

token="$out/enrollment-token"
id_file="$out/enrollment-token.id"
status=""
if [ -s "$token" ] && [ -s "$id_file" ]; then
    status="$(edgeloop server enrollment list --json | python3 -c '
import json, sys
wanted = open(sys.argv[1]).read().strip()
print(next((t["status"] for t in json.load(sys.stdin) if t["id"] == wanted), "missing"))
' "$id_file")"
fi
if [ "$status" = active ]; then
    log "keeping the simulated fleet's enrollment token $(cat "$id_file")"
else
    [ -z "$status" ] || log "the simulated fleet's enrollment token is $status: creating a new one"
    rm -f "$token"
    # In $out, so that --out names a plain file (written 0600 by the CLI, never printed).
    (cd "$out" && edgeloop server enrollment create --name compose-simulated-fleet --tags compose \
        --max-uses 1000 --expires-in 366d --out enrollment-token --json) \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])' > "$id_file"
    log "created enrollment token $(cat "$id_file") in $token"
fi
