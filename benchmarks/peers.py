"""datagen and its peers against one fake OpenAI-compatible server, interleaved.

    python -m benchmarks.peers --setup                      # venvs for the peers (once)
    python -m benchmarks.peers                              # 200ms, 0ms, rate; 3 runs each
    python -m benchmarks.peers --scenarios 200k --timeout 300 --runs 1
    python -m benchmarks.peers --markdown --json runs.json  # README's tables; keep the runs
    python -m benchmarks.peers --render runs.json --markdown  # the same tables again

The fake server (datagen.testing.fake_server) runs in its own process on 127.0.0.1, one
per scenario. Every client runs in its own process: the project's own (plain aiohttp,
bare litellm, datagen on both transports) in the project's venv, each peer (Bespoke
Curator on its openai and litellm backends, NVIDIA Data Designer, distilabel) in its own
venv built by ``--setup`` (see benchmarks/_peer_venvs.py). Each client reads the same
JSONL pool and sends the same two messages per item as benchmarks/throughput.py, then
reports how many texts it got, its wall time (imports excluded), CPU time (its processes
and their children) and peak RSS (summed over its processes). Runs are interleaved: run
1 of every client, then run 2 (in a rotated order), and so on; the server's counters are
reset before each run and read after it. A client that did not return every text, that
failed, or that is not installed is shown as such, with the reason.

Nothing reaches the internet: the clients get HF_HUB_OFFLINE, telemetry off (Curator,
Data Designer), litellm's local price map, and tiktoken reads the files litellm ships.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from benchmarks import _peer_venvs as venvs
from benchmarks.throughput import free_port, http_json

ROOT = Path(__file__).resolve().parent.parent
CLIENT_DIR = Path(__file__).resolve().parent / "peer_clients"


@dataclass(frozen=True)
class Scenario:
    name: str
    latency: float
    concurrency: int
    items: int
    rate: float | None = None
    timeout: float = 900.0   # seconds per client run


SCENARIOS = {
    "200ms": Scenario("200ms", 0.2, 64, 2000),
    "0ms": Scenario("0ms", 0.0, 128, 5000),
    "rate": Scenario("rate", 0.05, 64, 1500, rate=100.0),
    "200k": Scenario("200k", 0.0, 128, 200_000, timeout=300.0),  # memory; opt-in
}
DEFAULT_SCENARIOS = ("200ms", "0ms", "rate")


@dataclass(frozen=True)
class Client:
    name: str
    label: str
    script: str
    variant: str | None = None
    peer: str | None = None          # None: the project's own venv
    rate_setting: str | None = None  # how its rate cap is set; None: it has none
    pool: str = "flat"               # "datagen": the same items in datagen's pool shape


CLIENTS = {c.name: c for c in (
    Client("aiohttp", "plain aiohttp", "run_own.py", "aiohttp"),
    Client("datagen-fast", "datagen, fast transport", "run_own.py", "datagen-fast",
           rate_setting="rate_limit: 100", pool="datagen"),
    Client("datagen-litellm", "datagen, litellm transport", "run_own.py", "datagen-litellm",
           rate_setting="rate_limit: 100", pool="datagen"),
    Client("litellm", "bare litellm.acompletion", "run_own.py", "litellm"),
    Client("curator-openai", "Curator, openai backend", "run_curator.py", "openai",
           peer="curator", rate_setting="max_requests_per_minute: 6000"),
    Client("curator-litellm", "Curator, litellm backend", "run_curator.py", "litellm",
           peer="curator", rate_setting="max_requests_per_minute: 6000"),
    Client("data-designer", "Data Designer", "run_data_designer.py", peer="data-designer"),
    Client("distilabel", "distilabel", "run_distilabel.py", peer="distilabel"),
)}


@dataclass
class Run:
    client: str
    ok: bool = False
    results: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    rss_mb: float = 0.0
    requests: int = 0
    max_window: int = 0
    processes: int = 1
    version: str = ""
    error: str = ""
    cut_off: bool = False

    @property
    def rps(self) -> float:
        return self.results / self.wall if self.wall else 0.0


# ---- the environment every client gets -------------------------------------------------

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "TELEMETRY_ENABLED": "false",            # Curator's PostHog
    "NEMO_TELEMETRY_ENABLED": "false",       # Data Designer's
    "CURATOR_DISABLE_CACHE": "true", "CURATOR_DISABLE_RICH_DISPLAY": "1",
    "OPENAI_API_KEY": "sk-fake",
    "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    "PYTHONUNBUFFERED": "1",
}
DROPPED_ENV = ("PYTHONPATH", "VIRTUAL_ENV", "OPENAI_BASE_URL", "OPENAI_API_BASE",
               "CURATOR_VIEWER", "HF_TOKEN")


def litellm_tokenizers() -> str:
    """The folder of tiktoken files litellm ships (cl100k_base, o200k_base, p50k_base)."""
    spec = find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return ""
    return str(Path(next(iter(spec.submodule_search_locations))) / "litellm_core_utils"
               / "tokenizers")


def client_env(client: Client, workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    env.update(OFFLINE_ENV)
    env.update(HF_HOME=str(workdir / "hf-home"), HF_DATASETS_CACHE=str(workdir / "hf-datasets"),
               CURATOR_CACHE_DIR=str(workdir / "curator-cache"),
               TIKTOKEN_CACHE_DIR=litellm_tokenizers())
    if client.peer is None:
        env["PYTHONPATH"] = str(ROOT)
    return env


# ---- the fake server and the pools -----------------------------------------------------

class FakeServer:
    """datagen.testing.fake_server in its own process."""

    def __init__(self, latency: float) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "datagen.testing.fake_server", "--port", str(self.port),
             "--latency", str(latency), "--no-bodies"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # "fake OpenAI server at ..."
        self.url = f"http://127.0.0.1:{self.port}"
        self.base = f"{self.url}/v1"

    def reset(self) -> None:
        http_json(f"{self.url}/reset", "POST")

    def stats(self) -> dict[str, Any]:
        return dict(http_json(f"{self.url}/stats"))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def write_pools(folder: Path, items: int) -> dict[str, Path]:
    """The same items twice: flat rows for the peers, datagen's shape for datagen."""
    flat, nested = folder / "pool.jsonl", folder / "pool-datagen.jsonl"
    with open(flat, "w") as fh_flat, open(nested, "w") as fh_nested:
        for i in range(items):
            row = {"topic": f"topic {i}", "tone": "plain", "word_count": 20}
            fh_flat.write(json.dumps(row) + "\n")
            fh_nested.write(json.dumps({
                "user_prompt_kwargs": {"topic": row["topic"], "word_count": 20},
                "system_prompt_kwargs": {"tone": "plain"}}) + "\n")
    return {"flat": flat, "datagen": nested}


