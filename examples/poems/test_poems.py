"""The poems example, end to end, replayed from the cassette beside this file.

The cassette holds real SmolLM2-135M-Instruct output (recorded by `make cassettes` from
`python -m llama_cpp.server`). Replay needs no server and no network; with
DATAGEN_RECORD=1 it re-records against DATAGEN_RECORD_BASE_URL. Copy this folder and this
test comes with it: it needs only datagen's pytest plugin (`datagen_cassette`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson

from datagen import load_folder

HERE = Path(__file__).resolve().parent
BASE_URL = os.environ.get("DATAGEN_RECORD_BASE_URL", "http://127.0.0.1:8080/v1")


def run(tmp_path: Path) -> tuple[Any, Any, list[Any]]:
    folder = load_folder(HERE, base_url=BASE_URL, constrain_output=True, temperature=0.0,
                         max_retries=0, output_dir=str(tmp_path), progress=False)
    return folder, folder.pipeline, folder.pipeline.run_sync(folder.data_pool())


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


def test_poems(datagen_cassette: Any, tmp_path: Path) -> None:
    example, _, results = run(tmp_path)
    n_chunks = len(list(example.data_pool()))
    assert n_chunks >= 2 and len(results) == n_chunks
    assert all(r["output"].strip() and r["item"]["source"] for r in results)
    exported = lines(example.export(results.files.results))
    assert len(exported) == n_chunks
    # the file (and so the export) is in the order items finished, run() in input order
    assert sorted(e["conversations"][-1]["value"] for e in exported) == sorted(
        r["output"] for r in results)
