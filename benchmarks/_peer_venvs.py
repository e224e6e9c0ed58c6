"""One venv per peer, built from the package registry, outside the checkout and reused.

    python -m benchmarks.peers --setup            # build what is missing
    python -m benchmarks.peers --setup --reinstall

Each venv lives in ``~/.cache/datagen/peer-venvs/<peer>`` (``DATAGEN_PEER_VENVS`` moves
the folder) with a ``datagen-peer.json`` beside it: what was installed and how, the exact
versions (``pip freeze``), or why the install failed. The benchmark reads that file to
label its rows and to report a peer that could not be installed.

Data Designer 0.9.7 is installed the way issue 16 describes: its three wheels' declared
dependencies first, with ``certifi`` left to whatever the registry has (0.9.7 asks for a
certifi newer than some registries carry), then its three packages without dependencies.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER = "datagen-peer.json"


@dataclass(frozen=True)
class Peer:
    name: str                       # the venv's folder
    requirements: tuple[str, ...]   # what pip installs
    shown: tuple[str, ...]          # distributions whose versions label the results
    no_deps_recipe: bool = False    # Data Designer's: deps first, then its wheels --no-deps
    note: str = ""


DD_VERSION = "0.9.7"
PEERS: dict[str, Peer] = {
    "curator": Peer(
        "curator", ("bespokelabs-curator==0.1.31",),
        ("bespokelabs-curator", "litellm", "openai", "aiohttp", "datasets")),
    "distilabel": Peer(
        # distilabel 1.5.3 imports requests without declaring it. beautifulsoup4 stays out
        # on purpose: with it, building the Distiset fetches BibTeX from arxiv2bibtex.org.
        "distilabel", ("distilabel[openai]==1.5.3", "requests"),
        ("distilabel", "openai", "httpx", "datasets"),
        note="requests added (imported, not declared); beautifulsoup4 left out (offline)"),
    "data-designer": Peer(
        "data-designer",
        tuple(f"{name}=={DD_VERSION}" for name in
              ("data-designer", "data-designer-config", "data-designer-engine")),
        ("data-designer", "data-designer-config", "data-designer-engine", "certifi", "httpx",
         "tiktoken"),
        no_deps_recipe=True,
        note="dependencies with the registry's certifi, then its 3 packages --no-deps"),
}


def venvs_root() -> Path:
    return Path(os.environ.get("DATAGEN_PEER_VENVS", "~/.cache/datagen/peer-venvs")).expanduser()


def venv_python(peer: str) -> Path:
    return venvs_root() / peer / "bin" / "python"


def read_marker(peer: str) -> dict[str, Any] | None:
    path = venvs_root() / peer / MARKER
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


class InstallError(Exception):
    pass


def pip(python: Path, *args: str, timeout: float = 1800) -> str:
    cmd = [str(python), "-m", "pip", "--disable-pip-version-check", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        lines = [ln for ln in out.stderr.splitlines() if not ln.startswith("WARNING: Location")]
        raise InstallError(f"pip {' '.join(args[:2])} failed: " + " / ".join(lines[-6:]))
    return out.stdout


def make_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True,
                   capture_output=True, timeout=300)
    return path / "bin" / "python"


def _requirement_name(spec: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else ""


def wheel_dependencies(wheel: Path) -> list[str]:
    """``Requires-Dist`` of a wheel, without optional extras."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(name).decode()
    deps = [line.split(":", 1)[1].strip() for line in metadata.splitlines()
            if line.startswith("Requires-Dist:")]
    return [d for d in deps if "extra ==" not in d]


def recipe_requirements(deps: Iterable[str], own: Iterable[str]) -> list[str]:
    """The dependencies to install first: not the packages themselves, certifi unpinned."""
    skip = {_requirement_name(r) for r in own}
    kept = {"certifi" if _requirement_name(d) == "certifi" else d
            for d in deps if _requirement_name(d) not in skip}
    return sorted(kept)


def no_deps_recipe(python: Path, requirements: tuple[str, ...]) -> str:
    """Install the packages' dependencies (certifi unpinned), then the packages --no-deps."""
    with tempfile.TemporaryDirectory(prefix="peer-wheels-") as tmp:
        pip(python, "download", "--no-deps", "--dest", tmp, *requirements)
        wheels = sorted(Path(tmp).glob("*.whl"))
        deps = [d for wheel in wheels for d in wheel_dependencies(wheel)]
        pip(python, "install", *recipe_requirements(deps, requirements))
        pip(python, "install", "--no-deps", *map(str, wheels))
    checked = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True,
                             text=True, timeout=300)
    return checked.stdout.strip()


def freeze(python: Path) -> dict[str, str]:
    versions = {}
    for line in pip(python, "list", "--format=json", timeout=300).splitlines()[-1:]:
        for row in json.loads(line):
            versions[_requirement_name(row["name"])] = row["version"]
    return versions


def install(peer: Peer) -> dict[str, Any]:
    path = venvs_root() / peer.name
    started = time.time()
    python = make_venv(path)
    pip(python, "install", "--upgrade", "pip")
    record: dict[str, Any] = {"peer": peer.name, "requirements": list(peer.requirements),
                              "note": peer.note}
    if peer.no_deps_recipe:
        record["pip_check"] = no_deps_recipe(python, peer.requirements)
    else:
        pip(python, "install", *peer.requirements)
    versions = freeze(python)
    record.update(ok=True, versions={n: versions.get(n, "?") for n in peer.shown},
                  freeze=versions, seconds=round(time.time() - started),
                  installed=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    return record


def setup(names: list[str], reinstall: bool) -> int:
    """Build each peer's venv (or reuse it); print one line per peer. Non-zero if any failed."""
    failed = 0
    for name in names:
        peer = PEERS[name]
        marker = read_marker(name)
        if marker and marker.get("ok") and not reinstall:
            print(f"{name}: reused {venvs_root() / name} ({describe(marker)})")
            continue
        print(f"{name}: installing {' '.join(peer.requirements)} ...", flush=True)
        try:
            record = install(peer)
        except (InstallError, subprocess.SubprocessError, OSError) as exc:
            record = {"peer": name, "ok": False, "error": str(exc)[:1500]}
            failed += 1
        (venvs_root() / name).mkdir(parents=True, exist_ok=True)
        (venvs_root() / name / MARKER).write_text(json.dumps(record, indent=1))
        print(f"{name}: {describe(record)}")
    return 1 if failed else 0


def describe(marker: dict[str, Any]) -> str:
    if not marker.get("ok"):
        return f"install failed: {marker.get('error', '?')}"
    versions = ", ".join(f"{n} {v}" for n, v in marker.get("versions", {}).items())
    check = marker.get("pip_check")
    return versions + (f"; pip check: {check}" if check else "")


def status(peer: str) -> str | None:
    """Why a peer cannot run (not installed, install failed), or None when it can."""
    marker = read_marker(peer)
    if marker is None or not venv_python(peer).exists():
        return "not installed (run: python -m benchmarks.peers --setup)"
    if not marker.get("ok"):
        return f"install failed: {marker.get('error', '?')[:300]}"
    return None
