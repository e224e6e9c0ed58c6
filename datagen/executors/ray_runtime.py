"""Ray, for a cluster run: connecting to the cluster, the run's coordinator (a named actor
on the driver's node that owns the endpoints' budget and the board of attempts), the
shard task, and the check that every node sees the run's folder. Imported only once Ray
is known to be installed (``datagen.executors.ray`` checks)."""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path
from typing import Any

import ray as _ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from datagen.errors import ConfigError
from datagen.executors.ray_board import Board
from datagen.llm.clusterbudget import ClusterBudget
from datagen.shards import ShardRun, not_shared

ray: Any = _ray  # typed loosely: Ray's own annotations are partial


def connect(address: str | None, init: dict[str, Any]) -> None:
    """Attach this process to the cluster (unless it is attached already)."""
    if ray.is_initialized():
        return
    _probe(address)
    try:
        ray.init(address=address, **{"namespace": "datagen", "log_to_driver": False,
                                     **init})
    except ConnectionError as exc:
        raise ConfigError(
            f"cannot reach a Ray cluster at {address or 'the default address'}: {exc}. "
            "Start one (`ray start --head` on this machine, `ray up` on a cloud), then "
            "pass its address (--address auto, or host:port)") from None


def _probe(address: str | None, timeout: float = 5.0) -> None:
    """A host:port that nothing answers is an error within ``timeout``: ray.init would
    retry it for many minutes (measured: still waiting after 10). "auto", None and
    ray:// addresses are left to Ray, which fails at once when it finds no cluster."""
    import socket

    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return
    except ValueError:
        raise ConfigError(f"--address {address!r} is not host:port, 'auto' or "
                          "ray://host:port") from None
    except OSError as exc:
        raise ConfigError(
            f"cannot reach a Ray cluster at {address}: {exc.strerror or exc}. Start one "
            "(`ray start --head` on this machine, `ray up` on a cloud), then pass its "
            "address (--address auto, or host:port)") from None


def attempt_number() -> int:
    """Ray's number of the running task's attempt (0, then 1 for the first retry...);
    -1 where this Ray does not say (a private API: used for the manifest only)."""
    try:
        worker = ray._private.worker.global_worker
        return int(worker.core_worker.get_current_task_attempt_number())
    except Exception:
        return -1


