#!/bin/sh
# Entrypoint of the server image. Before `edgeloop server run` it applies the database
# migrations as a step of their own (`edgeloop server migrate`): a database that is
# unreachable or a migration that fails stops the container here, with the error, before
# any port is opened. Any other command (`edgeloop data info ...`, a shell) runs unchanged.
set -eu

if [ "$#" -eq 0 ]; then
    set -- edgeloop server run
fi

if [ "$#" -ge 3 ] && [ "$1" = edgeloop ] && [ "$2" = server ] && [ "$3" = run ]; then
    echo "server-entrypoint: edgeloop server migrate" >&2
    edgeloop server migrate
fi
exec "$@"
