#!/usr/bin/env bash
# A real single-node SLURM for CI and tests, from Debian's packages (slurmctld, slurmd, munge).
#
#   tools/ci_setup_slurm.sh up       install if needed, configure, start the daemons, wait for an idle node
#   tools/ci_setup_slurm.sh stop     stop the daemons this script started (never a site's own SLURM)
#   tools/ci_setup_slurm.sh status   print what is running
#
# Idempotent: `up` on a running set-up returns at once. Needs root and apt-get (Debian/Ubuntu).
# The node runs without cgroups (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none) so that it
# works inside containers. It only ever writes a slurm.conf carrying MARKER below: a machine with its
# own SLURM configuration is left alone (exit 3).
#
# Exit codes: 0 ready; 10 cannot install here (not root, no apt-get, packages unavailable);
#             3 a foreign slurm.conf exists; 1 anything else (the daemons' logs are printed).
set -euo pipefail

readonly MARKER="# written by gears_dist tools/ci_setup_slurm.sh"
readonly CONF=/etc/slurm/slurm.conf
readonly STATE=/run/gears-dist-slurm
readonly LOGDIR=/var/log/slurm
readonly PARTITION=ci
readonly PACKAGES=(munge slurmctld slurmd slurm-client)

log() { printf 'ci_setup_slurm: %s\n' "$*" >&2; }

have_binaries() {
  command -v munged >/dev/null && command -v slurmctld >/dev/null \
    && command -v slurmd >/dev/null && command -v sbatch >/dev/null
}

install_packages() {
  if have_binaries; then
    return 0
  fi
  if [[ $(id -u) -ne 0 ]]; then
    log "not root: cannot install ${PACKAGES[*]}"
    exit 10
  fi
  if ! command -v apt-get >/dev/null; then
    log "no apt-get: cannot install ${PACKAGES[*]}"
    exit 10
  fi
  local started=$SECONDS
  # Forbid the packages' maintainer scripts from starting daemons with their default config.
  local policy=/usr/sbin/policy-rc.d added_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    added_policy=1
  fi
  local rc=0
  {
    apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"
  } >"$STATE/apt.log" 2>&1 || rc=$?
  if [[ $added_policy -eq 1 ]]; then
    rm -f "$policy"
  fi
  if [[ $rc -ne 0 ]] || ! have_binaries; then
    tail -n 20 "$STATE/apt.log" >&2 || true
    log "apt-get could not install ${PACKAGES[*]} (rc=$rc)"
    exit 10
  fi
  log "installed ${PACKAGES[*]} in $((SECONDS - started)) s"
}

write_config() {
  if [[ -e $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
    log "$CONF exists and was not written by this script: leaving this machine's SLURM alone"
    exit 3
  fi
  # slurmd -C reports this machine's real topology and memory, so the node never drains for a mismatch.
  local node_line
  node_line=$(slurmd -C | grep '^NodeName=' | head -n 1)
  local node
  node=$(sed -E 's/^NodeName=([^ ]+).*/\1/' <<<"$node_line")
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOGDIR"
  local tmp
  tmp=$(mktemp /etc/slurm/.slurm.conf.XXXXXX)
  cat >"$tmp" <<EOF
$MARKER
ClusterName=gearsci
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGDIR/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Keep finished jobs visible to scontrol for an hour (there is no accounting database for sacct).
MinJobAge=3600
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
  chmod 644 "$tmp"
  mv -f "$tmp" "$CONF"
}

pid_alive() {
  local file=$1
  [[ -s $file ]] && kill -0 "$(cat "$file")" 2>/dev/null
}

munge_works() {
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1
}

start_munge() {
  if munge_works; then
    return 0
  fi
  if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged
  echo munged >>"$STATE/started"
  for _ in $(seq 1 50); do
    if munge_works; then
      return 0
    fi
    sleep 0.2
  done
  log "munged does not answer"
  exit 1
}

start_daemon() {
  local name=$1
  if pid_alive "$STATE/$name.pid"; then
    return 0
  fi
  "/usr/sbin/$name"
  echo "$name" >>"$STATE/started"
}

node_state() {
  sinfo -h -p "$PARTITION" -o '%T' 2>/dev/null | head -n 1
}

wait_idle() {
  local state=""
  for _ in $(seq 1 120); do
    state=$(node_state || true)
    case $state in
      idle | mixed | allocated | completing) return 0 ;;
      down* | drain*)
        scontrol update nodename="$(sinfo -h -p "$PARTITION" -o '%N')" state=resume 2>/dev/null || true
        ;;
    esac
    sleep 0.5
  done
  log "node not ready (state '${state:-no answer}'); logs follow"
  tail -n 30 "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" >&2 2>/dev/null || true
  exit 1
}

cmd_up() {
  mkdir -p "$STATE"
  local started=$SECONDS
  install_packages
  write_config
  start_munge
  start_daemon slurmctld
  start_daemon slurmd
  wait_idle
  log "ready in $((SECONDS - started)) s: partition '$PARTITION', $(sinfo -h -p "$PARTITION" -o '%N %c CPUs %m MB')"
}

cmd_stop() {
  [[ -s $STATE/started ]] || return 0
  local name pid
  # Reverse start order: slurmd, slurmctld, then munged.
  for name in $(tac "$STATE/started" | awk '!seen[$0]++'); do
    case $name in
      munged) pid=$(cat /run/munge/munged.pid 2>/dev/null || true) ;;
      *) pid=$(cat "$STATE/$name.pid" 2>/dev/null || true) ;;
    esac
    if [[ -n $pid ]] && kill "$pid" 2>/dev/null; then
      log "stopped $name ($pid)"
    fi
  done
  rm -f "$STATE/started"
}

cmd_status() {
  local name
  for name in slurmctld slurmd; do
    if pid_alive "$STATE/$name.pid"; then
      echo "$name running (pid $(cat "$STATE/$name.pid"))"
    else
      echo "$name not running"
    fi
  done
  if munge_works; then echo "munge working"; else echo "munge not working"; fi
  echo "node: $(node_state || echo 'no answer')"
}

case ${1:-up} in
  up) cmd_up ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 [up|stop|status]" >&2
    exit 2
    ;;
esac
