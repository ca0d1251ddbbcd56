#!/usr/bin/env bash
# A real SLURM for CI and tests, from Debian's packages (slurmctld, slurmd, munge): one node, or two.
#
#   tools/ci_setup_slurm.sh up       install if needed, configure, start the daemons, wait for an idle node
#   tools/ci_setup_slurm.sh up2      the same with two nodes (see "Two nodes" below); prints its SLURM_CONF
#   tools/ci_setup_slurm.sh stop     stop everything this script started (both set-ups; never a site's SLURM)
#   tools/ci_setup_slurm.sh stop1    stop the single-node set-up only;  stop2: the two-node set-up only
#   tools/ci_setup_slurm.sh status   print what is running (single node);  status2: the two-node set-up
#
# Idempotent: `up` on a running set-up returns at once. Needs root and apt-get (Debian/Ubuntu).
# The node runs without cgroups (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none) so that it
# works inside containers. It only ever writes a slurm.conf carrying MARKER below: a machine with its
# own SLURM configuration is left alone (exit 3).
#
# Two nodes (`up2`): two slurmd on this machine, each in its own network namespace (gdn1, gdn2) with its
# own address (10.77.0.11, 10.77.0.12 on veth pairs joined by the bridge gdbr0, 10.77.0.1, which is also
# the address of this set-up's slurmctld in the root namespace, port 6837). Debian's SLURM is built with
# multiple-slurmd (`scontrol show config`: MULTIPLE_SLURMD = Yes), so two slurmd could also share this
# machine's network stack on two ports, but every node, and every Ray node of a job, would then have the
# same address; in namespaces each node has its own, as on a real cluster, and the same SlurmdPort.
# Each slurmd also has its own host name (gdn1, gdn2: a UTS namespace) and an /etc/hosts naming the nodes'
# addresses (a mount namespace), so that a node's host name resolves to its address, as torch's gloo needs.
# It runs under `nsenter --net` (not `ip netns exec`, which remounts /sys and hides the cgroup mount slurmd
# needs). Munge's socket is a file, reached from every namespace.
# The set-up has its own slurm.conf (MARKER, in /run/gears-dist-slurm2), state, spool and logs, so it
# runs beside the single-node one; clients need SLURM_CONF=/run/gears-dist-slurm2/slurm.conf. It never
# writes /etc/slurm. Both nodes are in partition `ci`, each with 1 CPU. `stop2` kills every process left
# in the two namespaces (slurmd, job steps, a job's Ray), then deletes the namespaces and the bridge.
#
# Exit codes: 0 ready; 10 cannot install here (not root, no apt-get, packages unavailable);
#             3 a foreign slurm.conf exists; 4 (up2) network namespaces, veth or bridges unavailable, or
#             the subnet is taken; 1 anything else (the daemons' logs are printed).
set -euo pipefail

readonly MARKER="# written by gears_dist tools/ci_setup_slurm.sh"
readonly CONF=/etc/slurm/slurm.conf
readonly STATE=/run/gears-dist-slurm
readonly LOGDIR=/var/log/slurm
readonly PARTITION=ci
readonly PACKAGES=(munge slurmctld slurmd slurm-client)
# The two-node set-up (up2).
readonly STATE2=/run/gears-dist-slurm2
readonly CONF2=$STATE2/slurm.conf
readonly SPOOL2=/var/spool/gears-dist-slurm2
readonly BRIDGE=gdbr0
readonly NET2=10.77.0
readonly CTLD_PORT2=6837
readonly NODES2=(gdn1 gdn2) # namespace = SLURM node name; node i has address $NET2.1i

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

