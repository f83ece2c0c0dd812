#!/usr/bin/env bash
# .ci/slurm/stop.sh -- stop exactly the daemons started by .ci/slurm/start.sh, identified by the pid
# files it keeps under KDBENCH_SLURM_BASE. A daemon is only signalled if its pid is alive AND its command
# name matches. Jobs still in the queue are cancelled first (scancel of their ids; none is expected).
#   --purge   also delete KDBENCH_SLURM_BASE (state, logs, DB) and the /etc/slurm/{slurm,slurmdbd}.conf
#             files written by the start script (restoring backed-up originals).
set -uo pipefail
BASE=${KDBENCH_SLURM_BASE:-/tmp/kdbench-slurm}
MARKER="# managed-by: kdbench .ci/slurm/start.sh"
PURGE=0; [ "${1:-}" = --purge ] && PURGE=1
[ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 1; }

# stop PIDFILE COMM
stop() {
  local f=$1 comm=$2 pid n
  if [ ! -s "$f" ]; then echo "$comm: no pid file ($f)"; return 0; fi
  pid=$(tr -dc 0-9 < "$f")
  if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
    echo "$comm: not running (stale pid file)"; rm -f "$f"; return 0
  fi
  if [ "$(ps -p "$pid" -o comm= 2>/dev/null)" != "$comm" ]; then
    echo "$comm: pid $pid is '$(ps -p "$pid" -o comm=)', not $comm -- leaving it alone"; rm -f "$f"; return 0
  fi
  kill -TERM "$pid"
  for n in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "$comm: pid $pid ignored SIGTERM for 15s, sending SIGKILL"; kill -KILL "$pid" 2>/dev/null
    sleep 0.5
  fi
  echo "$comm: stopped (pid $pid)"
  rm -f "$f"
}

# Jobs left in our cluster's queue (a test that failed half-way): cancel them by id, so that slurmd does
# not leave their processes orphaned. Only when the controller is ours (its pid file is under BASE).
ctld_pid=$(tr -dc 0-9 < "$BASE/run/slurmctld.pid" 2>/dev/null)
if [ -n "$ctld_pid" ] && [ "$(ps -p "$ctld_pid" -o comm= 2>/dev/null)" = slurmctld ]; then
  jobs=$(timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    echo "cancelling jobs still queued: $jobs"
    # shellcheck disable=SC2086
    timeout 20 scancel $jobs || true
    for _ in $(seq 20); do [ -z "$(timeout 10 squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
  fi
fi

# Order: compute node, controller, accounting, database, auth.
stop "$BASE/run/slurmd.pid"          slurmd
stop "$BASE/run/slurmctld.pid"       slurmctld
stop "$BASE/run/slurmdbd.pid"        slurmdbd
stop "$BASE/db/mariadbd.pid"         mariadbd
stop "$BASE/run/munge/munged.pid"    munged

# Job processes (slurmstepd and the job's children) of jobs still running when
# slurmd stopped are left orphaned with proctrack/linuxproc; list them.
left=$(ps -eo pid=,comm= | awk '$2=="slurmstepd"{print $1}')
[ -n "$left" ] && echo "note: slurmstepd processes still alive (jobs that were running): $left"

if [ $PURGE = 1 ]; then
  for c in slurm.conf slurmdbd.conf; do
    if [ -e "/etc/slurm/$c" ] && grep -qF "$MARKER" "/etc/slurm/$c"; then
      if [ -e "$BASE/etc/$c.orig" ]; then cp -a "$BASE/etc/$c.orig" "/etc/slurm/$c"; echo "restored /etc/slurm/$c"
      else rm -f "/etc/slurm/$c"; echo "removed /etc/slurm/$c"; fi
    fi
  done
  rm -rf "$BASE"; echo "removed $BASE"
fi
exit 0
