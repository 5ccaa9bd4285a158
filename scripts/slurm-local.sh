#!/usr/bin/env bash
# Start, stop or check a REAL Slurm cluster on this machine (Debian's Slurm 22.05): munged, mariadbd,
# slurmdbd, slurmctld and three slurmd (nodes a1 a2 a3 on 127.0.0.1, 16 CPUs and 8 fake GPUs each,
# partition `debug`; the third lets a 2-node run be retried away from a failed node). It exists so that tests and users without a cluster exercise the real
# sbatch/squeue/sacct path, accounting included, instead of mocks.
#
#   scripts/slurm-local.sh up       install (apt, once) and start; idempotent; waits until usable
#   scripts/slurm-local.sh down     cancel jobs, stop the daemons this script started (pid files)
#   scripts/slurm-local.sh status   show what runs; exit 0 only if the cluster is usable
#
# All state (config, spool, logs, pids, database) lives in $SLURM_LOCAL_DIR
# (default /var/tmp/clusterctl-slurm). The config is also installed in /etc/slurm so that plain
# `sbatch` finds it, unless a config not written by this script is already there.
# Exit codes: 0 ok, 1 failure (the relevant log is shown), 3 this machine cannot host the cluster
# (not root, no apt-get, no mknod): `make slurm-up` tolerates 3 and tests marked `slurm` skip.
# See docs/slurm-local.md.
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-/var/tmp/clusterctl-slurm}"
TEMPLATES="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/slurm-local"
ETC="$DIR/etc" RUN="$DIR/run" LOG="$DIR/log" SPOOL="$DIR/spool" DB="$DIR/db" GPUDEV="$DIR/fakegpu"
SYS_ETC=/etc/slurm
MARK="# managed-by: clusterctl scripts/slurm-local.sh"
CLUSTER=local
NODES=(a1 a2 a3)
CTLD_PORT=16817 DBD_PORT=16819 DB_PORT=13307   # off the defaults (6817/6819/3306) to avoid clashes
PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)
export PATH="$PATH:/usr/sbin:/sbin"
export SLURM_CONF="$ETC/slurm.conf"
MYSOCK="$RUN/mysql/mysqld.sock"