# The slurm.conf settings both set-ups share (root daemons, munge, no cgroups, no accounting database);
# $1: the job completion log's name under $LOGDIR.
common_settings() {
  cat <<EOF
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
JobCompLoc=$LOGDIR/$1
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Keep finished jobs visible to scontrol for an hour (there is no accounting database for sacct).
MinJobAge=3600
EOF
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
$(common_settings jobcomp.log)
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

# munged serves both set-ups; `started` is the record of the set-up that starts it.
start_munge() {
  local started=$1
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
  echo munged >>"$started"
  for _ in $(seq 1 50); do
    if munge_works; then
      return 0
    fi
    sleep 0.2
  done
  log "munged does not answer"
  exit 1
}

# Stop munged if `started` says this set-up started it, unless the other set-up (its record `other`) is
# still up: then the record moves there, and munged stops with that one.
stop_munge() {
  local started=$1 other=$2 pid
  grep -qx munged "$started" 2>/dev/null || return 0
  if [[ -s $other ]]; then
    grep -qx munged "$other" || echo munged >>"$other"
    return 0
  fi
  pid=$(cat /run/munge/munged.pid 2>/dev/null || true)
  if [[ -n $pid ]] && kill "$pid" 2>/dev/null; then
    log "stopped munged ($pid)"
  fi
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
  SLURM_CONF=$CONF sinfo -h -p "$PARTITION" -o '%T' 2>/dev/null | head -n 1
}

wait_idle() {
  local state=""
  for _ in $(seq 1 120); do
    state=$(node_state || true)
    case $state in
      idle | mixed | allocated | completing) return 0 ;;
      down* | drain*)
        SLURM_CONF=$CONF scontrol update nodename="$(SLURM_CONF=$CONF sinfo -h -p "$PARTITION" -o '%N')" \
          state=resume 2>/dev/null || true
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
  start_munge "$STATE/started"
  start_daemon slurmctld
  start_daemon slurmd
  wait_idle
  log "ready in $((SECONDS - started)) s: partition '$PARTITION', $(SLURM_CONF=$CONF sinfo -h -p "$PARTITION" -o '%N %c CPUs %m MB')"
}

# Wait until `pid` has exited (up to `tries` x 0.2 s); 1 if it is still there.
wait_gone() {
  local pid=$1 tries=${2:-50}
  for _ in $(seq 1 "$tries"); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.2
  done
  return 1
}

