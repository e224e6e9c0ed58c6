"""A real multi-node Ray cluster on loopback, for tests and benchmarks of cluster runs.

Every node is one ``ray start --block`` process in its own session, with its own loopback
address 127.0.0.N (N >= 2: Ray rewrites 127.0.0.1 to the machine's network address) and
its own temp dir. Every process of the cluster (also the worker processes, which the
raylet puts in process groups of their own) inherits ``DATAGEN_RAY_NODE=<owner pid>-<id>/<ip>``,
which is how :meth:`LocalRayCluster.kill_node` and :meth:`LocalRayCluster.shutdown` find
and SIGKILL *only this cluster's* processes (``ray stop`` would stop every Ray process
of the machine). Nothing leaves loopback: no usage report, no cloud-metadata probe (a
``HOME`` holding an empty ``ray_bootstrap_config.yaml``), token authentication on
Ray's wildcard listeners, faster node-death detection (a killed node's tasks are retried
in ~1.5 s). ::

    with LocalRayCluster(n_nodes=3) as cluster:   # sets RAY_* for this process (the driver)
        ray.init(address=cluster.address, _node_ip_address=cluster.head_ip)
        ...
        cluster.kill_node("127.0.0.4")
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datagen.redact import get_logger

MARKER = "DATAGEN_RAY_NODE"
BASE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # the head's API server still POSTs a "usage disabled" report: to a closed local port
    "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
    "RAY_enable_metrics_collection": "0",
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    # a killed node is declared dead in ~1.5 s (defaults: 3 s x 5, after 5 s)
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}
_TOKEN = os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)  # one per process

log = get_logger("datagen.testing")


@contextlib.contextmanager
def attached_cluster(namespace: str, n_nodes: int = 3, num_cpus: int = 2
                     ) -> Iterator[LocalRayCluster]:
    """A loopback cluster with this process attached as its driver (``ray.init``), for a
    test module's fixture; detached and stopped at the end."""
    import ray

    with LocalRayCluster(n_nodes=n_nodes, num_cpus=num_cpus) as cluster:
        ray.init(address=cluster.address, _node_ip_address=cluster.head_ip,
                 namespace=namespace, log_to_driver=False)
        try:
            yield cluster
        finally:
            ray.shutdown()


