"""Re-record tests/cassettes from a real model over real HTTP (`make cassettes`).

Each cassette the selected tests use is overwritten; extra arguments go to pytest
(e.g. `-k poems` re-records one).

Serves SmolLM2-135M-Instruct with ``python -m llama_cpp.server`` on 127.0.0.1 (a free
port), runs ``tests/test_replay.py`` in record mode against it through datagen's normal
litellm ``openai/`` path, then stops the server. Needs ``make local`` (extras local and
server, and the weights).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from datagen.llm.local import model_file

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llama_cpp.server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"llama_cpp.server did not answer at {url} within {seconds:.0f}s")


def record_scaffold(env: dict[str, str]) -> int:
    """`datagen init`'s template ships a cassette too: record it in a scaffolded copy."""
    import shutil
    import tempfile

    from datagen.scaffold import TEMPLATE, create

    folder = create(Path(tempfile.mkdtemp()) / "scaffold")
    code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(folder / "test_pipeline.py")], env=env, cwd=folder)
    if code == 0:
        (TEMPLATE / "cassettes").mkdir(exist_ok=True)
        shutil.copy(folder / "cassettes" / "test_pipeline.yaml",
                    TEMPLATE / "cassettes" / "test_pipeline.yaml")
    return code


def main() -> int:
    port = free_port()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    server = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(model_file("smollm2")),
         "--host", "127.0.0.1", "--port", str(port), "--seed", "0", "--n_ctx", "2048"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/v1/models", server)
        record_env = {**env, "DATAGEN_RECORD": "1",
                      "DATAGEN_RECORD_BASE_URL": f"http://127.0.0.1:{port}/v1"}
        tests = [str(ROOT / "tests" / "test_replay.py"),
                 *map(str, sorted((ROOT / "examples").glob("*/test_*.py")))]
        code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                *sys.argv[1:], *tests], env=record_env, cwd=ROOT)
        return code or record_scaffold(record_env)
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    sys.exit(main())
