#!/usr/bin/env python3
"""Load benchmark: imagegate and nginx, each in front of the same mock upstream, driven by oha.

Run it through bench/run.sh (which builds the release binary first); BENCHMARKS.md explains
the scenarios, the figures and the targets. Everything listens on 127.0.0.1 only, on ports
picked at run time; every load is bounded in count or duration, and each oha run also has a
hard wall-clock timeout. Standard library only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
MODEL = "gemini-3.1-flash-image"
UPSTREAM_KEY = "sk-bench-upstream-key"
LOOPBACK = "127.0.0.1"
# Distinct prompts per body file. oha -Z picks a line at random for each request, so repeats
# happen; with this many lines they are rare, and `Cache-Control: no-cache` makes a repeat a
# fresh generation anyway (see BENCHMARKS.md).
PROMPTS = 500_000
SUBJECTS = [
    "lighthouse", "coffee shop", "fox", "mountain lake", "city street", "robot", "garden",
    "library", "harbour", "desert", "forest cabin", "train station", "bakery", "castle",
    "market", "observatory", "bridge", "greenhouse", "workshop", "beach",
]
STYLES = [
    "at dusk", "in watercolour", "as a pencil sketch", "in warm light", "in the rain",
    "from above", "in winter", "as a photograph", "in neon colours", "at dawn",
]

# --- processes -------------------------------------------------------------------------------

STARTED: list[subprocess.Popen] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    out = open(log, "wb")
    proc = subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})}, start_new_session=True,
    )
    out.close()
    STARTED.append(proc)
    return proc


def stop(proc: subprocess.Popen | None) -> None:
    """Stops one process this script started (by its pid), gently first."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def stop_all() -> None:
    for proc in reversed(STARTED):
        stop(proc)


