#!/usr/bin/env bash
# .ci/slurm/start.sh -- install, configure and start a single-node SLURM cluster for kdbench's CI
# (tests/test_slurm.py): Debian 12 packages (slurm-wlm 22.05, munge, slurmdbd + MariaDB), no systemd.
# Adapted from the spike in research/slurm/ (start_local_slurm.sh). Idempotent: re-running it leaves
# running daemons alone and only starts what is missing. Must run as root; it writes /etc/slurm/slurm.conf
# (the jobstep plugin's inner `srun` ignores SLURM_CONF) and backs up a foreign one.
#
# Two partitions on the one node: `main` (the default) and `alt`, so that a test can check that a
# partition chosen through SBATCH_PARTITION reaches sbatch while the profile names none.
#
# Environment knobs (all optional):
#   KDBENCH_SLURM_BASE     state/log/pid directory        (default /tmp/kdbench-slurm)
#   KDBENCH_SLURM_DBD      1 = slurmdbd + MariaDB so `sacct` works (default 1)
#                          0 = accounting_storage/none: no sacct (the profile's squeue status mode still works)
#   KDBENCH_SLURM_DB_PORT  MariaDB TCP port on 127.0.0.1 (default 13306)
#   KDBENCH_SLURM_CLEAN    1 = wipe KDBENCH_SLURM_BASE state before starting (default 0)
#   KDBENCH_SLURM_SKIP_APT 1 = never call apt-get (fail if packages are missing)
#
# Stop with .ci/slurm/stop.sh (it stops only the daemons whose pid files live under KDBENCH_SLURM_BASE).
set -euo pipefail

BASE=${KDBENCH_SLURM_BASE:-/tmp/kdbench-slurm}
WITH_DBD=${KDBENCH_SLURM_DBD:-1}
DB_PORT=${KDBENCH_SLURM_DB_PORT:-13306}
CLEAN=${KDBENCH_SLURM_CLEAN:-0}
SKIP_APT=${KDBENCH_SLURM_SKIP_APT:-0}
MARKER="# managed-by: kdbench .ci/slurm/start.sh"
NODE=$(hostname -s)
CLUSTER=kdbenchci
PARTITION=main       # the default partition
ALT_PARTITION=alt    # same node, not the default