class _Coordinator:
    """One per run: the cluster-wide budget of every endpoint, and the board of attempts."""

    def __init__(self) -> None:
        self.budget = ClusterBudget()
        self.board = Board()

    async def join(self, key: str, spec: dict[str, Any], who: str, maximum: int
                   ) -> dict[str, Any]:
        return self.budget.join(key, spec, who, maximum)

    async def lease(self, key: str, n: int, probe: bool
                    ) -> tuple[list[float], dict[str, Any]]:
        return self.budget.lease(key, n, probe)

    async def tokens(self, key: str, amounts: dict[str, float]) -> float:
        return self.budget.tokens(key, amounts)

    async def settle(self, key: str, report: dict[str, Any]) -> dict[str, Any]:
        return self.budget.settle(key, report)

    async def moved(self, key: str, at: float, to: float) -> None:
        self.budget.moved(key, at, to)

    async def leave(self, key: str, who: str) -> None:
        self.budget.leave(key, who)

    async def begin(self, shard: int, epoch: int, info: dict[str, Any]) -> None:
        self.board.begin(shard, epoch, info)

    async def report(self, shard: int, epoch: int, snapshot: dict[str, Any]) -> None:
        self.board.report(shard, epoch, snapshot)

    async def end(self, shard: int, epoch: int, outcome: dict[str, Any]) -> None:
        self.board.end(shard, epoch, outcome)

    async def view(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        return self.board.view(), self.budget.summary()


# an async actor: its methods run on one event loop, one at a time between awaits
Coordinator = ray.remote(num_cpus=0, max_concurrency=1000)(_Coordinator)


class RayPort:
    """The coordinator as a worker's :class:`datagen.llm.cluster.BudgetPort`."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    async def join(self, key: str, spec: dict[str, Any], who: str, maximum: int
                   ) -> dict[str, Any]:
        state: dict[str, Any] = await self.actor.join.remote(key, spec, who, maximum)
        return state

    async def lease(self, key: str, n: int, probe: bool
                    ) -> tuple[list[float], dict[str, Any]]:
        granted: tuple[list[float], dict[str, Any]] = await self.actor.lease.remote(
            key, n, probe)
        return granted

    async def tokens(self, key: str, amounts: dict[str, float]) -> float:
        wait: float = await self.actor.tokens.remote(key, amounts)
        return wait

    async def settle(self, key: str, report: dict[str, Any]) -> dict[str, Any]:
        state: dict[str, Any] = await self.actor.settle.remote(key, report)
        return state

    def moved(self, key: str, at: float, to: float) -> None:
        self.actor.moved.remote(key, at, to)

    def leave(self, key: str, who: str) -> None:
        self.actor.leave.remote(key, who)


def start_coordinator(name: str) -> Any:
    """The run's coordinator, on this (the driver's) node: it lives and dies with the
    driver, and a test or an autoscaler removing worker nodes never takes it along."""
    here = ray.get_runtime_context().get_node_id()
    return Coordinator.options(
        name=name, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)
    ).remote()


def _run_shard(make_shard: Any, shard: ShardRun, coordinator: Any) -> dict[str, Any]:
    """One attempt of one shard (Ray runs it again elsewhere if its worker or node dies)."""
    from datagen.executors.ray_shard import attempt

    return asyncio.run(attempt(make_shard, shard, coordinator, RayPort(coordinator),
                               attempt_number()))


run_shard = ray.remote(num_cpus=1)(_run_shard)


def launch(make_shard: Any, shard: ShardRun, coordinator: Any, num_cpus: float,
           max_retries: int) -> Any:
    return run_shard.options(
        num_cpus=num_cpus, max_retries=max_retries, retry_exceptions=False,
        scheduling_strategy="SPREAD").remote(make_shard, shard, coordinator)


def _look_here(folder: str, token: str, others: dict[str, int]) -> dict[str, Any]:
    """On one node: can it read the driver's probe in the run folder, write its own there,
    and see the pool and pipeline files the shards will read?"""
    node = ray.util.get_node_ip_address()
    node_id = ray.get_runtime_context().get_node_id()
    problems = []
    probe = Path(folder) / f".probe-{token}"
    try:
        if probe.read_text() != token:
            problems.append(f"{probe} holds something else")
    except OSError as exc:
        problems.append(f"cannot read {probe}: {exc.strerror}")
    try:
        (Path(folder) / f".probe-{token}-{node_id}").write_text(token)
    except OSError as exc:
        problems.append(f"cannot write in {folder}: {exc.strerror}")
    for path, size in others.items():
        try:
            if os.path.getsize(path) != size:
                problems.append(f"{path} differs from the driver's")
        except OSError as exc:
            problems.append(f"cannot see {path}: {exc.strerror}")
    return {"node": node, "node_id": node_id, "problems": problems}


_look = ray.remote(num_cpus=0, max_retries=0)(_look_here)


def check_shared_folder(folder: Path, others: list[Path], timeout: float = 120.0) -> list[str]:
    """Every alive node must see the run folder (and ``others``) at the same path, as this
    process does; returns the alive nodes' addresses, or raises ConfigError naming each
    node that does not."""
    folder.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    probe = folder / f".probe-{token}"
    probe.write_text(token)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    sizes = {str(p): p.stat().st_size for p in others}
    try:
        refs = [_look.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(str(folder), token, sizes) for n in nodes]
        seen = ray.get(refs, timeout=timeout)
        problems = []
        for answer in seen:
            back = folder / f".probe-{token}-{answer['node_id']}"
            if not answer["problems"] and not back.exists():
                answer["problems"].append(f"what it writes in {folder} does not reach "
                                          "this machine")
            problems += [f"node {answer['node']}: {p}" for p in answer["problems"]]
    finally:
        for path in folder.glob(f".probe-{token}*"):
            path.unlink(missing_ok=True)
    if problems:
        raise not_shared(folder, problems)
    return sorted(n["NodeManagerAddress"] for n in nodes)


def alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def cluster_cpus() -> int:
    """The cluster's CPUs: the default shard count (one shard per CPU)."""
    return int(ray.cluster_resources().get("CPU", 1))