# ---- one run of one client -------------------------------------------------------------

def client_command(client: Client, scenario: Scenario, base: str, pool: Path,
                   workdir: Path) -> list[str]:
    python = sys.executable if client.peer is None else str(venvs.venv_python(client.peer))
    cmd = [python, str(CLIENT_DIR / client.script), "--base", base, "--pool", str(pool),
           "--items", str(scenario.items), "--concurrency", str(scenario.concurrency),
           "--workdir", str(workdir / "scratch"), "--progress", str(workdir / "progress.json")]
    if client.variant:
        cmd += ["--variant", client.variant]
    if scenario.rate and client.rate_setting:
        cmd += ["--rate", str(scenario.rate)]
    return cmd


def last_json_line(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return dict(json.loads(line))
            except ValueError:
                return None
    return None


def tail(path: Path, lines: int = 4) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " / ".join(line.strip()[:200] for line in text[-lines:])


def kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def wait_or_kill(proc: subprocess.Popen[str], timeout: float) -> tuple[str, bool]:
    """The client's stdout, and whether the time limit cut it off. Its whole process
    group (a peer's workers too) is killed when it is cut off or the harness interrupted."""
    try:
        out, _ = proc.communicate(timeout=timeout)
        return out, False
    except subprocess.TimeoutExpired:
        kill_group(proc)
        return proc.communicate()[0], True
    except BaseException:
        kill_group(proc)
        raise


def run_client(client: Client, scenario: Scenario, server: FakeServer, pools: dict[str, Path],
               workdir: Path, timeout: float) -> Run:
    workdir.mkdir(parents=True)
    server.reset()
    cmd = client_command(client, scenario, server.base, pools[client.pool], workdir)
    run = Run(client.name)
    with open(workdir / "stderr.log", "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                cwd=workdir, env=client_env(client, workdir),
                                start_new_session=True)  # its own group: killed whole
        out, run.cut_off = wait_or_kill(proc, timeout)
    stats = server.stats()
    run.requests, run.max_window = stats["requests"], stats["max_in_window"]
    if run.cut_off:
        return cut_off(run, workdir, timeout, scenario.items)
    report = last_json_line(out) if proc.returncode == 0 else None
    if report is None:
        run.error = f"exit {proc.returncode}: {tail(workdir / 'stderr.log')}"
        return run
    run.results, run.wall, run.cpu = report["results"], report["wall"], report["cpu"]
    run.rss_mb, run.version = report["rss_mb"], report.get("version", "")
    run.processes = report.get("processes", 1)
    run.ok = run.results == scenario.items
    if not run.ok:
        run.error = f"{run.results} of {scenario.items} texts"
    return run


def cut_off(run: Run, workdir: Path, timeout: float, items: int) -> Run:
    """A client stopped at the time limit: what the server saw, and its numbers so far."""
    try:
        partial = json.loads((workdir / "progress.json").read_text())
    except (OSError, ValueError):
        partial = {"wall": timeout, "cpu": 0.0, "rss_mb": 0.0}
    run.wall, run.cpu, run.rss_mb = partial["wall"], partial["cpu"], partial["rss_mb"]
    run.version, run.processes = partial.get("version", ""), partial.get("processes", 1)
    run.results = run.requests  # sent, not necessarily returned: an upper bound
    run.error = (f"cut off at {timeout:.0f} s: {run.requests:,} of {items:,} requests sent; "
                 "numbers so far")
    return run


# ---- a scenario: every client, interleaved ---------------------------------------------

def unavailable(client: Client) -> str | None:
    return venvs.status(client.peer) if client.peer else None


def run_scenario(scenario: Scenario, clients: list[Client], runs: int, timeout: float | None,
                 scratch: Path, keep: bool) -> dict[str, list[Run]]:
    results: dict[str, list[Run]] = {c.name: [] for c in clients}
    ready = [c for c in clients if unavailable(c) is None]
    pools = write_pools(scratch, scenario.items)
    server = FakeServer(scenario.latency)
    try:
        for r in range(runs):
            order = ready[r % len(ready):] + ready[:r % len(ready)] if ready else []
            for client in order:
                workdir = scratch / f"{client.name}-{r}"
                run = run_client(client, scenario, server, pools, workdir,
                                 timeout or scenario.timeout)
                results[client.name].append(run)
                log(f"[{scenario.name}] run {r + 1}/{runs} {client.name}: " + (
                    f"{run.rps:.0f} req/s, {run.cpu * 1000 / max(run.results, 1):.2f} CPU "
                    f"ms/call, {run.rss_mb:.0f} MB, max {run.max_window} in 1 s"
                    if run.ok else run.error))
                if not keep:
                    shutil.rmtree(workdir, ignore_errors=True)
    finally:
        server.stop()
        for pool in pools.values():
            pool.unlink()
    return results


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- tables ----------------------------------------------------------------------------

def median(values: list[float], digits: int = 0) -> str:
    return f"{statistics.median(values):.{digits}f}"


def spread(values: list[float], digits: int = 0) -> str:
    mid = statistics.median(values)
    if len(values) == 1:
        return f"{mid:.{digits}f}"
    return f"{mid:.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def best_possible(s: Scenario) -> float | None:
    if s.rate:
        return s.rate
    return s.items / (math.ceil(s.items / s.concurrency) * s.latency) if s.latency else None


def scenario_title(s: Scenario) -> str:
    best = best_possible(s)
    return (f"{s.name}: latency {s.latency * 1000:.0f} ms, {s.concurrency} in flight, "
            f"{s.items:,} calls" + (f", rate limit {s.rate:g} req/s" if s.rate else "")
            + (f" (best possible {best:.0f} req/s)" if best else ""))


def header(s: Scenario) -> list[str]:
    cols = ["client", "req/s median [min-max]", "CPU ms/call", "peak RSS MB"]
    if s.rate:
        cols += ["max req in any 1 s [min-max]", "its rate setting"]
    return [*cols, "notes"]


def row(client: Client, runs: list[Run], s: Scenario, missing: str | None) -> list[str]:
    good = [r for r in runs if r.ok]
    shown = good or [r for r in runs if r.cut_off]  # cut off: its numbers so far, with ~
    mark = "" if good else "~"
    notes = [missing] if missing else []
    notes += sorted({r.error for r in runs if not r.ok})
    if good and len(good) < len(runs):
        notes.insert(0, f"{len(runs) - len(good)} of {len(runs)} runs failed")
    processes = max((r.processes for r in shown), default=1)
    if processes > 1:
        notes.append(f"RSS summed over its {processes} processes")
    extra = sorted({r.requests - r.results for r in good} - {0})
    if extra:
        notes.append(f"the server saw {'/'.join(map(str, extra))} more request(s) than texts")
    cells = [client.label] + (
        [mark + spread([r.rps for r in shown]),
         mark + median([r.cpu * 1000 / max(r.results, 1) for r in shown], 2),
         mark + median([r.rss_mb for r in shown])] if shown else ["failed", "-", "-"])
    if s.rate:
        windows = [float(r.max_window) for r in shown]
        cells += [spread(windows) if shown else "-", client.rate_setting or "none (no limiter)"]
    return [*cells, "; ".join(notes)]


def render(cols: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(x) for x in col) for col in zip(cols, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*cols), fmt.format(*("-" * w for w in widths))]
    return "\n".join(line.rstrip() for line in lines + [fmt.format(*r) for r in rows])


