#!/usr/bin/env bash
# Run a benchmark command with as little interference as a shared 2-core box allows:
#  - a new session (setsid) so it gets its own scheduler autogroup, reniced to -10
#    (with kernel.sched_autogroup_enabled=1, plain `nice` does not beat a build running in
#    another session: each autogroup gets an equal share, so 2 torch threads got ~1 core);
#  - bench/yield_guard.py pauses (SIGSTOP) processes matching $GUARD_MATCH (default
#    hf_train.py) while non-build processes use the CPU; builds (rustc, cargo, cc, ld...)
#    are not waited for, they just lose priority.
# Step-time medians stay usable; the wall time of a paused run does not (see the guard log).
# Usage: bench/run_isolated.sh CMD ARG...      (GUARD_LOG=path, GUARD_MATCH=substring)
set -euo pipefail
if [ -z "${_ISOLATED:-}" ]; then
  _ISOLATED=1 exec setsid --wait "$0" "$@"
fi
echo -10 > /proc/$$/autogroup 2>/dev/null || echo "run_isolated: cannot renice autogroup" >&2
PY=${PY:-$(scripts/reference-venv.sh)}
nice -n -10 "$@" &
R=$!
"$PY" "$(dirname "$0")/yield_guard.py" --interval 2 --calm-s 4 --root $R --match "${GUARD_MATCH:-hf_train.py}" \
  --ignore rustc,cargo,cc,cc1,ld,collect2,as,build-script,rust-lld --log "${GUARD_LOG:-/dev/stderr}" &
G=$!
set +e
wait $R; rc=$?
wait $G
exit $rc
