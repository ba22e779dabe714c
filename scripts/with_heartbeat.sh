#!/usr/bin/env bash
# Run a command and, while it runs, print "<label> still working (N s)" every 15 s, so a long
# silent step (pip unpacking torch) never looks hung in a log. Exits with the command's status.
# Usage: scripts/with_heartbeat.sh LABEL COMMAND [ARGS...]
set -uo pipefail
label=$1
shift
"$@" &
pid=$!
start=$SECONDS
while kill -0 "$pid" 2>/dev/null; do
    for _ in $(seq 15); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    kill -0 "$pid" 2>/dev/null && echo "$label still working ($((SECONDS - start)) s)"
done
wait "$pid"