T0=$(date +%s%N)
log() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[slurm/start.sh %3d.%01ds] %s\n' $((ms / 1000)) $((ms % 1000 / 100)) "$*"; }
die() { echo "slurm/start.sh: ERROR: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"

# pid_alive PIDFILE COMM -> 0 if the pid in PIDFILE is alive and its comm matches
pid_alive() {
  local f=$1 comm=$2 pid
  [ -s "$f" ] || return 1
  pid=$(tr -dc 0-9 < "$f")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  [ "$(ps -p "$pid" -o comm= 2>/dev/null)" = "$comm" ]
}
# wait_for SECONDS DESCRIPTION CMD... -> poll CMD every 0.5 s
wait_for() {
  local secs=$1 what=$2; shift 2
  local n=$((secs * 2))
  while [ $n -gt 0 ]; do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5; n=$((n - 1))
  done
  die "timed out after ${secs}s waiting for $what"
}

# ---------------------------------------------------------------- packages
PKGS=(slurmctld slurmd slurm-client munge procps)
[ "$WITH_DBD" = 1 ] && PKGS+=(slurmdbd mariadb-server)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$SKIP_APT" = 1 ] && die "missing packages: ${missing[*]}"
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Keep maintainer scripts from starting munge/mariadb/slurm services on their
  # own (docker images ship a policy-rc.d that does this; add one if absent).
  tmp_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; tmp_policy=1
  fi
  apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ $tmp_policy = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
log "packages ok: $(dpkg-query -W -f='${Version}' slurmctld) slurm, $(dpkg-query -W -f='${Version}' munge) munge"

# ---------------------------------------------------------------- dirs
if [ "$CLEAN" = 1 ] && [ -d "$BASE" ]; then
  for f in "$BASE"/run/*.pid "$BASE"/run/munge/*.pid "$BASE"/db/*.pid; do
    [ -e "$f" ] || continue
    pid=$(tr -dc 0-9 < "$f"); if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      die "KDBENCH_SLURM_CLEAN=1 but daemons still running; run .ci/slurm/stop.sh first"; fi
  done
  rm -rf "$BASE"
fi
mkdir -p "$BASE"/{etc,run,log,state/ctld,state/d}
install -d -o munge -g munge -m 0700 "$BASE/run/munge" "$BASE/log/munge"

# ---------------------------------------------------------------- munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  log "creating munge key"
  runuser -u munge -- /usr/sbin/mungekey --create --keyfile=/etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key; chmod 0600 /etc/munge/munge.key
if pid_alive "$BASE/run/munge/munged.pid" munged; then
  log "munged already running (ours)"
elif munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "a munged not started by this script is already serving /run/munge; reusing it"
else
  rm -f /run/munge/munge.socket.2.lock 2>/dev/null || true
  runuser -u munge -- /usr/sbin/munged \
    --pid-file="$BASE/run/munge/munged.pid" --log-file="$BASE/log/munge/munged.log"
  wait_for 20 munged sh -c 'munge -n | unmunge'
  log "munged started (pid $(cat "$BASE/run/munge/munged.pid"))"
fi

# ---------------------------------------------------------------- slurm.conf
# Config must be at the compiled-in default path /etc/slurm/slurm.conf:
# the snakemake slurm-jobstep plugin strips SLURM_CONF (all SLURM_* vars) from
# the environment of the inner `srun`, so a custom path does not reach it.
CPUS=$(nproc)
MEM_TOTAL=$(awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo)
REAL_MEM=$(( MEM_TOTAL * 90 / 100 ))           # leave 10% margin, else node gets drained
DEF_MEM=$(( REAL_MEM / CPUS )); [ $DEF_MEM -gt 1024 ] && DEF_MEM=1024
if [ "$WITH_DBD" = 1 ]; then
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819"
else
  ACCT="AccountingStorageType=accounting_storage/none"
fi
cat > "$BASE/etc/slurm.conf" <<EOF
$MARKER
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# no cgroups in containers / gVisor: plain process tracking, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/d
SlurmctldPort=6817
SlurmdPort=6818
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$DEF_MEM
$ACCT
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.txt
# keep finished jobs visible to squeue for 5 min (plugin's squeue mode needs >= 3x init interval)
MinJobAge=300
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=$ALT_PARTITION Nodes=$NODE Default=NO MaxTime=INFINITE State=UP
EOF
mkdir -p /etc/slurm
if [ -e /etc/slurm/slurm.conf ] && ! grep -qF "$MARKER" /etc/slurm/slurm.conf; then
  [ -e "$BASE/etc/slurm.conf.orig" ] || cp -a /etc/slurm/slurm.conf "$BASE/etc/slurm.conf.orig"
  log "backed up foreign /etc/slurm/slurm.conf to $BASE/etc/slurm.conf.orig"
fi
conf_changed=0
cmp -s "$BASE/etc/slurm.conf" /etc/slurm/slurm.conf || conf_changed=1
install -m 0644 "$BASE/etc/slurm.conf" /etc/slurm/slurm.conf

# ---------------------------------------------------------------- MariaDB + slurmdbd
if [ "$WITH_DBD" = 1 ]; then
  DB="$BASE/db"
  install -d -o mysql -g mysql -m 0750 "$DB"
  if [ ! -d "$DB/data/mysql" ]; then
    log "initialising MariaDB datadir"
    mariadb-install-db --no-defaults --user=mysql --datadir="$DB/data" \
      --auth-root-authentication-method=socket > "$BASE/log/mariadb-install.log" 2>&1
  fi
  if pid_alive "$DB/mariadbd.pid" mariadbd; then
    log "mariadbd already running (ours)"
  else
    setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DB/data" \
      --socket="$DB/mysqld.sock" --pid-file="$DB/mariadbd.pid" \
      --bind-address=127.0.0.1 --port="$DB_PORT" --log-error="$DB/mariadbd.log" \
      --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
      < /dev/null > "$BASE/log/mariadbd.out" 2>&1 &
    wait_for 60 mariadbd mariadb-admin --socket="$DB/mysqld.sock" ping
    log "mariadbd started (pid $(cat "$DB/mariadbd.pid"), 127.0.0.1:$DB_PORT)"
  fi
  mariadb --socket="$DB/mysqld.sock" -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm-local-ci';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm-local-ci';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
    FLUSH PRIVILEGES;"
  cat > "$BASE/etc/slurmdbd.conf" <<EOF
$MARKER
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$BASE/log/slurmdbd.log
PidFile=$BASE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm-local-ci
StorageLoc=slurm_acct_db
EOF
  if [ -e /etc/slurm/slurmdbd.conf ] && ! grep -qF "$MARKER" /etc/slurm/slurmdbd.conf; then
    [ -e "$BASE/etc/slurmdbd.conf.orig" ] || cp -a /etc/slurm/slurmdbd.conf "$BASE/etc/slurmdbd.conf.orig"
  fi
  cmp -s "$BASE/etc/slurmdbd.conf" /etc/slurm/slurmdbd.conf || conf_changed=1
  install -m 0600 -o root -g root "$BASE/etc/slurmdbd.conf" /etc/slurm/slurmdbd.conf
  if pid_alive "$BASE/run/slurmdbd.pid" slurmdbd; then
    log "slurmdbd already running (ours)"
  else
    slurmdbd
    wait_for 60 slurmdbd sacctmgr -n list cluster
    log "slurmdbd started (pid $(cat "$BASE/run/slurmdbd.pid"))"
  fi
fi

# ---------------------------------------------------------------- slurmctld / slurmd
stop_pid() {  # stop_pid PIDFILE COMM: TERM, wait up to 15 s, then KILL
  local f=$1 comm=$2 pid
  pid_alive "$f" "$comm" || return 0
  pid=$(tr -dc 0-9 < "$f"); kill -TERM "$pid"
  for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  kill -KILL "$pid" 2>/dev/null || true; rm -f "$f"
}
if [ $conf_changed = 1 ] && { pid_alive "$BASE/run/slurmctld.pid" slurmctld || pid_alive "$BASE/run/slurmd.pid" slurmd; }; then
  # e.g. accounting mode switched: plugins change, which needs a daemon restart
  log "config changed: restarting slurmd/slurmctld"
  stop_pid "$BASE/run/slurmd.pid" slurmd
  stop_pid "$BASE/run/slurmctld.pid" slurmctld
fi
if pid_alive "$BASE/run/slurmctld.pid" slurmctld; then
  log "slurmctld already running (ours)"
else
  slurmctld
  wait_for 30 slurmctld scontrol ping
  log "slurmctld started (pid $(cat "$BASE/run/slurmctld.pid"))"
fi
if pid_alive "$BASE/run/slurmd.pid" slurmd; then
  log "slurmd already running (ours)"
else
  slurmd
  wait_for 30 "slurmd pid file" pid_alive "$BASE/run/slurmd.pid" slurmd
  log "slurmd started (pid $(cat "$BASE/run/slurmd.pid"))"
fi
node_usable() { sinfo -h -n "$NODE" -o %T | grep -Eq '^(idle|mixed|allocated|completing)$'; }
for _ in $(seq 20); do node_usable && break; sleep 0.5; done
if ! node_usable; then
  # a node left DOWN/DRAINED by an earlier run (e.g. unclean stop): resume it
  log "node state: $(sinfo -h -n "$NODE" -o %T) -> scontrol update State=RESUME"
  scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
fi
wait_for 60 "node $NODE to become idle" node_usable

if [ "$WITH_DBD" = 1 ]; then
  # an account for workflows that pass slurm_account=ci (the plugin validates it with sacctmgr)
  sacctmgr -i add account ci Description=ci Organization=ci >/dev/null 2>&1 || true
  sacctmgr -i add user root Account=ci >/dev/null 2>&1 || true
fi

# ---------------------------------------------------------------- smoke test
out=$(timeout 60 srun -N1 -n1 -t 1 --mem=100 hostname) || die "srun smoke test failed"
log "srun smoke test ok (ran on $out)"
sinfo
log "cluster '$CLUSTER' up: partitions '$PARTITION' (default) and '$ALT_PARTITION', node $NODE CPUs=$CPUS RealMemory=$REAL_MEM, accounting=$([ "$WITH_DBD" = 1 ] && echo slurmdbd || echo none)"
if [ "$WITH_DBD" != 1 ]; then
  log "NOTE: no accounting: sacct does not work; use --slurm-status-command squeue (the kdbench profile's default)"
fi
