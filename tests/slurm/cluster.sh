#!/usr/bin/env bash
# A throwaway single-node SLURM cluster on loopback with two placeholder GPUs, for tests/test_slurm.py
# (recipe and measurements: the "nodb" variant of the SLURM feasibility study; no accounting database).
#
#   tests/slurm/cluster.sh start DIR   # write /etc/slurm/{slurm,gres}.conf, start munged (unless one runs),
#                                      # slurmctld and slurmd; wait until the node is idle
#   tests/slurm/cluster.sh stop DIR    # stop every daemon `start` started, by PID, newest first; remove
#                                      # the files it wrote to /etc
#
# Needs root and Debian's slurmctld slurmd slurm-client munge. Everything else lives under DIR: state,
# logs, PID files, the fake GPU device nodes, and DIR/started (PID files to stop) and DIR/created (files
# and directories under /etc to remove). Every wait has a deadline, so a broken cluster fails, never hangs.
# slurm.conf must be /etc/slurm/slurm.conf: the jobstep plugin drops SLURM_CONF before its inner srun.
set -euo pipefail

MARK="# written by hetmerge tests/slurm/cluster.sh"
cmd=${1:?usage: cluster.sh start|stop DIR}
B=$(realpath -m "${2:?usage: cluster.sh start|stop DIR}")

log() { echo "cluster.sh: $*" >&2; }

# Run "$@" every 0.1 s until it succeeds or $1 seconds have passed.
wait_for() {
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.1
  done
}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

dump_logs() {
  for f in "$B"/log/*.log; do
    [ -f "$f" ] && { log "--- tail of $f"; tail -n 20 "$f" >&2; }
  done
  return 0
}

node_idle() { [ "$(sinfo -h -o %T 2>/dev/null)" = idle ]; }

start() {
  mkdir -p "$B"/{state/ctld,state/d,log,run}
  : >"$B/started"
  : >"$B/created"
  local host mem
  host=$(hostname -s)
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')

  # Two placeholder GPUs. Slurm 22.05 drops GPUs without File= and wants device nodes: /dev/null's numbers.
  # Where mknod is not allowed, plain files work too (slurmd only logs a warning).
  for i in 0 1; do
    rm -f "$B/fakegpu$i"
    mknod "$B/fakegpu$i" c 1 3 2>/dev/null || : >"$B/fakegpu$i"
  done

  if [ ! -d /etc/slurm ]; then
    mkdir -p /etc/slurm
    echo /etc/slurm >>"$B/created"
  fi
  for f in slurm.conf gres.conf; do
    if [ -e "/etc/slurm/$f" ] && ! grep -qxF "$MARK" "/etc/slurm/$f"; then
      log "/etc/slurm/$f exists and was not written by this script; not touching it"
      return 3
    fi
  done
  # created first: a failure half-way still lets `stop` clean up
  echo /etc/slurm/slurm.conf >>"$B/created"
  echo /etc/slurm/gres.conf >>"$B/created"
  cat >/etc/slurm/slurm.conf <<EOF
$MARK
ClusterName=hetmergetest
SlurmctldHost=$host(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$B/state/ctld
SlurmdSpoolDir=$B/state/d
SlurmctldPidFile=$B/run/slurmctld.pid
SlurmdPidFile=$B/run/slurmd.pid
SlurmctldLogFile=$B/log/slurmctld.log
SlurmdLogFile=$B/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
CommunicationParameters=NoInAddrAny
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=256
ReturnToService=2
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# one line per finished job, an independent record of what ran
JobCompType=jobcomp/filetxt
JobCompLoc=$B/log/jobcomp.txt
# finished jobs stay visible to squeue for an hour (the test counts them; the plugin polls squeue)
MinJobAge=3600
InactiveLimit=0
KillWait=5
Waittime=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  cat >/etc/slurm/gres.conf <<EOF
$MARK
AutoDetect=off
NodeName=$host Name=gpu File=$B/fakegpu[0-1]
EOF

  # munge: reuse a running munged (not ours to stop), else start one as user munge
  if ! alive /run/munge/munged.pid; then
    if [ ! -s /etc/munge/munge.key ]; then
      echo /etc/munge/munge.key >>"$B/created"
      mungekey -c -f -k /etc/munge/munge.key
      chown munge:munge /etc/munge/munge.key
      chmod 600 /etc/munge/munge.key
    fi
    mkdir -p /run/munge
    chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged
    echo /run/munge/munged.pid >>"$B/started"
  fi
  wait_for 10 munge -n || { log "munged does not answer"; return 1; }

  /usr/sbin/slurmctld -c
  echo "$B/run/slurmctld.pid" >>"$B/started"
  /usr/sbin/slurmd
  echo "$B/run/slurmd.pid" >>"$B/started"
  if ! wait_for 30 node_idle; then
    log "node not idle after 30 s: $(sinfo -h -o '%T %E' 2>&1 || true)"
    dump_logs
    return 1
  fi
  log "cluster up: $(sinfo -h -o '%P %D %T %G' | tr '\n' ' ')"
}

stop() {
  [ -d "$B" ] || return 0
  # no job may outlive the cluster (this cluster is ours: all its jobs are the test's)
  if [ -s "$B/run/slurmctld.pid" ] && alive "$B/run/slurmctld.pid"; then
    timeout 10 scancel --full --quiet --user "$(id -un)" 2>/dev/null || true
  fi
  if [ -f "$B/started" ]; then
    local pids=()
    mapfile -t pids < <(tac "$B/started")
    for f in "${pids[@]}"; do
      [ -s "$f" ] || continue
      local p
      p=$(cat "$f")
      kill -0 "$p" 2>/dev/null || continue
      kill "$p" 2>/dev/null || true
      local deadline=$((SECONDS + 15))
      while kill -0 "$p" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
      if kill -0 "$p" 2>/dev/null; then
        log "PID $p ($f) ignored SIGTERM for 15 s; killing it"
        kill -9 "$p" 2>/dev/null || true
      fi
    done
    : >"$B/started"
  fi
  if [ -f "$B/created" ]; then
    local paths=()
    mapfile -t paths < <(tac "$B/created")
    for f in "${paths[@]}"; do
      if [ -d "$f" ]; then
        rmdir "$f" 2>/dev/null || log "$f is not empty; left in place"
      elif [ "$f" = /etc/munge/munge.key ] || grep -qxF "$MARK" "$f" 2>/dev/null; then
        rm -f "$f"
      fi
    done
    : >"$B/created"
  fi
}

case $cmd in
  start) start ;;
  stop) stop ;;
  *) echo "usage: cluster.sh start|stop DIR" >&2; exit 2 ;;
esac
