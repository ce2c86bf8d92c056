#!/usr/bin/env bash
# A one-node SLURM cluster on this machine for the launcher tests (Debian 12, slurm 22.05).
#   setup_slurm.sh start STATE_DIR [CTLD_PORT SLURMD_PORT]   -> prints SLURM_CONF=STATE_DIR/slurm.conf
#   setup_slurm.sh stop STATE_DIR                              stops the daemons by pid file
# Installs slurmctld slurmd slurm-client munge with apt-get when missing (needs root).
# Exit 3 = SLURM cannot run here (the reason is on stderr): the caller skips its SLURM tests.
set -euo pipefail
cmd=${1:?start|stop}; state=${2:?state dir}
mkdir -p "$state"; state=$(cd "$state" && pwd)

stop() {
    for name in slurmd slurmctld munged; do
        f="$state/$name.pid"
        if [ -f "$f" ]; then
            pid=$(cat "$f")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
            rm -f "$f"
        fi
    done
}
if [ "$cmd" = stop ]; then stop; exit 0; fi

skip() { echo "SLURM unavailable: $*" >&2; exit 3; }
ctld_port=${3:-6817}; slurmd_port=${4:-6818}

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    [ "$(id -u)" = 0 ] || skip "slurm is not installed and we are not root (apt-get needs root)"
    command -v apt-get >/dev/null || skip "slurm is not installed and there is no apt-get"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >"$state/apt.log" 2>&1 \
        || { timeout 300 apt-get update -q >>"$state/apt.log" 2>&1 && \
             timeout 300 apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >>"$state/apt.log" 2>&1; } \
        || skip "apt-get install slurmctld slurmd slurm-client munge failed (see $state/apt.log)"
fi
[ "$(id -u)" = 0 ] || skip "slurmd must run as root to start jobs as other users; run the tests as root"

host=$(hostname -s)
getent hosts "$host" >/dev/null || echo "127.0.0.1 $host" >> /etc/hosts

# munge: its run directory does not exist in containers and munged refuses root without --force
auth=auth/munge
if id munge >/dev/null 2>&1; then
    mkdir -p /run/munge "$state/munge"
    chown munge: /run/munge "$state/munge"
    [ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null; }
    chown munge: /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
    sock="$state/munge/munge.socket"
    if su -s /bin/sh munge -c "munged --socket=$sock --pid-file=$state/munge/munged.pid --log-file=$state/munge/munged.log --seed-file=$state/munge/seed" 2>"$state/munged.err"; then
        cp "$state/munge/munged.pid" "$state/munged.pid"
    else
        auth=auth/none
    fi
else
    auth=auth/none
fi

mkdir -p "$state/spool/ctld" "$state/spool/d" "$state/log"
node=$(slurmd -C | head -n 1 | sed -e 's/ UpTime=.*//')
cat > "$state/slurm.conf" <<CONF
ClusterName=xtoken-test
SlurmctldHost=$host
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=$auth
CredType=$([ $auth = auth/munge ] && echo cred/munge || echo cred/none)
$([ $auth = auth/munge ] && echo "AuthInfo=socket=$sock,cred_expire=5" || echo "AuthInfo=cred_expire=5")
StateSaveLocation=$state/spool/ctld
SlurmdSpoolDir=$state/spool/d
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=5
InactiveLimit=0
MinJobAge=300
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
# munge clients (sbatch, slurmd) need the socket path too
if [ $auth = auth/munge ]; then export MUNGE_SOCKET="$sock"; fi
slurmctld -c -f "$state/slurm.conf" || skip "slurmctld did not start (see $state/log/slurmctld.log)"
slurmd -f "$state/slurm.conf" || { stop; skip "slurmd did not start (see $state/log/slurmd.log)"; }
export SLURM_CONF="$state/slurm.conf"
for _ in $(seq 100); do
    if sinfo -h -o '%t' 2>/dev/null | grep -q idle; then
        echo "SLURM_CONF=$state/slurm.conf"
        exit 0
    fi
    sleep 0.2
done
stop
skip "the node did not become idle within 20 s (see $state/log/)"