say() { printf 'slurm-local: %s\n' "$*"; }
unsupported() { say "cannot run a local Slurm cluster on this machine: $*" >&2; exit 3; }
die() {  # die MESSAGE [LOGFILE...]: the message plus the end of each log that exists
    say "ERROR: $1" >&2
    shift
    for f in "$@"; do
        [ -s "$f" ] && { echo "---- last lines of $f" >&2; tail -n 15 "$f" >&2; }
    done
    exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

wait_until() {  # wait_until SECONDS CMD...: poll CMD every 0.2 s
    local end=$((SECONDS + $1)); shift
    until "$@"; do
        [ "$SECONDS" -lt "$end" ] || return 1
        sleep 0.2
    done
}

pid_alive() {  # pid_alive PIDFILE COMM: the pid in the file runs program COMM (guards against pid reuse)
    local pid
    [ -s "$1" ] || return 1
    pid="$(cat "$1" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

gone() {  # gone PID: the process exited (a zombie child counts as exited)
    [ ! -r "/proc/$1/stat" ] || grep -Eq '^[0-9]+ \(.*\) Z' "/proc/$1/stat"
}
died() {  # died PIDFILE COMM: the daemon wrote its pid file and is no longer running
    [ -s "$1" ] && ! pid_alive "$1" "$2"
}

# ---- probes: every client call is wrapped in timeout (clients block ~10 s per try without slurmctld)
munge_ok() { timeout 5 munge -n </dev/null 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; }
sql() { timeout 10 mariadb --no-defaults --socket="$MYSOCK" -uroot -N -e "$1"; }
db_ok() { [ -S "$MYSOCK" ] && sql "SELECT 1" >/dev/null 2>&1; }
ctld_ok() { timeout 5 scontrol ping 2>/dev/null | grep -q ' is UP'; }
sacct_ok() { timeout 10 sacct -n -X -S now-1minutes -o JobID >/dev/null 2>&1; }
node_states() { timeout 5 sinfo -h -N -p debug -o '%N %T' 2>/dev/null | sort -u; }
nodes_ok() {  # every node is up and schedulable (jobs may already run on it)
    local states n
    states="$(node_states)" || return 1
    for n in "${NODES[@]}"; do
        grep -Eq "^$n (idle|mixed|allocated|completing)$" <<<"$states" || return 1
    done
}
cluster_ok() { munge_ok && ctld_ok && nodes_ok && sacct_ok; }

# The daemons must not inherit fd 9 (they would hold the lock forever): every start closes it (9>&-).
lock() {
    exec 9>"$DIR/.lock"
    flock -w 120 9 || die "another 'slurm-local.sh up/down' holds $DIR/.lock"
}

# ---- up -----------------------------------------------------------------------------------------
preflight() {
    [ "$(id -u)" = 0 ] || unsupported "needs root (daemons run as SlurmUser=root, it writes /etc/hosts and device nodes)"
    local missing=() b
    for b in munged munge unmunge mariadbd mariadb-install-db mariadb slurmdbd slurmctld slurmd \
             sbatch sinfo sacct sacctmgr scontrol flock; do
        command -v "$b" >/dev/null || missing+=("$b")
    done
    [ ${#missing[@]} -eq 0 ] && return
    command -v apt-get >/dev/null || unsupported "missing ${missing[*]} and no apt-get to install ${PACKAGES[*]}"
    say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    local t0; t0="$(now)"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${PACKAGES[@]}" >"/tmp/slurm-local-apt.log" 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get update -q >>"/tmp/slurm-local-apt.log" 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${PACKAGES[@]}" >>"/tmp/slurm-local-apt.log" 2>&1 \
            || die "apt-get install ${PACKAGES[*]} failed" /tmp/slurm-local-apt.log
    fi
    say "installed in $(since "$t0")s"
}

render() {  # render TEMPLATE DEST MODE: fill in @VARS@, replace DEST atomically; 0 if DEST changed
    local tmp
    tmp="$(mktemp "$2.XXXXXX")"
    sed -e "s|@DIR@|$DIR|g" -e "s|@CLUSTER@|$CLUSTER|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
        -e "s|@DBD_PORT@|$DBD_PORT|g" -e "s|@DB_PORT@|$DB_PORT|g" -e "s|@DB_PASS@|$DB_PASS|g" \
        "$TEMPLATES/$1" >"$tmp"
    chmod "$3" "$tmp"
    if cmp -s "$tmp" "$2"; then rm -f "$tmp"; return 1; fi
    mv -f "$tmp" "$2"
}

write_config() {
    mkdir -p "$ETC" "$RUN" "$LOG" "$SPOOL/ctld" "$GPUDEV"
    chmod 755 "$DIR"
    [ -s "$ETC/dbpass" ] || (umask 077; od -An -N12 -tx1 /dev/urandom | tr -d ' \n' >"$ETC/dbpass")
    DB_PASS="$(cat "$ETC/dbpass")"
    CONFIG_CHANGED=0
    render slurm.conf.in "$ETC/slurm.conf" 644 && CONFIG_CHANGED=1
    render gres.conf.in "$ETC/gres.conf" 644 && CONFIG_CHANGED=1
    render slurmdbd.conf.in "$ETC/slurmdbd.conf" 600 && CONFIG_CHANGED=1
    # Plain clients (tests, users) read /etc/slurm/slurm.conf: install ours there unless it is foreign.
    mkdir -p "$SYS_ETC"
    if [ -e "$SYS_ETC/slurm.conf" ] && ! head -n 1 "$SYS_ETC/slurm.conf" | grep -qF "$MARK"; then
        say "WARNING: $SYS_ETC/slurm.conf was not written by this script; left alone."
        say "         plain sbatch/squeue talk to that cluster; for this one: export SLURM_CONF=$SLURM_CONF"
    else
        local f mode
        for f in slurm.conf gres.conf slurmdbd.conf; do
            mode=644; [ "$f" = slurmdbd.conf ] && mode=600
            if [ -e "$SYS_ETC/$f" ] && ! head -n 1 "$SYS_ETC/$f" | grep -qF "$MARK"; then
                say "WARNING: $SYS_ETC/$f was not written by this script; left alone"
                continue
            fi
            cmp -s "$ETC/$f" "$SYS_ETC/$f" || { install -m "$mode" "$ETC/$f" "$SYS_ETC/.$f.tmp" && mv -f "$SYS_ETC/.$f.tmp" "$SYS_ETC/$f"; }
        done
    fi
    # Node names must resolve (MASTER_ADDR-style code uses `scontrol show hostnames`).
    local missing=() n
    for n in "${NODES[@]}"; do getent hosts "$n" >/dev/null || missing+=("$n"); done
    if [ ${#missing[@]} -gt 0 ]; then
        printf '127.0.0.1 %s  # clusterctl scripts/slurm-local.sh\n' "${missing[*]}" >>/etc/hosts \
            || die "cannot add ${missing[*]} to /etc/hosts"
        say "added ${missing[*]} -> 127.0.0.1 to /etc/hosts"
    fi
    local i
    for i in 0 1 2 3 4 5 6 7; do
        [ -c "$GPUDEV/nvidia$i" ] && continue
        rm -f "$GPUDEV/nvidia$i"
        mknod "$GPUDEV/nvidia$i" c 195 "$i" 2>/dev/null || unsupported "mknod of fake GPU devices fails in $GPUDEV"
    done
}

start_munge() {
    if munge_ok; then say "munge: running"; return; fi
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    fi
    # The default socket: slurmdbd ignores AuthInfo=socket= (see docs/slurm-local.md).
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 "$DIR/munge"
    runuser -u munge -- munged --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed" </dev/null 9>&- >>"$LOG/munged.out" 2>&1 \
        || die "munged did not start" "$LOG/munged.out" "$DIR/munge/munged.log"
    wait_until 10 munge_ok || die "munge does not answer" "$DIR/munge/munged.log"
    say "munge: started"
}

start_db() {
    if pid_alive "$RUN/mysql/mariadbd.pid" mariadbd && db_ok; then say "mariadb: running"; return; fi
    install -d -o mysql -g mysql -m 750 "$DB"
    install -d -o mysql -g mysql -m 755 "$RUN/mysql"
    if [ ! -d "$DB/mysql" ]; then
        mariadb-install-db --no-defaults --datadir="$DB" --user=mysql --auth-root-authentication-method=socket \
            --skip-test-db >"$LOG/mariadb-install.log" 2>&1 || die "mariadb-install-db failed" "$LOG/mariadb-install.log"
    fi
    touch "$LOG/mariadb.log" && chown mysql:mysql "$LOG/mariadb.log"
    setsid mariadbd --no-defaults --datadir="$DB" --user=mysql --bind-address=127.0.0.1 --port="$DB_PORT" \
        --socket="$MYSOCK" --pid-file="$RUN/mysql/mariadbd.pid" --log-error="$LOG/mariadb.log" \
        </dev/null 9>&- >>"$LOG/mariadb.out" 2>&1 &
    local mpid=$!
    wait_until 30 eval 'db_ok || gone '"$mpid"
    db_ok || die "mariadbd does not answer on $MYSOCK" "$LOG/mariadb.out" "$LOG/mariadb.log"
    sql "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
         ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || die "cannot create the slurm database user"
    say "mariadb: started (127.0.0.1:$DB_PORT)"
}

register_cluster() {  # idempotent; fails until slurmdbd listens
    local have
    have="$(timeout 5 sacctmgr -n -P show cluster "$CLUSTER" format=cluster 2>/dev/null)" || return 1
    [ "$have" = "$CLUSTER" ] && return 0
    timeout 5 sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || return 1
}

start_dbd() {
    if pid_alive "$RUN/slurmdbd.pid" slurmdbd; then
        say "slurmdbd: running"
    else
        slurmdbd </dev/null 9>&- >>"$LOG/slurmdbd.out" 2>&1 || die "slurmdbd did not start" "$LOG/slurmdbd.out" "$LOG/slurmdbd.log"
        say "slurmdbd: started (port $DBD_PORT)"
    fi
    wait_until 30 register_cluster || die "cannot register cluster '$CLUSTER' with sacctmgr" "$LOG/slurmdbd.log"
}

start_slurm() {
    local n
    if pid_alive "$RUN/slurmctld.pid" slurmctld; then
        say "slurmctld: running"
    else
        # No -c: queued jobs and job ids survive down/up, as on a real cluster.
        slurmctld </dev/null 9>&- >>"$LOG/slurmctld.out" 2>&1 || die "slurmctld did not start" "$LOG/slurmctld.out" "$LOG/slurmctld.log"
        say "slurmctld: started (port $CTLD_PORT)"
    fi
    wait_until 30 eval 'ctld_ok || died "$RUN/slurmctld.pid" slurmctld'
    ctld_ok || die "slurmctld does not answer" "$LOG/slurmctld.log"
    for n in "${NODES[@]}"; do
        if pid_alive "$RUN/slurmd-$n.pid" slurmd; then say "slurmd $n: running"; continue; fi
        slurmd -N "$n" </dev/null 9>&- >>"$LOG/slurmd-$n.out" 2>&1 || die "slurmd $n did not start" "$LOG/slurmd-$n.out" "$LOG/slurmd-$n.log"
        say "slurmd $n: started"
    done
}

wait_ready() {
    local end=$((SECONDS + 45)) resumed=0 n
    until nodes_ok; do
        [ "$SECONDS" -lt "$end" ] || die "nodes not ready: $(node_states | tr '\n' ' ')" "$LOG/slurmctld.log" "$LOG/slurmd-a1.log"
        # A node left DOWN/DRAIN by an earlier run (e.g. killed slurmd) is healthy again once registered.
        if [ "$resumed" = 0 ] && node_states | grep -Eq 'drain|down|fail' && [ "$SECONDS" -ge $((end - 40)) ]; then
            for n in "${NODES[@]}"; do timeout 5 scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true; done
            resumed=1
        fi
        sleep 0.2
    done
    wait_until 20 sacct_ok || die "sacct does not answer" "$LOG/slurmdbd.log" "$LOG/slurmctld.log"
}

cmd_up() {
    local t0; t0="$(now)"
    preflight
    mkdir -p "$DIR"
    lock
    write_config
    if [ "$CONFIG_CHANGED" = 0 ] && cluster_ok; then
        say "already up ($(since "$t0")s); SLURM_CONF=$SLURM_CONF"
        return
    fi
    if [ "$CONFIG_CHANGED" = 1 ] && pid_alive "$RUN/slurmctld.pid" slurmctld; then
        say "WARNING: the config changed while the cluster runs; 'down' then 'up' to apply it"
    fi
    start_munge
    start_db
    start_dbd
    start_slurm
    wait_ready
    say "up in $(since "$t0")s: nodes $(node_states | tr '\n' ' ')| partition debug | SLURM_CONF=$SLURM_CONF"
}

# ---- down ---------------------------------------------------------------------------------------
stop_wave() {  # stop_wave "PIDFILE COMM LABEL"...: TERM all at once (each takes ~2 s), wait 20 s, then KILL
    local row pf comm label pids=() labels=() t0 p; t0="$(now)"
    for row in "$@"; do
        read -r pf comm label <<<"$row"
        if pid_alive "$pf" "$comm"; then
            pids+=("$(cat "$pf")") labels+=("$label")
            kill -TERM "${pids[-1]}" 2>/dev/null || true
        fi
        rm -f "$pf"
    done
    [ ${#pids[@]} -gt 0 ] || return 0
    for p in "${pids[@]}"; do
        wait_until 20 eval '! kill -0 '"$p"' 2>/dev/null' || { say "pid $p ignores TERM; killing"; kill -KILL "$p" 2>/dev/null || true; }
    done
    say "stopped ${labels[*]} ($(since "$t0")s)"
}

jobs_gone() { [ -z "$(timeout 5 squeue -h -o %A 2>/dev/null)" ]; }

cmd_down() {
    local t0; t0="$(now)"
    [ "$(id -u)" = 0 ] || unsupported "needs root to stop root's daemons"
    [ -d "$DIR" ] || { say "nothing to stop ($DIR does not exist)"; return; }
    lock
    # Jobs die with their nodes; cancel them so no slurmstepd outlives its slurmd.
    if pid_alive "$RUN/slurmctld.pid" slurmctld && ! jobs_gone; then
        timeout 10 scancel --partition=debug >/dev/null 2>&1 || true
        wait_until 15 jobs_gone || say "some jobs did not finish; stopping anyway"
    fi
    # Waves in dependency order: nodes and controller, then accounting, then its database and munge.
    stop_wave "$RUN/slurmd-a1.pid slurmd slurmd-a1" "$RUN/slurmd-a2.pid slurmd slurmd-a2" \
              "$RUN/slurmd-a3.pid slurmd slurmd-a3" "$RUN/slurmctld.pid slurmctld slurmctld"
    stop_wave "$RUN/slurmdbd.pid slurmdbd slurmdbd"
    stop_wave "$RUN/mysql/mariadbd.pid mariadbd mariadb" "$DIR/munge/munged.pid munged munge"
    say "down in $(since "$t0")s (state kept in $DIR; remove it for a clean cluster)"
}

# ---- status -------------------------------------------------------------------------------------
cmd_status() {
    local row pf comm label
    for row in "$DIR/munge/munged.pid munged munge" "$RUN/mysql/mariadbd.pid mariadbd mariadb" \
               "$RUN/slurmdbd.pid slurmdbd slurmdbd" "$RUN/slurmctld.pid slurmctld slurmctld" \
               "$RUN/slurmd-a1.pid slurmd slurmd-a1" "$RUN/slurmd-a2.pid slurmd slurmd-a2" \
               "$RUN/slurmd-a3.pid slurmd slurmd-a3"; do
        read -r pf comm label <<<"$row"
        if { [ -d "${pf%/*}" ] && [ ! -x "${pf%/*}" ]; } || { [ -e "$pf" ] && [ ! -r "$pf" ]; }; then printf '  %-10s unknown (cannot read %s)\n' "$label" "$pf"
        elif pid_alive "$pf" "$comm"; then printf '  %-10s running (pid %s)\n' "$label" "$(cat "$pf")"
        else printf '  %-10s stopped\n' "$label"; fi
    done
    if ! munge_ok; then say "not usable: munge does not answer"; return 1; fi
    if ! ctld_ok; then say "not usable: slurmctld does not answer (SLURM_CONF=$SLURM_CONF)"; return 1; fi
    node_states | sed 's/^/  node /'
    if ! nodes_ok; then say "not usable: nodes ${NODES[*]} are not all up"; return 1; fi
    if ! sacct_ok; then say "not usable: sacct does not answer (slurmdbd)"; return 1; fi
    say "usable: partition debug, nodes ${NODES[*]}, accounting on; SLURM_CONF=$SLURM_CONF"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status   (state in \$SLURM_LOCAL_DIR, default /var/tmp/clusterctl-slurm)" >&2; exit 2 ;;
esac