def wait_http(url: str, what: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with code {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{what} did not become ready at {url} within {timeout}s")


def post(url: str) -> None:
    req = urllib.request.Request(url, data=b"{}", method="POST")
    with urllib.request.urlopen(req, timeout=10):
        pass


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


# --- /proc readings --------------------------------------------------------------------------

def proc_stat(pid: int) -> tuple[int, int]:
    """(ppid, utime + stime in clock ticks)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    rest = text[text.rindex(")") + 2:].split()
    return int(rest[1]), int(rest[11]) + int(rest[12])


def family(pid: int) -> list[int]:
    """`pid` and its direct children (nginx: master and workers)."""
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != pid:
            try:
                if proc_stat(int(entry.name))[0] == pid:
                    pids.append(int(entry.name))
            except (OSError, ValueError):
                pass
    return pids


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in family(pid):
        try:
            total += proc_stat(p)[1]
        except OSError:
            pass
    return total / CLK_TCK


def memory_kib(pid: int, field: str) -> int:
    """Sum of a /proc/PID/status field (VmRSS, VmHWM) over the process and its children."""
    total = 0
    for p in family(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def machine_busy(seconds: float = 3.0) -> dict:
    """CPU use of the whole machine over `seconds` (while this script's servers are idle),
    the load average, and any compilers running: the noise next to the figures."""
    def snap():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields), idle
    t0, i0 = snap()
    time.sleep(seconds)
    t1, i1 = snap()
    busy = 100.0 * (1 - (i1 - i0) / max(1, t1 - t0))
    compilers = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                comm = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if comm in ("rustc", "cc", "cc1", "ld", "cargo", "clang", "gcc", "c++", "cc1plus"):
                compilers.append(comm)
    return {
        "busy_pct": round(busy, 1),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "compilers": sorted(set(compilers)),
    }


def wait_quiet(max_wait: float, log) -> dict:
    """Waits (up to `max_wait` s) until other work on the machine is below 15 % of its CPU
    and no compiler runs; returns the last reading either way."""
    deadline = time.monotonic() + max_wait
    while True:
        reading = machine_busy()
        if reading["busy_pct"] < 15 and not reading["compilers"]:
            return reading
        if time.monotonic() >= deadline:
            reading["waited_out"] = True
            return reading
        log(f"    machine busy ({reading}); waiting for a quiet window")
        time.sleep(min(30, max(1, deadline - time.monotonic())))


# --- bodies ----------------------------------------------------------------------------------

def body(prompt: str, size: str, fmt: str) -> str:
    return json.dumps({
        "model": MODEL, "prompt": prompt, "size": size, "n": 1, "response_format": fmt,
    }, separators=(",", ":"))


def write_bodies(path: Path, count: int, size: str, fmt: str, prefix: str = "") -> None:
    rng = random.Random(8)
    with open(path, "w") as f:
        for i in range(count):
            prompt = f"{prefix}{rng.choice(SUBJECTS)} {rng.choice(STYLES)}, study #{i}"
            f.write(body(prompt, size, fmt) + "\n")


# --- oha -------------------------------------------------------------------------------------

def run_oha(oha: str, url: str, key: str, load: list[str], body_args: list[str],
            headers: list[str], out: Path, wall_timeout: float) -> dict:
    cmd = [
        oha, "--no-tui", "--output-format", "json", "-o", str(out), "-m", "POST",
        "-T", "application/json", "-H", f"Authorization: Bearer {key}", "-t", "60s",
        *sum((["-H", h] for h in headers), []), *body_args, *load, url,
    ]
    try:
        subprocess.run(cmd, check=True, timeout=wall_timeout, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"oha did not finish within {wall_timeout}s: {' '.join(cmd)}")
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"oha failed ({e.returncode}): {e.stderr.decode(errors='replace')}")
    return json.loads(out.read_text())


def summarise(raw: dict) -> dict:
    codes = {int(k): v for k, v in (raw.get("statusCodeDistribution") or {}).items()}
    errors = sum((raw.get("errorDistribution") or {}).values())
    ok = sum(v for k, v in codes.items() if 200 <= k < 300)
    bad = sum(v for k, v in codes.items() if not 200 <= k < 300)
    pct = raw.get("latencyPercentiles") or {}
    summary = raw.get("summary") or {}
    return {
        "requests_per_sec": summary.get("requestsPerSec") or 0.0,
        "total_secs": summary.get("total") or 0.0,
        "ok": ok,
        "errors": errors + bad,
        "status_codes": codes,
        "error_kinds": raw.get("errorDistribution") or {},
        "p50_ms": (pct.get("p50") or 0.0) * 1000,
        "p99_ms": (pct.get("p99") or 0.0) * 1000,
    }


# --- targets ---------------------------------------------------------------------------------

class Target:
    """Something oha can be pointed at. `pid` is the process whose CPU and memory count."""
    name = ""
    url = ""
    key = UPSTREAM_KEY
    proc: subprocess.Popen | None = None

    def start(self, upstream: str, tag: str) -> None: ...

    def stop(self) -> None:
        stop(self.proc)
        self.proc = None


class Direct(Target):
    name = "mock (direct)"

    def __init__(self, mocks: dict):
        self.mocks = mocks

    def start(self, upstream: str, tag: str) -> None:
        self.url = f"http://{upstream}/v1/images/generations"
        self.proc = None
        self.pid = self.mocks[upstream].pid

    def stop(self) -> None:
        pass


class Nginx(Target):
    name = "nginx"

    def __init__(self, binary: str, workdir: Path, template: Path):
        self.binary, self.workdir, self.template = binary, workdir, template

    def start(self, upstream: str, tag: str) -> None:
        d = self.workdir / f"nginx-{tag}"
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)
        port = free_port()
        user = "user root;" if os.geteuid() == 0 else ""
        conf = (self.template.read_text().replace("@DIR@", str(d)).replace("@USER@", user)
                .replace("@UPSTREAM@", upstream).replace("@LISTEN@", f"{LOOPBACK}:{port}"))
        (d / "nginx.conf").write_text(conf)
        self.proc = start([self.binary, "-p", str(d), "-c", str(d / "nginx.conf")],
                          d / "nginx-stdout.log")
        self.pid = self.proc.pid
        self.url = f"http://{LOOPBACK}:{port}/v1/images/generations"
        wait_http(f"http://{LOOPBACK}:{port}/__mock/stats", "nginx", self.proc)
        # Let the workers start before anything is read from /proc.
        time.sleep(0.5)


class Imagegate(Target):
    """imagegate with bench/imagegate.toml; `memory_ledger` swaps the durable SQLite ledger
    for the in-memory one, to show what the durable quota writes cost."""

    def __init__(self, binary: str, workdir: Path, config: Path, key: str, digest: str,
                 memory_ledger: bool = False):
        self.binary, self.workdir, self.config = binary, workdir, config
        self.key, self.digest = key, digest
        self.memory_ledger = memory_ledger
        self.name = "imagegate (memory ledger)" if memory_ledger else "imagegate"

    def start(self, upstream: str, tag: str) -> None:
        port, admin = free_port(), free_port()
        env = {
            "IMAGEGATE__SERVER__LISTEN": f"{LOOPBACK}:{port}",
            "IMAGEGATE__SERVER__ADMIN_LISTEN": f"{LOOPBACK}:{admin}",
            "IMAGEGATE__STORAGE__PATH": str(self.workdir / f"imagegate-{tag}" / "usage.db"),
            "IMAGEGATE__UPSTREAMS__0__BASE_URL": f"http://{upstream}/v1",
            "IMAGEGATE__CLIENTS__0__KEY_SHA256": self.digest,
            "IMAGEGATE_BENCH_UPSTREAM_KEY": UPSTREAM_KEY,
        }
        if self.memory_ledger:
            env["IMAGEGATE__STORAGE__BACKEND"] = "memory"
            tag += "-memory"
        self.proc = start([self.binary, "serve", "--config", str(self.config)],
                          self.workdir / f"imagegate-{tag}.log", env)
        self.pid = self.proc.pid
        self.url = f"http://{LOOPBACK}:{port}/v1/images/generations"
        self.admin = f"http://{LOOPBACK}:{admin}"
        wait_http(f"{self.admin}/readyz", "imagegate", self.proc)


# --- scenarios -------------------------------------------------------------------------------

def scenarios(quick: bool) -> list[dict]:
    """Each load is bounded: by count (-n) or by duration (-z), never neither."""
    q = 5 if quick else 1
    return [
        {
            "id": "saturation", "title": "Small url responses, 64 connections (saturation)",
            "mock": "url", "bodies": "url", "no_cache": True,
            "load": ["-c", "64", "-z", f"{10 // q}s", "-w"], "warmup": 200,
        },
        {
            "id": "fixed500", "title": "Small url responses at a fixed 500 req/s",
            "mock": "url", "bodies": "url", "no_cache": True,
            "load": ["-c", "64", "-q", "500", "--latency-correction", "-n", str(10_000 // q)],
            "warmup": 200,
        },
        {
            "id": "b64", "title": "~1.5 MB b64_json responses, 16 connections",
            "mock": "b64", "bodies": "b64", "no_cache": True,
            "load": ["-c", "16", "-n", str(1_500 // q)], "warmup": 16,
        },
        {
            "id": "slow", "title": "2 s upstream at 500 req/s (~1000 in flight)",
            "mock": "url", "bodies": "slow", "no_cache": True,
            "load": ["-c", "1200", "-q", "500", "--latency-correction", "-n", str(10_000 // q)],
            "warmup": 200,
        },
        {
            "id": "cache_hit", "title": "Cache hits (one body), 64 connections",
            "mock": "url", "bodies": "fixed", "no_cache": False,
            "load": ["-c", "64", "-z", f"{10 // q}s", "-w"], "warmup": 1,
            "targets": ["mock (direct)", "imagegate", "imagegate (memory ledger)"],
        },
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--imagegate", default="target/release/imagegate")
    ap.add_argument("--oha", default=shutil.which("oha") or "oha")
    ap.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    ap.add_argument("--out", default=None, help="work and results directory")
    ap.add_argument("--quick", action="store_true", help="5x shorter loads (smoke test)")
    ap.add_argument("--only", default="", help="comma-separated scenario ids")
    ap.add_argument("--quiet-wait", type=float, default=900,
                    help="longest wait for a quiet machine before each run, seconds")
    ap.add_argument("--publish", action="store_true",
                    help="write bench/results.md and the table in BENCHMARKS.md")
    args = ap.parse_args()

    repo = Path(__file__).resolve().parent.parent
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out or repo / "target" / "bench" / stamp).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "run.log", "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: (stop_all(), sys.exit(130)))
    try:
        return run(args, repo, out, log)
    finally:
        stop_all()


def run(args, repo: Path, out: Path, log) -> int:
    binary = str(Path(args.imagegate).resolve())
    log(f"results and logs in {out}")
    keygen = subprocess.run([binary, "keygen", "--client", "bench"], check=True,
                            capture_output=True, text=True).stdout
    key = next(l for l in keygen.splitlines() if l.startswith("sk-"))
    digest = re.search(r'key_sha256 = "([0-9a-f]{64})"', keygen).group(1)

    log("writing request bodies")
    write_bodies(out / "bodies-url.jsonl", PROMPTS, "1024x1024", "url")
    write_bodies(out / "bodies-slow.jsonl", PROMPTS, "1024x1024", "url",
                 prefix="[mock:latency_ms=2000] ")
    write_bodies(out / "bodies-b64.jsonl", 20_000, "1536x1024", "b64_json")
    fixed = body("a lighthouse at dusk, the one cached image", "1024x1024", "url")

    # Two mocks: tiny PNGs behind url answers (1024/64 = 16 px), and 768x512 PNGs (1024x1536
    # / 2) whose base64 makes a ~1.5 MB b64_json answer.
    mocks = {}
    for kind, divisor in (("url", 64), ("b64", 2)):
        port = free_port()
        proc = start([binary, "mock-upstream", "--listen", f"{LOOPBACK}:{port}",
                      "--image-divisor", str(divisor)], out / f"mock-{kind}.log")
        wait_http(f"http://{LOOPBACK}:{port}/__mock/stats", f"mock ({kind})", proc)
        mocks[kind] = f"{LOOPBACK}:{port}"
        mocks[f"{LOOPBACK}:{port}"] = proc

    targets = {
        t.name: t for t in (
            Direct(mocks),
            Nginx(args.nginx, out, repo / "bench" / "nginx.conf.in"),
            Imagegate(binary, out, repo / "bench" / "imagegate.toml", key, digest),
            Imagegate(binary, out, repo / "bench" / "imagegate.toml", key, digest,
                      memory_ledger=True),
        )
    }
    only = {s for s in args.only.split(",") if s}
    results = []
    for sc in scenarios(args.quick):
        if only and sc["id"] not in only:
            continue
        log(f"== {sc['title']}")
        upstream = mocks[sc["mock"]]
        mock_proc = mocks[upstream]
        if sc["bodies"] == "fixed":
            body_args = ["-d", fixed]
        else:
            body_args = ["-Z", str(out / f"bodies-{sc['bodies']}.jsonl")]
        headers = ["Cache-Control: no-cache"] if sc["no_cache"] else []
        for name in sc.get("targets", targets):
            target = targets[name]
            tag = f"{sc['id']}"
            target.start(upstream, tag)
            try:
                rss_start = memory_kib(target.pid, "VmRSS")
                # Warm up: connections, lazy initialisation, and (cache-hit run) the entry.
                warm = out / f"{sc['id']}-{slug(name)}-warmup.json"
                run_oha(args.oha, target.url, target.key,
                        ["-c", "4", "-n", str(sc["warmup"])], body_args, headers, warm, 300)
                time.sleep(1)
                rss_idle = memory_kib(target.pid, "VmRSS")
                noise = wait_quiet(args.quiet_wait, log)
                post(f"http://{upstream}/__mock/reset")
                cpu0, mcpu0 = cpu_seconds(target.pid), cpu_seconds(mock_proc.pid)
                raw = run_oha(args.oha, target.url, target.key, sc["load"], body_args, headers,
                              out / f"{sc['id']}-{slug(name)}.json", 600)
                cpu1, mcpu1 = cpu_seconds(target.pid), cpu_seconds(mock_proc.pid)
                rss_peak = memory_kib(target.pid, "VmHWM")
                rss_after = memory_kib(target.pid, "VmRSS")
                calls = get_json(f"http://{upstream}/__mock/stats")["calls"]
            finally:
                target.stop()
            s = summarise(raw)
            done = max(1, s["ok"] + s["errors"])
            row = {
                "scenario": sc["id"], "target": name, **s,
                "cpu_us_per_req": (cpu1 - cpu0) / done * 1e6,
                "cpu_secs": cpu1 - cpu0,
                "mock_cpu_us_per_req": (mcpu1 - mcpu0) / done * 1e6,
                "rss_start_mib": rss_start / 1024, "rss_idle_mib": rss_idle / 1024,
                "rss_peak_mib": rss_peak / 1024, "rss_after_mib": rss_after / 1024,
                "upstream_calls": calls, "noise": noise,
            }
            results.append(row)
            log(f"  {name:14} {s['requests_per_sec']:9.1f} req/s  p50 {s['p50_ms']:7.3f} ms"
                f"  p99 {s['p99_ms']:8.3f} ms  errors {s['errors']}"
                f"  cpu {row['cpu_us_per_req']:7.1f} us/req  rss idle {row['rss_idle_mib']:.1f}"
                f" peak {row['rss_peak_mib']:.1f} MiB  upstream calls {calls}"
                f"  [machine before: {noise['busy_pct']}% busy, load {' '.join(noise['loadavg'])}]")

    meta = machine_notes(args, binary)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    table = render(results, meta, args.quick)
    (out / "results.md").write_text(table)
    log("\n" + table)
    if args.publish:
        (repo / "bench" / "results.md").write_text(table)
        doc = repo / "BENCHMARKS.md"
        text = doc.read_text()
        start_mark, end_mark = "<!-- results:start -->", "<!-- results:end -->"
        if start_mark in text and end_mark in text:
            head, rest = text.split(start_mark, 1)
            _, tail = rest.split(end_mark, 1)
            doc.write_text(f"{head}{start_mark}\n{table}\n{end_mark}{tail}")
            log(f"published to {doc} and bench/results.md")
    return 0


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def machine_notes(args, binary: str) -> dict:
    def cmd(*c):
        try:
            return subprocess.run(c, capture_output=True, text=True, timeout=10).stdout.strip() \
                or subprocess.run(c, capture_output=True, text=True, timeout=10).stderr.strip()
        except OSError:
            return "?"
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "?")
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "nginx": cmd(args.nginx, "-v").replace("nginx version: ", ""),
        "oha": cmd(args.oha, "--version"),
        "imagegate": cmd("git", "-C", str(Path(__file__).parent), "describe", "--always",
                         "--dirty"),
    }


# --- report ----------------------------------------------------------------------------------

def render(rows: list[dict], meta: dict, quick: bool) -> str:
    def find(sc, target):
        return next((r for r in rows if r["scenario"] == sc and r["target"] == target), None)

    titles = {s["id"]: s["title"] for s in scenarios(quick)}
    lines = [
        f"Run {meta['date']} on {meta['cores']} cores ({meta['cpu']}), {meta['mem_gib']} GiB, "
        f"Linux {meta['kernel']}; imagegate {meta['imagegate']}, {meta['nginx']}, "
        f"{meta['oha']}{' (--quick: 5x shorter loads)' if quick else ''}.",
        "",
        "| scenario | target | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | errors "
        "| proxy CPU µs/req | RSS idle MiB | RSS peak MiB | upstream calls | machine before run |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for sc in titles:
        direct = find(sc, "mock (direct)")
        for r in (r for r in rows if r["scenario"] == sc):
            is_direct = r["target"] == "mock (direct)"
            added50 = added99 = "—"
            if direct and not is_direct:
                added50 = f"{r['p50_ms'] - direct['p50_ms']:+.3f}"
                added99 = f"{r['p99_ms'] - direct['p99_ms']:+.3f}"
            n = r["noise"]
            cpu, idle, peak = (("—",) * 3 if is_direct else (
                f"{r['cpu_us_per_req']:.1f}", f"{r['rss_idle_mib']:.1f}",
                f"{r['rss_peak_mib']:.1f}"))
            lines.append(
                f"| {sc} | {r['target']} | {r['requests_per_sec']:.0f} | {r['p50_ms']:.3f} "
                f"| {r['p99_ms']:.3f} | {added50} | {added99} | {r['errors']} "
                f"| {cpu} | {idle} | {peak} | {r['upstream_calls']} "
                f"| {n['busy_pct']:.0f}% busy, load {n['loadavg'][0]}"
                f"{', ' + '/'.join(n['compilers']) if n['compilers'] else ''} |")
    lines += ["", "| target (ratios against nginx / the mock in the same run) | limit "
              "| imagegate | met | imagegate, memory ledger (for information) |",
              "|---|---|---:|:---:|---:|"]
    for label, limit, measure in target_checks():
        cells = []
        for variant in ("imagegate", "imagegate (memory ledger)"):
            got = measure(find, variant)
            cells.append(got if got else ("not run", None))
        (text, ok), (other, _) = cells
        met = "—" if ok is None else ("yes" if ok else "**no**")
        lines.append(f"| {label} | {limit} | {text} | {met} | {other} |")
    return "\n".join(lines) + "\n"


def target_checks():
    """(label, limit, measure); measure(find, variant) gives (text, met) or None."""
    def cpu(find, v):
        ig, ng = find("saturation", v), find("saturation", "nginx")
        if not (ig and ng and ng["cpu_us_per_req"] > 0):
            return None
        r = ig["cpu_us_per_req"] / ng["cpu_us_per_req"]
        return f"{r:.2f}x ({ig['cpu_us_per_req']:.0f} / {ng['cpu_us_per_req']:.0f} µs)", r <= 2

    def cpu500(find, v):
        ig, ng = find("fixed500", v), find("fixed500", "nginx")
        if not (ig and ng and ng["cpu_us_per_req"] > 0):
            return None
        r = ig["cpu_us_per_req"] / ng["cpu_us_per_req"]
        return f"{r:.2f}x ({ig['cpu_us_per_req']:.0f} / {ng['cpu_us_per_req']:.0f} µs)", None

    def added(find, v, pct):
        ig, ng, d = find("fixed500", v), find("fixed500", "nginx"), \
            find("fixed500", "mock (direct)")
        if not (ig and ng and d):
            return None
        a_ig, a_ng = ig[pct] - d[pct], ng[pct] - d[pct]
        ok = a_ig <= a_ng + 0.1 if pct == "p50_ms" else a_ig < 1
        return f"{a_ig:+.3f} ms (nginx {a_ng:+.3f})", ok

    def b64(find, v):
        ig, ng = find("b64", v), find("b64", "nginx")
        if not (ig and ng and ng["requests_per_sec"] > 0):
            return None
        r = ig["requests_per_sec"] / ng["requests_per_sec"]
        return f"{r:.2f}x ({ig['requests_per_sec']:.0f} / {ng['requests_per_sec']:.0f} req/s)", \
            r >= 0.9

    def slow_errors(find, v):
        ig = find("slow", v)
        return (f"{ig['errors']} of {ig['ok'] + ig['errors']}", ig["errors"] == 0) if ig else None

    def slow_rss(find, v):
        ig, ng = find("slow", v), find("slow", "nginx")
        if not ig:
            return None
        extra = f" (nginx {ng['rss_peak_mib']:.0f})" if ng else ""
        return f"{ig['rss_peak_mib']:.1f} MiB{extra}", ig["rss_peak_mib"] < 64

    def idle(find, v):
        rows = [find(sc, v) for sc in ("saturation", "fixed500", "slow")]
        rows = [r["rss_idle_mib"] for r in rows if r]
        return (f"{max(rows):.1f} MiB", max(rows) < 20) if rows else None

    def cache(find, v):
        ig, d = find("cache_hit", v), find("cache_hit", "mock (direct)")
        if not (ig and d and d["requests_per_sec"] > 0):
            return None
        r = ig["requests_per_sec"] / d["requests_per_sec"]
        return (f"{r:.2f}x ({ig['requests_per_sec']:.0f} / {d['requests_per_sec']:.0f} req/s; "
                f"p50 {ig['p50_ms']:.2f} / {d['p50_ms']:.2f} ms)", r >= 1)

    return [
        ("CPU per proxied request, saturation (imagegate / nginx)", "≤ 2x", cpu),
        ("CPU per request at 500 req/s (imagegate / nginx)", "—", cpu500),
        ("added p50 at 500 req/s", "≤ nginx + 0.1 ms", lambda f, v: added(f, v, "p50_ms")),
        ("added p99 at 500 req/s", "< 1 ms", lambda f, v: added(f, v, "p99_ms")),
        ("b64_json throughput (imagegate / nginx)", "≥ 0.9x", b64),
        ("2 s upstream, ~1000 in flight: errors", "0", slow_errors),
        ("2 s upstream, ~1000 in flight: peak RSS", "< 64 MiB", slow_rss),
        ("idle RSS (after start and a small warm-up)", "< 20 MiB", idle),
        ("cache hits vs the mock answering directly (req/s)", "≥ 1x", cache),
    ]


if __name__ == "__main__":
    sys.exit(main())
