#!/usr/bin/env python3
"""Results of bench/compare.sh: records each run, then summarises a results folder.

  compare.py summarize DIR [--elapsed S]   medians (min-max), ratios ours/peer, machine line;
                                           writes DIR/summary.txt and DIR/summary.md, prints both
  compare.py record DIR CONFIG ROUND RC SECS < stdout-of-the-run
  compare.py mark DIR CONFIG ROUND STATUS [NOTE]
  compare.py pgbench DIR RC SECS < stdout-of-run_pgbench.sh
  compare.py machine DIR --peers-url URL --our-url URL --repo PATH ...

Files in DIR: <config>.jsonl (the raw JSON line of every good run), runs.jsonl
({"round", "config", "secs", "result"}), status.jsonl (every attempt: ok, failed,
timeout, not-available), machine.json. Standard library only.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
from collections import defaultdict

# ---------------------------------------------------------------- recording


def append(path: str, obj: dict | str) -> None:
    with open(path, "a") as f:
        f.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")


def load1() -> float | None:
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def status(out: str, config: str, rnd: int, state: str, **extra) -> None:
    append(os.path.join(out, "status.jsonl"),
           {"config": config, "round": rnd, "status": state, "load1": load1(), **extra})


def headline(res: dict) -> str:
    """A few figures of one result, for the progress log."""
    keys = ["tasks_per_s", "process_jobs_per_s", "bulk_enqueue_jobs_per_s", "batch_tasks_per_s",
            "single_tasks_per_s", "p50_ms", "p99_ms"]
    parts = [f"{k}={res[k]}" for k in keys if k in res]
    lat = res.get("enqueue_call_to_start_ms")
    if isinstance(lat, dict):
        parts.append(f"p50={lat.get('p50')} p99={lat.get('p99')} ms, received {res.get('received')}/{res.get('samples')}")
    return ", ".join(parts) or "(no known figure)"


def cmd_record(a: argparse.Namespace) -> int:
    lines = [l.strip() for l in sys.stdin.read().splitlines() if l.strip()]
    last = lines[-1] if lines else ""
    res = None
    try:
        res = json.loads(last)
    except ValueError:
        pass
    err_path = os.path.join(a.dir, "logs", f"{a.config}.r{a.round}.err")
    if a.rc == 0 and isinstance(res, dict):
        append(os.path.join(a.dir, f"{a.config}.jsonl"), last)
        append(os.path.join(a.dir, "runs.jsonl"), {"round": a.round, "config": a.config, "secs": a.secs, "result": res})
        status(a.dir, a.config, a.round, "ok", secs=a.secs)
        print(f"    ok in {a.secs} s: {headline(res)}", file=sys.stderr)
        return 0
    err = ""
    try:
        err = open(err_path, errors="replace").read()
    except OSError:
        pass
    if a.rc == 2 and "unrecognized subcommand" in err:
        state, why = "not-available", "scenario not in this binary"
    elif a.rc == 124:
        state, why = "timeout", f"killed by timeout after {a.secs} s"
    else:
        state = "failed"
        why = f"exit {a.rc}" + ("" if isinstance(res, dict) else ", no JSON line last on stdout")
    tail = " | ".join(l for l in err.strip().splitlines()[-3:])
    status(a.dir, a.config, a.round, state, rc=a.rc, secs=a.secs, why=why, stderr_tail=tail[-500:])
    print(f"!!! {a.config} round {a.round}: {state} ({why}); see {err_path}", file=sys.stderr)
    if tail:
        print(f"    {tail[-300:]}", file=sys.stderr)
    return 0


def cmd_mark(a: argparse.Namespace) -> int:
    status(a.dir, a.config, a.round, a.status, why=a.note)
    return 0


def cmd_pgbench(a: argparse.Namespace) -> int:
    n = 0
    for line in sys.stdin:
        f = line.strip().split(",")
        if len(f) != 6 or not f[2].isdigit():
            continue
        script, sync, clients, run, tps, lat = f
        rec = {"scenario": "pgbench", "script": script, "sync": sync, "clients": int(clients), "run": int(run),
               "duration_s": a.secs, "tps": float(tps) if tps else None, "lat_ms_avg": float(lat) if lat else None}
        append(os.path.join(a.dir, "pgbench.jsonl"), rec)
        n += 1
    state = "ok" if a.rc == 0 and n else "failed"
    status(a.dir, "pgbench", 1, state, rc=a.rc, rows=n)
    if state != "ok":
        print(f"!!! pgbench: exit {a.rc}, {n} rows; see {a.dir}/logs/pgbench.err", file=sys.stderr)
    return 0


def sh(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cmd_machine(a: argparse.Namespace) -> int:
    mem_kb = 0
    cpu = ""
    try:
        mem_kb = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1])
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    except (OSError, StopIteration, ValueError):
        pass
    q = "select current_setting('server_version'), current_setting('synchronous_commit'), " \
        "current_setting('fsync'), current_setting('shared_buffers'), current_setting('max_connections')"
    pg = sh("psql", a.peers_url, "-AtF", "\t", "-c", q).split("\t")
    pg += [""] * (5 - len(pg))
    others = sh("psql", a.peers_url, "-AtF", "\t", "-c",
                "select count(*), coalesce(string_agg(distinct datname, ','), '') from pg_stat_activity "
                "where backend_type = 'client backend' and pid <> pg_backend_pid()").split("\t")
    sha = sh("git", "-C", a.repo, "rev-parse", "--short", "HEAD")
    # Dirty: uncommitted changes to what the binary is built from.
    dirty = sh("git", "-C", a.repo, "status", "--porcelain", "--", "src", "proto", "migrations",
               "build.rs", "Cargo.toml", "Cargo.lock")
    m = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": cpu, "mem_gib": round(mem_kb / 1048576, 1), "kernel": platform.release(),
        "postgres": pg[0], "synchronous_commit": pg[1], "fsync": pg[2], "shared_buffers": pg[3],
        "max_connections": pg[4],
        "load1_at_start": load1(),
        "other_pg_clients_at_start": int(others[0]) if others[0].isdigit() else None,
        "other_pg_databases_at_start": others[1] if len(others) > 1 else "",
        "leasehold": (sha + ("+dirty" if dirty else "")) or "?",
        "peers_database": redact(a.peers_url), "our_database": redact(a.our_url), "peers_work": a.peers_work,
        "rounds": a.rounds, "jobs": a.jobs, "quick": bool(a.quick),
    }
    with open(os.path.join(a.dir, "machine.json"), "w") as f:
        json.dump(m, f, indent=1)
    print(machine_line(m))
    if m["other_pg_clients_at_start"]:
        print(f"WARNING: {m['other_pg_clients_at_start']} other clients are connected to this Postgres "
              f"(databases: {m['other_pg_databases_at_start'] or '?'}): the figures will be noisy")
    return 0


def redact(url: str) -> str:
    """Drops a password from a postgres URL."""
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}@{host}"
    return url


def machine_line(m: dict) -> str:
    return (f"machine: {m.get('nproc')} CPUs ({m.get('cpu') or '?'}), {m.get('mem_gib')} GiB RAM, "
            f"PostgreSQL {m.get('postgres') or '?'} (synchronous_commit={m.get('synchronous_commit') or '?'}, "
            f"fsync={m.get('fsync') or '?'}, shared_buffers={m.get('shared_buffers') or '?'}), "
            f"{m.get('date')}, leasehold {m.get('leasehold')}")

# ---------------------------------------------------------------- summary


def load(path: str) -> list[dict]:
    try:
        return [json.loads(l) for l in open(path) if l.strip()]
    except OSError:
        return []


def dig(res: dict, path: str):
    cur = res
    for p in path.split("."):
        if not isinstance(cur, dict) or p not in cur:
            return None
        cur = cur[p]
    return cur if isinstance(cur, (int, float)) and not isinstance(cur, bool) else None


def rate(x: float) -> str:
    if x >= 10000:
        return f"{x / 1000:.0f}k"
    if x >= 1000:
        return f"{x / 1000:.1f}k"
    return f"{x:.0f}"


def ms(x: float) -> str:
    return f"{x:.2f}"


def cell(vals: list[float], f) -> str:
    if not vals:
        return ""
    med = statistics.median(vals)
    if len(vals) == 1:
        return f(med)
    return f"{f(med)} ({f(min(vals))}-{f(max(vals))})"


class Results:
    def __init__(self, d: str):
        self.dir = d
        self.machine = {}
        try:
            self.machine = json.load(open(os.path.join(d, "machine.json")))
        except (OSError, ValueError):
            pass
        self.runs: dict[str, list[tuple[int, dict]]] = defaultdict(list)
        for r in load(os.path.join(d, "runs.jsonl")):
            self.runs[r["config"]].append((r["round"], r["result"]))
        self.status: dict[str, list[dict]] = defaultdict(list)
        for s in load(os.path.join(d, "status.jsonl")):
            self.status[s["config"]].append(s)
        self.pgbench = load(os.path.join(d, "pgbench.jsonl"))

    def find(self, prefix: str) -> str:
        """The config named prefix, or the first one starting with prefix_ (the job count suffix)."""
        if prefix in self.runs or prefix in self.status:
            return prefix
        for name in sorted(set(self.runs) | set(self.status)):
            if name.startswith(prefix + "_"):
                return name
        return prefix

    def values(self, config: str, path: str) -> dict[int, float]:
        """round -> value; a round with several runs keeps the last."""
        out = {}
        for rnd, res in self.runs.get(config, []):
            v = dig(res, path)
            if v is not None:
                out[rnd] = float(v)
        return out

    def why_missing(self, config: str) -> str:
        st = self.status.get(config, [])
        if not st:
            return "-"
        if any(s["status"] == "not-available" for s in st):
            return "not available"
        bad = [s for s in st if s["status"] != "ok"]
        if bad:
            return f"{bad[-1]['status']} ({len(bad)}/{len(st)})"
        return "-"

    def fmt(self, config: str, path: str, f) -> str:
        vals = list(self.values(config, path).values())
        if not vals:
            return self.why_missing(config)
        text = cell(vals, f)
        bad = [s for s in self.status.get(config, []) if s["status"] != "ok"]
        if bad:
            text += f" [{len(bad)} failed]"
        return text


# What the summary compares. Each row: label, then per column (config prefix, JSON path) or None.
def rows(R: Results) -> list[tuple[str, dict]]:
    gw_tp, pb_tp = R.find("gw_tp_batched"), R.find("pb_tp_b50_l10")
    return [
        ("Leasehold (gRPC, 1 worker process)", {
            "drain": ("our_drain", "tasks_per_s"), "bulk": ("our_enqueue", "batch_tasks_per_s"),
            "single": ("our_enqueue", "single_tasks_per_s"),
            "p50": ("our_latency", "p50_ms"), "p99": ("our_latency", "p99_ms")}),
        ("Leasehold sql-only (no gRPC)", {"drain": ("our_sql_only", "tasks_per_s")}),
        ("Graphile Worker batched", {
            "drain": (gw_tp, "process_jobs_per_s"), "bulk": (gw_tp, "bulk_enqueue_jobs_per_s"),
            "p50": ("gw_lat_batched", "enqueue_call_to_start_ms.p50"),
            "p99": ("gw_lat_batched", "enqueue_call_to_start_ms.p99")}),
        ("Graphile Worker default", {
            "p50": ("gw_lat_default", "enqueue_call_to_start_ms.p50"),
            "p99": ("gw_lat_default", "enqueue_call_to_start_ms.p99")}),
        ("pg-boss b50 x l10 (latency: notify)", {
            "drain": (pb_tp, "process_jobs_per_s"), "bulk": (pb_tp, "bulk_enqueue_jobs_per_s"),
            "p50": ("pb_lat_notify", "enqueue_call_to_start_ms.p50"),
            "p99": ("pb_lat_notify", "enqueue_call_to_start_ms.p99")}),
        ("PGQueuer", {
            "p50": ("pq_lat", "enqueue_call_to_start_ms.p50"),
            "p99": ("pq_lat", "enqueue_call_to_start_ms.p99")}),
    ]


PEER_LAT = {"gw_lat_default": "Graphile default", "gw_lat_batched": "Graphile batched",
            "pb_lat_notify": "pg-boss notify", "pq_lat": "PGQueuer"}


def lost(R: Results, config: str) -> int:
    return sum(max(0, (res.get("samples") or 0) - (res.get("received") or 0)) for _, res in R.runs.get(config, []))


def ratio(R: Results, ours: tuple[str, str], peer: tuple[str, str]) -> tuple[str, str]:
    """(ratio of the medians, per-round ratios median (min-max))."""
    a, b = R.values(*ours), R.values(*peer)
    if not a:
        why = R.why_missing(ours[0])
        return ("skipped" if why == "-" else why), ""
    if not b:
        why = R.why_missing(peer[0])
        return "peer " + ("skipped" if why == "-" else why), ""
    rm = statistics.median(a.values()) / statistics.median(b.values())
    per = [a[r] / b[r] for r in sorted(set(a) & set(b)) if b[r]]
    return f"{rm:.2f}", (cell(per, lambda x: f"{x:.2f}") + f" n={len(per)}") if per else ""


def best(R: Results, candidates: list[tuple[str, str, str]], lowest: bool) -> tuple[str, str, str] | None:
    have = [(statistics.median(R.values(c, p).values()), c, p, name) for c, p, name in candidates if R.values(c, p)]
    if not have:
        return None
    _, c, p, name = (min if lowest else max)(have)
    return c, p, name


def summarize(d: str, elapsed: int | None) -> tuple[str, str]:
    R = Results(d)
    m = R.machine
    jobs = m.get("jobs")
    drain_h = f"drain {rate(jobs)} (tasks/s)" if jobs else "drain (tasks/s)"
    cols = [("drain", drain_h, rate), ("bulk", "bulk enqueue (tasks/s)", rate),
            ("single", "single enqueue (tasks/s)", rate), ("p50", "latency p50 (ms)", ms), ("p99", "latency p99 (ms)", ms)]
    table = []
    for label, spec in rows(R):
        row = [label]
        for key, _, f in cols:
            if key not in spec:
                row.append("")
                continue
            cfg, path = spec[key]
            text = R.fmt(cfg, path, f)
            if key == "p99" and lost(R, cfg):
                text += f" [{lost(R, cfg)} lost]"
            row.append(text)
        table.append(row)
    header = ["config"] + [h for _, h, _ in cols]

    # Ratios ours / peer.
    gw_tp, pb_tp = R.find("gw_tp_batched"), R.find("pb_tp_b50_l10")
    rat = []
    rat.append(("drain: Leasehold / Graphile batched (>1: ours faster)",
                *ratio(R, ("our_drain", "tasks_per_s"), (gw_tp, "process_jobs_per_s"))))
    rat.append(("drain: Leasehold / pg-boss b50 x l10 (>1: ours faster)",
                *ratio(R, ("our_drain", "tasks_per_s"), (pb_tp, "process_jobs_per_s"))))
    if R.values("our_sql_only", "tasks_per_s"):
        rat.append(("drain: Leasehold sql-only / Graphile batched",
                    *ratio(R, ("our_sql_only", "tasks_per_s"), (gw_tp, "process_jobs_per_s"))))
    for p in ("p50", "p99"):
        b = best(R, [(c, f"enqueue_call_to_start_ms.{p}", n) for c, n in PEER_LAT.items()], lowest=True)
        if b:
            rat.append((f"latency {p}: Leasehold / best peer ({b[2]}) (<1: ours lower)",
                        *ratio(R, ("our_latency", f"{p}_ms"), (b[0], b[1]))))
        else:
            tried = any(c in R.status for c in PEER_LAT)
            rat.append((f"latency {p}: Leasehold / best peer", "no peer data" if tried else "skipped", ""))
    b = best(R, [(gw_tp, "bulk_enqueue_jobs_per_s", "Graphile addJobs"),
                 (pb_tp, "bulk_enqueue_jobs_per_s", "pg-boss insert")], lowest=False)
    if b:
        rat.append((f"enqueue: Leasehold batch / best peer bulk add ({b[2]}) (>1: ours faster)",
                    *ratio(R, ("our_enqueue", "batch_tasks_per_s"), (b[0], b[1]))))
    else:
        tried = gw_tp in R.status or pb_tp in R.status
        rat.append(("enqueue: Leasehold batch / best peer bulk add", "no peer data" if tried else "skipped", ""))
    rat_header = ["ours / peer", "ratio of medians", "per-round ratios"]

    # pgbench
    pgb = defaultdict(list)
    for r in R.pgbench:
        if r.get("tps") is not None:
            pgb[(r["script"], r["sync"], r.get("duration_s"))].append(r)
    pg_lines = []
    for (script, sync, secs), rs in sorted(pgb.items()):
        by = defaultdict(list)
        for r in rs:
            by[r["clients"]].append(r["tps"])
        parts = ", ".join(f"{c} client{'s' if c > 1 else ''} {cell(v, rate)} tps" for c, v in sorted(by.items()))
        pg_lines.append(f"pgbench (Postgres write ceiling, one small {script.upper()} per transaction, "
                        f"synchronous_commit={sync}, {secs} s per run): {parts}")
    if not pg_lines and "pgbench" in R.status:
        pg_lines.append("pgbench: " + R.why_missing("pgbench"))

    nrounds = m.get("rounds", "?")
    runinfo = (f"{nrounds} round(s), {jobs} jobs per drain/bulk-enqueue run, latency 200 tasks at 20/s; "
               f"median (min-max) over the rounds" + (f"; run took {elapsed // 60} min {elapsed % 60} s" if elapsed else ""))
    loads = [s["load1"] for ss in R.status.values() for s in ss if s.get("load1") is not None and s["status"] == "ok"]
    hostinfo = ""
    if loads:
        hostinfo = (f"host load (1-min average after each run): median {statistics.median(loads):.1f}, "
                    f"max {max(loads):.1f} on {m.get('nproc', '?')} CPUs")
        if m.get("other_pg_clients_at_start"):
            hostinfo += (f"; {m['other_pg_clients_at_start']} other Postgres clients at start "
                         f"({m.get('other_pg_databases_at_start') or '?'})")
        if isinstance(m.get("nproc"), int) and statistics.median(loads) > 0.75 * m["nproc"]:
            hostinfo += ". WARNING: the host was busy, these figures are noisy"
    failed = [(c, s) for c, ss in sorted(R.status.items()) for s in ss if s["status"] not in ("ok", "not-available")]
    missing = sorted({c for c, ss in R.status.items() if any(s["status"] == "not-available" for s in ss)})

    def text_table(hdr, body):
        w = [max(len(str(r[i])) for r in [hdr] + body) for i in range(len(hdr))]
        out = ["  ".join(str(c).ljust(w[i]) for i, c in enumerate(hdr)).rstrip(),
               "  ".join("-" * x for x in w)]
        out += ["  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in body]
        return "\n".join(out)

    def md_table(hdr, body):
        esc = lambda s: str(s).replace("|", "\\|") or " "  # noqa: E731
        out = ["| " + " | ".join(map(esc, hdr)) + " |", "|" + "---|" * len(hdr)]
        out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in body]
        return "\n".join(out)

    notes = []
    hist = sorted((r, res["preexisting_finished_rows"]) for r, res in R.runs.get("our_drain", [])
                  if isinstance(res.get("preexisting_finished_rows"), (int, float)))
    if hist:
        notes.append("Leasehold drain: finished tasks already in the history at start: "
                     + ", ".join(f"round {r} {rate(float(n))}" for r, n in hist))
    if missing:
        notes.append("not available in this binary: " + ", ".join(missing))
    for c, s in failed:
        notes.append(f"{c} round {s['round']}: {s['status']} ({s.get('why', '')})")

    txt = [machine_line(m), runinfo] + ([hostinfo] if hostinfo else [])
    txt += ["", text_table(header, table), "", text_table(rat_header, rat)]
    txt += [""] + pg_lines if pg_lines else []
    txt += [""] + notes if notes else []
    md = [f"_{machine_line(m)}_", "", runinfo + "."] + (["", hostinfo + "."] if hostinfo else [])
    md += ["", md_table(header, table), "", md_table(rat_header, rat)]
    md += [""] + [f"- {l}" for l in pg_lines] if pg_lines else []
    md += [""] + [f"- {n}" for n in notes] if notes else []
    return "\n".join(txt) + "\n", "\n".join(md) + "\n"


def cmd_summarize(a: argparse.Namespace) -> int:
    if not os.path.isdir(a.dir):
        print(f"no folder {a.dir}", file=sys.stderr)
        return 2
    txt, md = summarize(a.dir, a.elapsed)
    open(os.path.join(a.dir, "summary.txt"), "w").write(txt)
    open(os.path.join(a.dir, "summary.md"), "w").write(md)
    print(txt)
    print("---- Markdown (also in " + os.path.join(a.dir, "summary.md") + ") ----\n")
    print(md)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summarize"); s.add_argument("dir"); s.add_argument("--elapsed", type=int)
    s.set_defaults(fn=cmd_summarize)
    s = sub.add_parser("record")
    for n, t in (("dir", str), ("config", str), ("round", int), ("rc", int), ("secs", int)):
        s.add_argument(n, type=t)
    s.set_defaults(fn=cmd_record)
    s = sub.add_parser("mark")
    for n, t in (("dir", str), ("config", str), ("round", int), ("status", str)):
        s.add_argument(n, type=t)
    s.add_argument("note", nargs="?", default="")
    s.set_defaults(fn=cmd_mark)
    s = sub.add_parser("pgbench")
    for n, t in (("dir", str), ("rc", int), ("secs", int)):
        s.add_argument(n, type=t)
    s.set_defaults(fn=cmd_pgbench)
    s = sub.add_parser("machine"); s.add_argument("dir")
    for n in ("--peers-url", "--our-url", "--repo", "--peers-work"):
        s.add_argument(n, required=True)
    s.add_argument("--rounds", type=int); s.add_argument("--jobs", type=int); s.add_argument("--quick", type=int)
    s.set_defaults(fn=cmd_machine)
    a = p.parse_args()
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