cmd_stop1() {
  [[ -s $STATE/started ]] || return 0
  local name pid
  # Reverse start order: slurmd, slurmctld, then munged.
  for name in $(tac "$STATE/started" | awk '!seen[$0]++'); do
    [[ $name != munged ]] || continue # below, after the daemons
    pid=$(cat "$STATE/$name.pid" 2>/dev/null || true)
    if [[ -n $pid ]] && kill "$pid" 2>/dev/null; then
      log "stopped $name ($pid)"
      wait_gone "$pid" || true
    fi
  done
  stop_munge "$STATE/started" "$STATE2/started"
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

# -- two nodes (up2) ------------------------------------------------------------------------------------------

node_addr2() { # gdn1 -> 10.77.0.11
  echo "$NET2.1${1#gdn}"
}

slurm2() { # a SLURM client command against the two-node set-up
  SLURM_CONF=$CONF2 "$@"
}

netns_exists() {
  ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$1"
}

write_config2() {
  if [[ -e $CONF2 ]] && ! grep -qF "$MARKER" "$CONF2"; then
    log "$CONF2 exists and was not written by this script: leaving it alone"
    exit 3
  fi
  local node nodes lines=()
  for node in "${NODES2[@]}"; do
    lines+=("NodeName=$node NodeHostname=$node NodeAddr=$(node_addr2 "$node") CPUs=1 State=UNKNOWN")
  done
  nodes=$(IFS=,; echo "${NODES2[*]}")
  mkdir -p "$STATE2" "$SPOOL2/ctld" "$LOGDIR"
  local tmp
  tmp=$(mktemp "$STATE2/.slurm.conf.XXXXXX")
  cat >"$tmp" <<EOF
$MARKER (two nodes in network namespaces: up2)
ClusterName=gearsci2
SlurmctldHost=$(hostname -s)($NET2.1)
SlurmctldPort=$CTLD_PORT2
SlurmdPort=6818
$(common_settings gears2-jobcomp.log)
# Each node declares 1 CPU on a machine with more: the configuration counts, not the hardware.
SlurmdParameters=config_overrides
SlurmctldPidFile=$STATE2/slurmctld.pid
SlurmctldLogFile=$LOGDIR/gears2-slurmctld.log
StateSaveLocation=$SPOOL2/ctld
# %n is the node's name (slurmd -N): the two slurmd of this machine keep apart.
SlurmdPidFile=$STATE2/slurmd-%n.pid
SlurmdLogFile=$LOGDIR/gears2-slurmd-%n.log
SlurmdSpoolDir=$SPOOL2/%n
$(printf '%s\n' "${lines[@]}")
PartitionName=$PARTITION Nodes=$nodes Default=YES MaxTime=INFINITE State=UP
EOF
  chmod 644 "$tmp"
  mv -f "$tmp" "$CONF2"
}

net_is_up2() {
  local node
  ip link show "$BRIDGE" >/dev/null 2>&1 || return 1
  for node in "${NODES2[@]}"; do
    ip -n "$node" -4 addr show 2>/dev/null | grep -qF "inet $(node_addr2 "$node")/" || return 1
  done
}

# The bridge (this machine's end, $NET2.1) and one namespace per node, joined to it by a veth pair.
net_up2() {
  if grep -qx net "$STATE2/started" 2>/dev/null && net_is_up2; then
    return 0
  fi
  if grep -qx net "$STATE2/started" 2>/dev/null; then
    net_down2 # half made by an earlier run of this script
  elif ip link show "$BRIDGE" >/dev/null 2>&1; then
    log "a link named $BRIDGE exists and was not made by this set-up: leaving it alone"
    exit 4
  fi
  local node routed
  for node in "${NODES2[@]}"; do
    if netns_exists "$node"; then
      log "a network namespace named $node exists and was not made by this set-up: leaving it alone"
      exit 4
    fi
  done
  routed=$(ip -4 route show to match "$NET2.1" | grep -v '^default' || true)
  if [[ -n $routed ]]; then
    log "$NET2.0/24 is in use on this machine already ($routed)"
    exit 4
  fi
  echo net >>"$STATE2/started" # from here on, stop2 removes whatever of it exists
  local rc=0
  {
    ip link add "$BRIDGE" type bridge \
      && ip addr add "$NET2.1/24" dev "$BRIDGE" \
      && ip link set "$BRIDGE" up
  } 2>"$STATE2/net.err" || rc=$?
  for node in "${NODES2[@]}"; do
    [[ $rc -eq 0 ]] || break
    {
      ip netns add "$node" \
        && ip -n "$node" link set lo up \
        && ip link add "$node-br" type veth peer name "$node-ns" netns "$node" \
        && ip link set "$node-br" master "$BRIDGE" \
        && ip link set "$node-br" up \
        && ip -n "$node" addr add "$(node_addr2 "$node")/24" dev "$node-ns" \
        && ip -n "$node" link set "$node-ns" up \
        && ip -n "$node" route add default via "$NET2.1"
    } 2>>"$STATE2/net.err" || rc=$?
  done
  if [[ $rc -ne 0 ]]; then
    log "cannot make the network namespaces, veth pairs or bridge here: $(tr '\n' ' ' <"$STATE2/net.err")"
    net_down2
    exit 4
  fi
  # Reachability shows when both slurmd register with slurmctld (wait_idle2) across the bridge.
}

# Kill every process still in the namespaces (slurmd, job steps, a job's Ray: all started by this set-up),
# then delete the namespaces (their veth pairs go with them) and the bridge.
net_down2() {
  local node sig pids=()
  for sig in TERM KILL; do
    pids=()
    for node in "${NODES2[@]}"; do
      if netns_exists "$node"; then
        mapfile -t -O "${#pids[@]}" pids < <(ip netns pids "$node" 2>/dev/null)
      fi
    done
    [[ ${#pids[@]} -gt 0 ]] || break
    log "SIG$sig to ${#pids[@]} process(es) left in the namespaces"
    kill "-$sig" "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 1 50); do
      kill -0 "${pids[@]}" 2>/dev/null || break
      sleep 0.2
    done
  done
  for node in "${NODES2[@]}"; do
    if netns_exists "$node"; then
      ip netns del "$node" && log "deleted network namespace $node"
    fi
  done
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link del "$BRIDGE" && log "deleted bridge $BRIDGE"
  fi
}

start_daemons2() {
  local node
  if ! pid_alive "$STATE2/slurmctld.pid"; then
    /usr/sbin/slurmctld -f "$CONF2"
    echo slurmctld >>"$STATE2/started"
  fi
  write_hosts2
  for node in "${NODES2[@]}"; do
    mkdir -p "$SPOOL2/$node"
    if ! pid_alive "$STATE2/slurmd-$node.pid"; then
      # Each node is a machine of its own: its network namespace (nsenter, not `ip netns exec`, which
      # remounts /sys and hides the cgroup mount slurmd needs), its own host name (UTS namespace) and an
      # /etc/hosts in which that name is the node's address (mount namespace). Without the last two, the
      # shared host name resolves to 127.0.0.1 on both nodes and torch's gloo binds to loopback.
      # shellcheck disable=SC2016  # $1..$3 are the inner bash's arguments
      if ! nsenter --net="/run/netns/$node" -- unshare --uts --mount --propagation slave -- \
        bash -c 'hostname "$1" && mount --bind "$2" /etc/hosts && exec /usr/sbin/slurmd -f "$3" -N "$1"' \
        slurmd-ns "$node" "$STATE2/hosts" "$CONF2"; then
        log "slurmd $node did not start; its log follows"
        tail -n 20 "$LOGDIR/gears2-slurmd-$node.log" >&2 2>/dev/null || true
        exit 1
      fi
      echo "slurmd:$node" >>"$STATE2/started"
    fi
  done
}

write_hosts2() {
  local node
  {
    echo "$MARKER (the nodes' /etc/hosts)"
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n'
    printf '%s\t%s\n' "$NET2.1" "$(hostname -s)"
    for node in "${NODES2[@]}"; do
      printf '%s\t%s\n' "$(node_addr2 "$node")" "$node"
    done
  } >"$STATE2/hosts"
  chmod 644 "$STATE2/hosts"
}

nodes_state2() { # e.g. "gdn1 idle gdn2 idle"
  slurm2 sinfo -h -p "$PARTITION" -N -o '%N %T' 2>/dev/null | sort | tr '\n' ' ' | sed 's/ $//'
}

wait_idle2() {
  local states="" node state ready
  for _ in $(seq 1 120); do
    states=$(nodes_state2 || true)
    ready=0
    for node in "${NODES2[@]}"; do
      state=$(awk -v n="$node" '{for (i = 1; i < NF; i += 2) if ($i == n) print $(i + 1)}' <<<"$states")
      case $state in
        idle | mixed | allocated | completing) ready=$((ready + 1)) ;;
        down* | drain*) slurm2 scontrol update nodename="$node" state=resume 2>/dev/null || true ;;
      esac
    done
    if [[ $ready -eq ${#NODES2[@]} ]]; then
      return 0
    fi
    sleep 0.5
  done
  log "nodes not ready (${states:-no answer}); logs follow"
  tail -n 30 "$LOGDIR/gears2-slurmctld.log" "$LOGDIR"/gears2-slurmd-*.log >&2 2>/dev/null || true
  exit 1
}

cmd_up2() {
  mkdir -p "$STATE" "$STATE2"
  local started=$SECONDS
  install_packages
  write_config2
  net_up2
  start_munge "$STATE2/started"
  start_daemons2
  wait_idle2
  log "ready in $((SECONDS - started)) s: partition '$PARTITION': $(nodes_state2); clients need SLURM_CONF=$CONF2"
  echo "SLURM_CONF=$CONF2"
}

cmd_stop2() {
  [[ -s $STATE2/started ]] || return 0
  local node pid
  for node in "${NODES2[@]}"; do
    pid=$(cat "$STATE2/slurmd-$node.pid" 2>/dev/null || true)
    if [[ -n $pid ]] && grep -qx "slurmd:$node" "$STATE2/started" && kill "$pid" 2>/dev/null; then
      log "stopped slurmd $node ($pid)"
      wait_gone "$pid" || true
    fi
  done
  if grep -qx net "$STATE2/started"; then
    net_down2
  fi
  pid=$(cat "$STATE2/slurmctld.pid" 2>/dev/null || true)
  if [[ -n $pid ]] && grep -qx slurmctld "$STATE2/started" && kill "$pid" 2>/dev/null; then
    log "stopped slurmctld ($pid)"
    wait_gone "$pid" || true
  fi
  stop_munge "$STATE2/started" "$STATE/started"
  rm -f "$STATE2/started"
}

cmd_status2() {
  local node
  if pid_alive "$STATE2/slurmctld.pid"; then
    echo "slurmctld running (pid $(cat "$STATE2/slurmctld.pid"))"
  else
    echo "slurmctld not running"
  fi
  for node in "${NODES2[@]}"; do
    if pid_alive "$STATE2/slurmd-$node.pid"; then
      echo "slurmd $node running (pid $(cat "$STATE2/slurmd-$node.pid"), namespace $node, $(node_addr2 "$node"))"
    else
      echo "slurmd $node not running"
    fi
  done
  if munge_works; then echo "munge working"; else echo "munge not working"; fi
  echo "nodes: $(nodes_state2 || true)"
}

case ${1:-up} in
  up) cmd_up ;;
  up2) cmd_up2 ;;
  stop)
    cmd_stop2
    cmd_stop1
    ;;
  stop1) cmd_stop1 ;;
  stop2) cmd_stop2 ;;
  status) cmd_status ;;
  status2) cmd_status2 ;;
  *)
    echo "usage: $0 [up|up2|stop|stop1|stop2|status|status2]" >&2
    exit 2
    ;;
esac
