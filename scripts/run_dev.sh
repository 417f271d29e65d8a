#!/usr/bin/env bash
# Runs one worker and one notifier side by side; Ctrl-C (or SIGTERM) stops both cleanly.
# The exit status is the first process's own when one ends by itself, else the worse of
# the two: 0 when both stopped cleanly on the signal.
set -u
PY="$1"
# The trap is set before either process starts: a signal that came after they started but
# before the trap would otherwise end this script alone and leave both running.
worker=
notifier=
stopping=0
trap 'stopping=1; kill -TERM $worker $notifier 2>/dev/null' INT TERM
"$PY" -m worker &
worker=$!
"$PY" -m worker.notifier &
notifier=$!
# A signal that came while a process was starting may have found its pid not yet known.
if [ $stopping = 1 ]; then
    kill -TERM $worker $notifier 2>/dev/null
fi
wait -n $worker $notifier
first=$?
kill -TERM $worker $notifier 2>/dev/null
# A signal interrupts wait with 128+n; bash keeps each child's own status for the next wait.
status() {
    local rc
    while :; do
        wait "$1"
        rc=$?
        kill -0 "$1" 2>/dev/null || return $rc
    done
}
status $worker
w=$?
status $notifier
n=$?
if [ $stopping = 0 ]; then
    exit $first
fi
exit $((w > n ? w : n))