def table(s: Scenario, clients: list[Client], results: dict[str, list[Run]],
          missing: dict[str, str], markdown: bool) -> str:
    rows = [row(c, results[c.name], s, missing.get(c.name)) for c in clients]
    title = f"**{scenario_title(s)}**" if markdown else f"== {scenario_title(s)}"
    return f"{title}\n\n{render(header(s), rows, markdown)}\n"


# ---- the machine -----------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def git_commit() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def machine_lines() -> list[str]:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return [f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
            f"machine: {os.cpu_count()} cores ({cpu_model()}), {memory:.0f} GiB, "
            f"load average at start {load}",
            f"python {platform.python_version()}, datagen commit {git_commit()}"]


def versions(clients: Iterable[Client], results: dict[str, dict[str, list[Run]]]
             ) -> list[str]:
    """What each client ran on: as it reported itself, and each peer venv's key packages."""
    lines = []
    for client in clients:
        seen = sorted({r.version for by in results.values() for r in by[client.name]
                       if r.version})
        lines.append(f"{client.label}: {', '.join(seen) or 'did not run'}")
    for peer in sorted({c.peer for c in clients if c.peer}):
        marker = venvs.read_marker(peer)
        lines.append(f"{peer} venv: {venvs.describe(marker) if marker else 'not installed'}")
    return lines


