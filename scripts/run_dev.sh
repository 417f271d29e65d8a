#!/usr/bin/env bash
# Runs one worker and one notifier side by side; Ctrl-C (or SIGTERM) stops both cleanly.
set -u
PY="$1"
"$PY" -m worker &
worker=$!
"$PY" -m worker.notifier &
notifier=$!
trap 'kill -TERM $worker $notifier 2>/dev/null' INT TERM
wait -n $worker $notifier
status=$?
kill -TERM $worker $notifier 2>/dev/null
wait
exit $status
