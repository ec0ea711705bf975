#!/bin/sh
# Entrypoint of the agent image: give this replica its own data shard, then exec the command
# (by default `edgeloop agent run`).
#
# `docker compose up --scale agent=N` starts N containers with one shared environment, so the
# shard index cannot come from the environment. Each replica claims the lowest free slot
# 0..EDGELOOP_AGENT_NUM_SHARDS-1 by taking an exclusive flock(2) on
# $SHARD_CLAIMS_DIR/shard-<i>.lock, a volume every replica mounts. The locked descriptor
# (fd 9) is inherited by the exec'd agent, so the kernel holds the claim exactly as long as
# the agent process lives: a stopped, crashed or removed replica frees its slot and nothing
# stale is left to clean up. Chosen over hash(hostname) mod N, where replicas collide
# (5 replicas on 10 shards share a shard with probability 0.7), and over reading the replica
# number back from Docker's reverse DNS, which needs a DNS client and Docker's resolver.
# Claims only coordinate containers on one Docker host (what compose runs).
#
# A replica re-takes the slot it had before a restart when that slot is free (kept in
# <data dir>/shard_slot), so a device keeps its data distribution across restarts.
# An explicit EDGELOOP_AGENT_SHARD_INDEX skips the claim. The device identity (hardware id)
# is generated per container in the agent's data directory, which every replica has its own.
set -eu

log() { echo "agent-entrypoint: $*" >&2; }

if [ "$#" -eq 0 ]; then
    set -- edgeloop agent run
fi

if [ -n "${EDGELOOP_AGENT_SHARD_INDEX:-}" ]; then
    log "using the configured shard ${EDGELOOP_AGENT_SHARD_INDEX}"
    exec "$@"
fi

num_shards="${EDGELOOP_AGENT_NUM_SHARDS:-1}"
case "$num_shards" in
    '' | *[!0-9]*) log "EDGELOOP_AGENT_NUM_SHARDS must be a positive integer, got '$num_shards'"; exit 2 ;;
esac
if [ "$num_shards" -lt 1 ]; then
    log "EDGELOOP_AGENT_NUM_SHARDS must be a positive integer, got '$num_shards'"
    exit 2
fi

claims="${SHARD_CLAIMS_DIR:-/var/lib/edgeloop/shards}"
data_dir="${EDGELOOP_AGENT_DATA_DIR:-.edgeloop/agent}"
mkdir -p "$claims" "$data_dir"
host="$(cat /proc/sys/kernel/hostname 2>/dev/null || echo unknown)"

try_claim() {  # $1: slot; on success fd 9 holds the lock
    exec 9>>"$claims/shard-$1.lock"  # append: never truncate a file another replica holds
    if flock -n 9; then
        return 0
    fi
    exec 9>&-
    return 1
}

slot=""
previous="$(cat "$data_dir/shard_slot" 2>/dev/null || true)"
case "$previous" in
    '' | *[!0-9]*) ;;
    *) if [ "$previous" -lt "$num_shards" ] && try_claim "$previous"; then slot="$previous"; fi ;;
esac
i=0
while [ -z "$slot" ] && [ "$i" -lt "$num_shards" ]; do
    if try_claim "$i"; then slot="$i"; fi
    i=$((i + 1))
done
if [ -z "$slot" ]; then
    log "all $num_shards shards are held by other replicas: run at most" \
        "EDGELOOP_AGENT_NUM_SHARDS replicas (compose: AGENT_SHARDS=N docker compose up --scale agent=N)"
    exit 1
fi
echo "$slot" > "$data_dir/shard_slot"

export EDGELOOP_AGENT_SHARD_INDEX="$slot"
export EDGELOOP_AGENT_NUM_SHARDS="$num_shards"
export EDGELOOP_AGENT_NAME="${EDGELOOP_AGENT_NAME:-$host-shard$slot}"
log "claimed shard $slot of $num_shards as $EDGELOOP_AGENT_NAME"
exec "$@"
