#!/usr/bin/env bash
# Fetches the real datasets the scenarios use, from package registries only, into
# ${DITTO_DATA:-$HOME/.cache/ditto-bench}, and checks their sha256 digests against
# bench/datasets.sha256 (digests of new entries are recorded there on first fetch).
#
#   src-v1.tar, src-v2.tar   two consecutive npm releases of TypeScript (5.4.4, 5.4.5), un-gzipped
#   db-v1.sql, db-v2.sql     pg_dump (plain) of a pgbench database before/after a batch of
#                            transactions on a throw-away PostgreSQL cluster (generated here:
#                            contains timestamps, so it is not digest-checked)
#   compressed.whl           an already-compressed archive (numpy 1.26.4 wheel, from PyPI)
#   smallfiles/              a tree of many small files (lodash 4.17.21 unpacked, from npm)
#   smallfiles.tar           the same tree as one tar
#
# Needs: npm, pip, gzip, tar, sha256sum; for the database pair: Debian's postgresql package.
# Usage: datasets.sh [--no-db]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
manifest="$here/../datasets.sha256"
data="${DITTO_DATA:-$HOME/.cache/ditto-bench}"
with_db=1
[[ "${1:-}" == "--no-db" ]] && with_db=0

mkdir -p "$data"
touch "$manifest"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

log() { echo "datasets: $*" >&2; }

# check NAME: verify "$data/NAME" against the manifest, or record it.
check() {
    local name="$1" sum
    sum="$(sha256sum "$data/$name" | cut -d' ' -f1)"
    local want
    want="$(awk -v n="$name" '$2 == n { print $1 }' "$manifest")"
    if [[ -z "$want" ]]; then
        echo "$sum  $name" >>"$manifest"
        log "recorded digest of $name: $sum"
    elif [[ "$want" != "$sum" ]]; then
        log "DIGEST MISMATCH for $name: expected $want, got $sum"
        return 1
    else
        log "ok $name"
    fi
}

npm_tar() { # npm_tar SPEC OUTNAME: npm pack SPEC, gunzip into OUTNAME
    local spec="$1" out="$2"
    if [[ ! -s "$data/$out" ]]; then
        log "fetching $spec from npm"
        (cd "$work" && npm pack --silent "$spec" >/dev/null)
        local tgz
        tgz="$(ls -t "$work"/*.tgz | head -1)"
        gzip -dc "$tgz" >"$data/$out.part"
        mv "$data/$out.part" "$data/$out"
        rm -f "$tgz"
    fi
    check "$out"
}

npm_tar typescript@5.4.4 src-v1.tar
npm_tar typescript@5.4.5 src-v2.tar
npm_tar lodash@4.17.21 smallfiles.tar
if [[ ! -d "$data/smallfiles" ]]; then
    mkdir -p "$data/smallfiles.part"
    tar -xf "$data/smallfiles.tar" -C "$data/smallfiles.part"
    mv "$data/smallfiles.part" "$data/smallfiles"
fi

if [[ ! -s "$data/compressed.whl" ]]; then
    log "fetching numpy 1.26.4 wheel from PyPI"
    pip download --quiet --no-deps --only-binary :all: --platform manylinux2014_x86_64 \
        --python-version 3.11 "numpy==1.26.4" -d "$work/whl"
    mv "$work"/whl/numpy-1.26.4-*.whl "$data/compressed.whl"
fi
check compressed.whl

if [[ "$with_db" == 1 && ( ! -s "$data/db-v1.sql" || ! -s "$data/db-v2.sql" ) ]]; then
    pgbin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
    if [[ -z "$pgbin" ]]; then
        log "postgresql is not installed (apt-get install -y postgresql); skipping the database pair"
    else
        log "building the database pair with $pgbin"
        pg="$work/pg"
        chmod 755 "$work"
        mkdir -p "$pg/data" "$pg/sock"
        chown -R postgres:postgres "$pg"
        as_pg() { runuser -u postgres -- "$@"; }
        as_pg "$pgbin/initdb" -D "$pg/data" -A trust -U postgres >/dev/null
        as_pg "$pgbin/pg_ctl" -D "$pg/data" -o "-k $pg/sock -c listen_addresses='' -p 54329" -w -l "$pg/log" start >/dev/null
        stop_pg() { as_pg "$pgbin/pg_ctl" -D "$pg/data" -m fast -w stop >/dev/null 2>&1 || true; }
        trap 'stop_pg; rm -rf "$work"' EXIT
        pgopts=(-h "$pg/sock" -p 54329 -U postgres)
        as_pg "$pgbin/createdb" "${pgopts[@]}" bench
        as_pg "$pgbin/pgbench" "${pgopts[@]}" -q -i -s "${DITTO_DB_SCALE:-5}" bench >/dev/null 2>&1
        as_pg "$pgbin/pg_dump" "${pgopts[@]}" bench >"$data/db-v1.sql.part"
        as_pg "$pgbin/pgbench" "${pgopts[@]}" -n -c 1 -t "${DITTO_DB_TX:-5000}" --random-seed=7 bench >/dev/null 2>&1
        as_pg "$pgbin/pg_dump" "${pgopts[@]}" bench >"$data/db-v2.sql.part"
        stop_pg
        mv "$data/db-v1.sql.part" "$data/db-v1.sql"
        mv "$data/db-v2.sql.part" "$data/db-v2.sql"
    fi
fi

log "datasets in $data:"
ls -la "$data" >&2
