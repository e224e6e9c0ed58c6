"""This pipeline, end to end, replayed from cassettes/test_pipeline.yaml (real model output).

Replay needs no server and no network. After changing prompts or config, record again
against any OpenAI-compatible server serving your model:
    DATAGEN_RECORD=1 DATAGEN_RECORD_BASE_URL=http://127.0.0.1:8000/v1 pytest
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from datagen import load_folder

HERE = Path(__file__).resolve().parent
BASE_URL = os.environ.get("DATAGEN_RECORD_BASE_URL", "http://127.0.0.1:8080/v1")


def test_pipeline(datagen_cassette: Any, tmp_path: Path) -> None:
    folder = load_folder(HERE, base_url=BASE_URL, constrain_output=True, temperature=0.0,
                         max_retries=0, output_dir=str(tmp_path), progress=False)
    results = folder.pipeline.run_sync(folder.data_pool())
    assert results and all(r["output"].strip() for r in results)
    exported = folder.export(results.files.results)
    assert exported is not None and len(exported.read_text().splitlines()) == len(results)