def _free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def _wait_port(ip: str, port: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((ip, port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > end:
                raise TimeoutError(f"{ip}:{port} not listening after {timeout}s") from None
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return False


def pids_with_env(entry: bytes, prefix: bool = False) -> list[int]:
    """Processes whose environment holds ``entry`` (or an entry starting with it)."""
    found, me = [], os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if any(e.startswith(entry) for e in env) if prefix else entry in env:
            found.append(int(d))
    return found


def _kill(pids: list[int]) -> None:
    _signal(pids, signal.SIGKILL)


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL the node when the process that started it dies."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def sweep_orphans() -> None:
    """Kill what clusters of dead owners (a test run killed -9) left behind."""
    for pid in pids_with_env(f"{MARKER}=".encode(), prefix=True):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                value = next(e for e in f.read().split(b"\0")
                             if e.startswith(MARKER.encode() + b"="))
            owner = int(value.split(b"=", 1)[1].split(b"-", 1)[0])
        except (OSError, StopIteration, ValueError):
            continue
        if not _alive(owner):
            _kill([pid])
    for d in os.listdir("/tmp"):
        m = re.fullmatch(r"rdg(\d+)-\w+", d)
        if m and not _alive(int(m.group(1))) and int(m.group(1)) != os.getpid():
            shutil.rmtree(os.path.join("/tmp", d), ignore_errors=True)


def _reload_ray_config() -> None:
    """``import ray`` reads RAY_AUTH_MODE once: read it again after setting it."""
    import importlib

    raylet: Any = importlib.import_module("ray._raylet")
    raylet.Config.initialize("")


class LocalRayCluster:
    def __init__(self, n_nodes: int = 3, num_cpus: int = 2, first_ip: int = 2,
                 object_store_mb: int = 80, extra_env: dict[str, str] | None = None) -> None:
        self.id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp = tempfile.mkdtemp(prefix=f"rdg{os.getpid()}-", dir="/tmp")  # short
        self.ips = [f"127.0.0.{first_ip + i}" for i in range(n_nodes)]
        self.head_ip = self.ips[0]
        self.num_cpus = num_cpus
        self.object_store = object_store_mb * 2**20
        Path(self.tmp, "ray_bootstrap_config.yaml").write_text("{}\n")  # no metadata probe
        self.token = _TOKEN
        self.env = dict(os.environ, **BASE_ENV, RAY_TMPDIR=self.tmp, HOME=self.tmp,
                        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, **(extra_env or {}))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.address = ""
        self._saved_env: dict[str, str | None] = {}

    def driver_env(self) -> dict[str, str]:
        """What a driver process needs in its environment before ``ray.init``."""
        return {**BASE_ENV, "RAY_TMPDIR": self.tmp, "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": self.token}

    def _start_node(self, ip: str, head: bool, hide: list[str] | None = None) -> None:
        args = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block",
                f"--node-ip-address={ip}", f"--num-cpus={self.num_cpus}",
                f"--object-store-memory={self.object_store}",
                f"--resources={json.dumps({'dg_' + ip.replace('.', '_'): 1})}",
                "--disable-usage-stats", "--include-log-monitor=false",
                f"--temp-dir={self.tmp}/{ip.rsplit('.', 1)[1]}"]  # one per node: no race
        if head:
            port = _free_port(ip)
            self.address = f"{ip}:{port}"
            args += ["--head", f"--port={port}", "--include-dashboard=false",
                     f"--dashboard-host={ip}"]
        else:
            args += [f"--address={self.address}"]
        if hide:  # a node that does not see these folders (an empty tmpfs over each)
            script = ('while [ "$1" != -- ]; do mount -t tmpfs none "$1" || exit 97; shift;'
                      ' done; shift; exec "$@"')
            args = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                    "sh", *hide, "--", *args]
        env = dict(self.env, **{MARKER: f"{self.id}/{ip}"})
        with open(os.path.join(self.tmp, f"node-{ip}.log"), "wb") as log:
            self.procs[ip] = subprocess.Popen(
                args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=_die_with_parent)

    def start(self, timeout: float = 90) -> str:
        t0 = time.monotonic()
        sweep_orphans()
        self._saved_env = {k: os.environ.get(k) for k in self.driver_env()}
        os.environ.update(self.driver_env())  # this process is the driver
        _reload_ray_config()
        try:
            self._start_node(self.head_ip, head=True)
            host, port = self.address.rsplit(":", 1)
            _wait_port(host, int(port), timeout)
            for ip in self.ips[1:]:
                self._start_node(ip, head=False)
            self.wait_alive(len(self.ips), timeout - (time.monotonic() - t0))
        except BaseException:
            for ip in self.ips:  # the node logs, before they are deleted
                path = Path(self.tmp, f"node-{ip}.log")
                if path.exists():
                    log.error("--- %s\n%s", path, path.read_text(errors="replace")[-3000:])
            self.shutdown()
            raise
        return self.address

    def add_node(self, ip: str | None = None, timeout: float = 60,
                 hide: list[str] | None = None) -> str:
        """(Re)start a worker node and wait until the cluster sees it; ``hide``: folders
        this node does not see (it runs in a mount namespace of its own)."""
        if ip is None:
            ip = f"127.0.0.{max(int(i.rsplit('.', 1)[1]) for i in self.ips) + 1}"
        if ip in self.procs:
            raise ValueError(f"node {ip} is running")
        if ip not in self.ips:
            self.ips.append(ip)
        n = len(self.alive_node_ips()) + 1
        self._start_node(ip, head=False, hide=hide)
        self.wait_alive(n, timeout)
        return ip

    def alive_node_ips(self) -> list[str]:
        import importlib

        raylet: Any = importlib.import_module("ray._raylet")
        gcs = raylet.GcsClient(address=self.address)
        return sorted(n.node_manager_address for n in gcs.get_all_node_info(timeout=5).values()
                      if n.state == 0)  # ALIVE

    def wait_alive(self, n: int, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while True:
            with contextlib.suppress(Exception):
                if len(self.alive_node_ips()) == n:
                    return
            for ip, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"ray node {ip} exited: see {self.tmp}/node-{ip}.log")
            if time.monotonic() > end:
                raise TimeoutError(f"{n} nodes not alive after {timeout}s")
            time.sleep(0.1)

    def node_pids(self, ip: str | None = None) -> list[int]:
        entry = f"{MARKER}={self.id}/{ip}" if ip else f"{MARKER}={self.id}/"
        return [p for p in pids_with_env(entry.encode(), prefix=ip is None) if _alive(p)]

    def kill_node(self, ip: str, _teardown: bool = False, orphan_workers: bool = False
                  ) -> float:
        """Crash one node: SIGKILL its process group and every process carrying its
        marker (its workers too; with ``orphan_workers`` they are left running, as after
        a raylet crash: stale attempts). Returns the seconds it took."""
        if ip == self.head_ip and not _teardown:
            raise ValueError("killing the head node takes the whole cluster down")
        t0 = time.monotonic()
        p = self.procs.pop(ip)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        if not orphan_workers:
            self.kill_orphans(ip)
        return time.monotonic() - t0

    def freeze_node(self, ip: str, frozen: bool = True) -> None:
        """SIGSTOP (``frozen``) or SIGCONT every process of a node: a node cut off (or
        stalled) long enough to be declared dead, which may then come back."""
        _signal(self.node_pids(ip), signal.SIGSTOP if frozen else signal.SIGCONT)

    def kill_orphans(self, ip: str) -> None:
        """SIGKILL what is left of a killed node (its worker processes)."""
        for _ in range(50):
            pids = self.node_pids(ip)
            if not pids:
                break
            _kill(pids)
            time.sleep(0.02)

    def shutdown(self) -> None:
        """Stop only this cluster (SIGKILL: a graceful stop takes ~30 s, and a test
        cluster holds nothing worth keeping), then remove its temp dir."""
        for ip in list(self.procs):
            self.kill_node(ip, _teardown=True)
        for _ in range(50):
            pids = self.node_pids()
            if not pids:
                break
            _kill(pids)
            time.sleep(0.02)
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if self._saved_env:
            _reload_ray_config()
        if not os.environ.get("KEEP_RAY_TMP"):
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