@dataclass
class Report:
    """Everything the tables are made of: saved by --json, printed again by --render."""

    argv: list[str]
    intro: list[str]                   # date, machine, versions
    scenarios: list[Scenario]
    clients: list[str]
    missing: dict[str, str]            # client -> why it could not run at all
    results: dict[str, dict[str, list[Run]]]

    def text(self, markdown: bool) -> str:
        command = "python -m benchmarks.peers " + " ".join(self.argv)
        intro = [*self.intro[:3], f"command: `{command}`" if markdown else f"command: {command}",
                 *self.intro[3:]]
        parts = ["\n".join(f"- {line}" if markdown else line for line in intro)]
        clients = [CLIENTS[name] for name in self.clients]
        parts += [table(s, clients, self.results[s.name], self.missing, markdown)
                  for s in self.scenarios]
        return "\n\n".join(parts)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> Report:
        data = json.loads(path.read_text())
        return cls(argv=data["argv"], intro=data["intro"],
                   scenarios=[Scenario(**s) for s in data["scenarios"]],
                   clients=data["clients"], missing=data["missing"],
                   results={s: {c: [Run(**r) for r in runs] for c, runs in by.items()}
                            for s, by in data["results"].items()})


# ---- the command -----------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setup", action="store_true",
                        help="build the venvs of the chosen clients' peers and exit")
    parser.add_argument("--reinstall", action="store_true", help="with --setup: rebuild them")
    parser.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                        help=f"comma-separated, of {', '.join(SCENARIOS)} (200k is long)")
    parser.add_argument("--clients", default=",".join(CLIENTS),
                        help=f"comma-separated, of {', '.join(CLIENTS)}")
    parser.add_argument("--runs", type=int, default=3, help="runs per client and scenario")
    parser.add_argument("--items", type=int, help="override every scenario's call count")
    parser.add_argument("--timeout", type=float,
                        help="seconds per client run (default: 900; 300 for 200k)")
    parser.add_argument("--markdown", action="store_true", help="tables for README.md")
    parser.add_argument("--json", type=Path, help="also save every run's numbers here")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="print the tables of a run saved with --json (no new run)")
    parser.add_argument("--keep", action="store_true", help="keep each run's scratch folder")
    args = parser.parse_args(argv)
    for name, known in (("scenarios", SCENARIOS), ("clients", CLIENTS)):
        unknown = set(getattr(args, name).split(",")) - set(known)
        if unknown:
            parser.error(f"unknown {name}: {', '.join(sorted(unknown))}")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def chosen_scenarios(args: argparse.Namespace) -> list[Scenario]:
    scenarios = [SCENARIOS[name] for name in args.scenarios.split(",")]
    if args.items:
        scenarios = [Scenario(**{**asdict(s), "items": args.items}) for s in scenarios]
    return scenarios


def measure(args: argparse.Namespace, argv: list[str], clients: list[Client]) -> Report:
    scenarios = chosen_scenarios(args)
    machine = machine_lines()  # the load average before this command adds to it
    scratch = Path(tempfile.mkdtemp(prefix="datagen-peers-"))
    results: dict[str, dict[str, list[Run]]] = {}
    try:
        for s in scenarios:
            log(f"== {scenario_title(s)}")
            (scratch / s.name).mkdir()
            results[s.name] = run_scenario(s, clients, args.runs, args.timeout,
                                           scratch / s.name, args.keep)
    finally:
        if args.keep:
            log(f"scratch folders kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    missing = {c.name: why for c in clients if (why := unavailable(c))}
    return Report(argv, machine + versions(clients, results), scenarios,
                  [c.name for c in clients], missing, results)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.render:
        print(Report.load(args.render).text(args.markdown))
        return 0
    clients = [CLIENTS[name] for name in args.clients.split(",")]
    if args.setup:  # the peers of the chosen clients (all, by default)
        return venvs.setup(sorted({c.peer for c in clients if c.peer}), args.reinstall)
    report = measure(args, argv, clients)
    if args.json:
        report.save(args.json)
    print(report.text(args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
