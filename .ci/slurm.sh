#!/usr/bin/env bash
# A one-node Slurm for the tests: munge, MariaDB, slurmdbd, slurmctld and slurmd on this machine, so that sbatch,
# scancel and sacct behave as on a real cluster (accounting included).
#
#   .ci/slurm.sh start    install the Debian packages if missing, write the configs, start what is not running,
#                         run a smoke job; fast (a few seconds) when everything is already up
#   .ci/slurm.sh stop     stop the daemons this script started (and nothing else)
#   .ci/slurm.sh status   sinfo and the daemons this script started
#
# Exit status of start: 0 Slurm is up; 3 skipped, with the reason on the last line of stdout
# ("slurm: skipped: <reason>": not root, not Debian, apt-get failed, a Slurm configured by someone else);
# anything else is an error (a daemon did not come up; its log is printed).
#
# Needs root on Debian (12, slurm-wlm 22.05). No systemd is needed: the daemons are started by hand.
# The choices below follow the pitfalls of a one-node Slurm without systemd or cgroups (README, "Slurm").
set -euo pipefail

STATE=${UNIVERSAL_SLURM_STATE:-/var/lib/universal-slurm}
CLUSTER=ci
ACCOUNT=ci
PARTITION=debug
PACKAGES=(munge slurm-client slurmctld slurmd slurmdbd mariadb-server)
MARKER="# Written by universal .ci/slurm.sh"
SKIP=3
CHANGED=()  # the config files this run rewrote

