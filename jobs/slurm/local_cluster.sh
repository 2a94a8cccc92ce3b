#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the `slurm`-marked tests (and for trying the
# launcher and the sbatch template by hand). Debian's Slurm 22.05, run as root, no systemd.
#
#   jobs/slurm/local_cluster.sh install      # apt-get the daemons (slurmctld slurmd slurmdbd munge mariadb)
#   jobs/slurm/local_cluster.sh start DIR    # config, state and logs under DIR; prints `export SLURM_CONF=...`
#   jobs/slurm/local_cluster.sh stop DIR     # cancel every job, wait for them, stop the daemons
#
# Nothing is written to /etc/slurm: the daemons and every client read DIR/slurm.conf through
# SLURM_CONF. slurmdbd + MariaDB are there because submitit polls `sacct`. The settings after
# "fast requeue" make a requeued job start again in seconds instead of minutes.
set -euo pipefail

cmd=${1:?usage: local_cluster.sh install|start DIR|stop DIR}

install_packages() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurmctld slurmd slurm-client slurmdbd munge mariadb-server >/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq $((seconds * 5))); do
        if timeout 5 "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    echo "local_cluster.sh: $what did not come up within ${seconds}s (logs in $dir/log)" >&2
    return 1
}

write_config() {
    local host mem
    host=$(hostname -s)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
    mkdir -p "$dir"/{spool,state,log}
    cat >"$dir/slurm.conf" <<EOF
ClusterName=ci
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
SlurmdSpoolDir=$dir/spool
StateSaveLocation=$dir/state
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
MailProg=/bin/true
ReturnToService=2
# fast requeue: a requeued job runs again after ~5 s, a cancelled one is killed 5 s after SIGTERM
KillWait=5
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=1,bf_interval=1
NodeName=$host CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$dir/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
LogFile=$dir/log/slurmdbd.log
PidFile=$dir/slurmdbd.pid
EOF
    chmod 600 "$dir/slurmdbd.conf"
}

start() {
    [ "$(id -u)" = 0 ] || { echo "local_cluster.sh: needs root (the daemons run as root)" >&2; exit 1; }
    for daemon in munged mariadbd slurmdbd slurmctld slurmd; do
        command -v "$daemon" >/dev/null || [ -x "/usr/sbin/$daemon" ] ||
            { echo "local_cluster.sh: $daemon is not installed (run: $0 install)" >&2; exit 1; }
    done
    write_config
    export SLURM_CONF=$dir/slurm.conf PATH=/usr/sbin:$PATH

    install -d -o munge -g munge -m 755 /run/munge
    # munged and MariaDB may already run (then they are left running at stop): note what we start
    : >"$dir/started"
    if ! munge -n >/dev/null 2>&1; then runuser -u munge -- munged && echo munged >>"$dir/started"; fi
    install -d -o mysql -g mysql /run/mysqld
    if ! mysqladmin ping >/dev/null 2>&1; then
        # its pid file stays at the default place: one under /tmp crashed it
        nohup mariadbd --user=mysql >"$dir/log/mariadb.log" 2>&1 &
        echo mariadbd >>"$dir/started"
    fi
    wait_for 60 MariaDB mysqladmin ping
    # A fresh accounting database: job ids restart at 1 with the fresh state dir, and old records
    # under the same ids would confuse sacct.
    mysql -e "DROP DATABASE IF EXISTS slurm_acct_db; CREATE DATABASE slurm_acct_db;
              CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
    slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
    sacctmgr -i add cluster ci >/dev/null
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF"
    wait_for 60 "an idle node" bash -c 'sinfo -h -o %T | grep -qx idle'
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
    export SLURM_CONF=$dir/slurm.conf PATH=/usr/sbin:$PATH
    if [ -f "$SLURM_CONF" ] && pgrep -x slurmctld >/dev/null; then
        scancel --full --quiet --user=root || true
        # jobs must be gone before their daemons (and munged) stop, or slurmstepd keeps looping
        for _ in $(seq 150); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
    fi
    for pidfile in slurmd slurmctld slurmdbd; do
        if [ -f "$dir/$pidfile.pid" ]; then
            kill "$(cat "$dir/$pidfile.pid")" 2>/dev/null || true
        fi
    done
    for daemon in slurmd slurmctld slurmdbd; do
        for _ in $(seq 50); do pgrep -x "$daemon" >/dev/null || break; sleep 0.2; done
    done
    if grep -qx mariadbd "$dir/started" 2>/dev/null; then mysqladmin shutdown 2>/dev/null || true; fi
    if grep -qx munged "$dir/started" 2>/dev/null && [ -f /run/munge/munged.pid ]; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
    fi
}

case $cmd in
    install) install_packages ;;
    start) dir=$(realpath -m "${2:?start DIR}"); start ;;
    stop) dir=$(realpath -m "${2:?stop DIR}"); stop ;;
    *) echo "usage: local_cluster.sh install|start DIR|stop DIR" >&2; exit 2 ;;
esac