say() { echo "slurm: $*"; }
skip() { say "skipped: $*"; exit "$SKIP"; }
fail() {
    say "error: $*" >&2
    for log in "$STATE"/log/*.log; do
        [[ -f $log ]] && { echo "--- $log (last 20 lines)" >&2; tail -n 20 "$log" >&2; }
    done
    exit 1
}

# Wait up to $1 seconds for the command "${@:2}" to succeed (quietly).
wait_for() {
    local seconds=$1; shift
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# Whether the pid in file $1 is a live process.
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Remember that this script started the daemon $1 whose pid file is $2 (stop stops only these).
started() {
    wait_for 10 test -s "$2" || fail "$1 wrote no pid file $2"
    cp "$2" "$STATE/started/$1.pid"
    say "started $1 (pid $(cat "$2"))"
}

check_machine() {
    [[ $(id -u) -eq 0 ]] || skip "not root (the one-node Slurm installs packages and starts daemons as root)"
    [[ -r /etc/os-release ]] || skip "not Debian (no /etc/os-release)"
    local id
    id=$(. /etc/os-release && echo "${ID:-unknown}")
    [[ $id == debian ]] || skip "not Debian (ID=$id)"
    command -v apt-get >/dev/null || skip "not Debian (no apt-get)"
    if [[ -e /etc/slurm/slurm.conf ]] && ! grep -qF "$MARKER" /etc/slurm/slurm.conf; then
        skip "/etc/slurm/slurm.conf exists and was not written by this script (a Slurm configured by someone else)"
    fi
}

install_packages() {
    local missing=() package
    for package in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
    done
    ((${#missing[@]})) || return 0
    say "installing ${missing[*]}"
    local log=/tmp/universal-slurm-apt.log
    export DEBIAN_FRONTEND=noninteractive
    # A machine without systemd refuses to start services from maintainer scripts (policy-rc.d): that is wanted.
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
        tail -n 15 "$log"
        skip "apt-get install ${missing[*]} failed (log: $log)"
    fi
}

write_configs() {
    mkdir -p "$STATE"/{state,spool,log,run,started} /etc/slurm
    chown slurm:slurm "$STATE"/{state,log,run}
    local host cpus memory topology
    host=$(hostname -s)
    topology=$(slurmd -C | head -n 1)
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$topology")
    memory=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$topology")
    [[ -n $cpus && -n $memory ]] || fail "cannot read CPUs and RealMemory from 'slurmd -C': $topology"
    # RealMemory above what slurmd finds makes the node INVALID: announce 90 % of it.
    local sockets cores threads
    sockets=$(sed -n 's/.*SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$topology")
    cores=$(sed -n 's/.*CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$topology")
    threads=$(sed -n 's/.*ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$topology")
    update /etc/slurm/slurm.conf 0644 root <<EOF
$MARKER: a one-node cluster for tests.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# No cgroups here: track processes through /proc, bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
# CPUs are consumed, memory is only checked against the node (nothing could enforce it without cgroups).
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Finished jobs stay visible to squeue/scontrol for 5 minutes; sacct keeps them for good (slurmdbd).
MinJobAge=300
KillWait=5
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
# As on real clusters, a job runs only under an account its user belongs to.
AccountingStorageEnforce=associations
# sacct shows the comment the Snakemake plugin gives each job (rule and wildcards).
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus Boards=1 SocketsPerBoard=${sockets:-1} CoresPerSocket=${cores:-$cpus} ThreadsPerCore=${threads:-1} RealMemory=$((memory * 9 / 10)) State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ ! -s $STATE/dbpass ]]; then
        (umask 077 && head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$STATE/dbpass")
    fi
    # slurmdbd refuses a config that is not the SlurmUser's alone.
    update /etc/slurm/slurmdbd.conf 0600 slurm <<EOF
$MARKER: accounting for the one-node cluster.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=slurm
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$(cat "$STATE/dbpass")
StorageLoc=slurm_acct_db
EOF
}

# Write stdin to $1 with mode $2 and owner $3 unless the file already holds exactly that.
update() {
    local target=$1 mode=$2 owner=$3 tmp
    tmp=$(mktemp)
    cat >"$tmp"
    if [[ -f $target ]] && cmp -s "$tmp" "$target"; then
        rm -f "$tmp"
    else
        install -m "$mode" -o "$owner" -g "$owner" "$tmp" "$target"
        rm -f "$tmp"
        say "wrote $target"
        CHANGED+=("$target")
    fi
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile /etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    # munged refuses to run as root.
    runuser -u munge -- /usr/sbin/munged
    started munged /run/munge/munged.pid
    wait_for 10 bash -c 'munge -n | unmunge' || fail "munge does not answer"
}

start_mariadb() {
    if ! mariadb-admin ping >/dev/null 2>&1; then
        mkdir -p /run/mysqld
        chown mysql:mysql /run/mysqld
        setsid mariadbd --user=mysql --bind-address=127.0.0.1 --pid-file=/run/mysqld/mariadbd.pid \
            >>"$STATE/log/mariadb.log" 2>&1 </dev/null &
        wait_for 30 mariadb-admin ping || fail "MariaDB does not answer"
        started mariadb /run/mysqld/mariadbd.pid
    fi
    local password
    password=$(cat "$STATE/dbpass")
    mariadb <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$password';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$password';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

start_slurmdbd() {
    if ! sacctmgr -n list cluster >/dev/null 2>&1; then
        alive "$STATE/run/slurmdbd.pid" || { slurmdbd; started slurmdbd "$STATE/run/slurmdbd.pid"; }
        wait_for 30 sacctmgr -n list cluster || fail "slurmdbd does not answer"
    fi
    # The cluster must exist before slurmctld registers; the account and user make -A $ACCOUNT valid.
    [[ -n $(sacctmgr -n -P list cluster "$CLUSTER" format=cluster) ]] || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    [[ -n $(sacctmgr -n -P list account "$ACCOUNT" format=account) ]] ||
        sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description="tests" organization=universal >/dev/null
    # root, and the user who ran this through sudo (who then runs the tests), may submit under it.
    local user
    for user in root ${SUDO_USER:-}; do
        [[ -n $(sacctmgr -n -P list assoc user="$user" account="$ACCOUNT" format=user) ]] ||
            sacctmgr -i add user "$user" account="$ACCOUNT" defaultaccount="$ACCOUNT" cluster="$CLUSTER" >/dev/null
    done
}

start_slurmctld() {
    if ! scontrol ping 2>/dev/null | grep -q UP; then
        alive "$STATE/run/slurmctld.pid" || { slurmctld; started slurmctld "$STATE/run/slurmctld.pid"; }
        wait_for 30 bash -c 'scontrol ping | grep -q UP' || fail "slurmctld does not answer"
    elif [[ " ${CHANGED[*]} " == *" /etc/slurm/slurm.conf "* ]]; then
        scontrol reconfigure && say "running daemons reread /etc/slurm/slurm.conf"
    fi
}

start_slurmd() {
    alive "$STATE/run/slurmd.pid" || { slurmd; started slurmd "$STATE/run/slurmd.pid"; }
    local host
    host=$(hostname -s)
    wait_for 30 bash -c "sinfo -h -n $host -o %t | grep -Eq '^(idle|mix|alloc)'" || {
        # A node that was down (an earlier slurmd stopped) comes back on resume.
        scontrol update nodename="$host" state=resume 2>/dev/null || true
        wait_for 30 bash -c "sinfo -h -n $host -o %t | grep -Eq '^(idle|mix|alloc)'" ||
            fail "node $host is not idle: $(sinfo -h -n "$host" -o '%t %E')"
    }
}

smoke_test() {
    local job
    job=$(sbatch --parsable -A "$ACCOUNT" -p "$PARTITION" -t 1 -o /dev/null --wrap true) || fail "sbatch failed"
    wait_for 60 bash -c "sacct -n -X -P -j $job -o State | grep -q COMPLETED" ||
        fail "smoke job $job did not reach COMPLETED in sacct: $(sacct -n -X -P -j "$job" -o State)"
    say "up: partition $PARTITION, account $ACCOUNT, node $(sinfo -h -o '%n %c CPUs %m MB %t'), smoke job $job COMPLETED"
}

start() {
    local began=$SECONDS
    check_machine
    install_packages
    write_configs
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurmctld
    start_slurmd
    smoke_test
    say "ready in $((SECONDS - began)) s"
}

stop() {
    local name pidfile pid
    for name in slurmd slurmctld slurmdbd mariadb munged; do
        pidfile=$STATE/started/$name.pid
        [[ -s $pidfile ]] || continue
        pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            wait_for 20 bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
            say "stopped $name (pid $pid)"
        fi
        rm -f "$pidfile"
    done
}

status() {
    sinfo 2>/dev/null || say "not running (sinfo failed)"
    local pidfile
    for pidfile in "$STATE"/started/*.pid; do
        [[ -s $pidfile ]] && say "started here: $(basename "$pidfile" .pid) pid $(cat "$pidfile")"
    done
    return 0
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
