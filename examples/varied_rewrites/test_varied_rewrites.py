"""The varied-rewrites example, end to end, replayed from the cassette beside this file.

The cassette holds real SmolLM2-135M-Instruct output, recorded by `make cassettes` from
`python -m llama_cpp.server`: the rewrite step's prefill (`<rewrite>`) went through the
model's chat template, left open, to the server's /v1/completions. Replay needs no server
and no network; with DATAGEN_RECORD=1 it re-records against DATAGEN_RECORD_BASE_URL.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson

from datagen import load_folder

HERE = Path(__file__).resolve().parent
BASE_URL = os.environ.get("DATAGEN_RECORD_BASE_URL", "http://127.0.0.1:8080/v1")


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


def test_varied_rewrites(datagen_cassette: Any, tmp_path: Path) -> None:
    folder = load_folder(HERE, base_url=BASE_URL, temperature=0.0, max_retries=0,
                         output_dir=str(tmp_path), progress=False)
    chunks = list(folder.data_pool())
    result = folder.pipeline.run_sync(chunks)
    dropped = lines(result.files.dropped)
    failed = lines(result.files.failures)
    # every chunk ends somewhere: a record, a drop (the filter) or a failure
    assert len(result) + len(dropped) + len(failed) == len(chunks) >= 3
    assert result, "the embedded model kept nothing"
    variations = {"as_a_list.yaml", "as_a_dialogue.yaml", "as_one_sentence.yaml"}
    for record in result:
        rewrite = record["steps"]["rewrite"]
        assert record["steps"]["judgement"]["output"] == "suitable"
        assert rewrite["prompt_file"] in variations
        assert rewrite["raw_response"].startswith("<rewrite>")  # the prefill, continued
        assert rewrite["output"].strip()
        assert rewrite["messages"][-1] == {"role": "assistant", "content": "<rewrite>"}
    for drop in dropped:
        assert drop["reason"] == "filtered out by step 'judgement'"
    exported = lines(folder.export(result.files.results))
    assert len(exported) == len(result)
    # the same choice of variation on a second run (from the item's key)
    again = folder.pipeline.run_sync(chunks)
    assert {r["key"]: r["steps"]["rewrite"]["prompt_file"] for r in again} == {
        r["key"]: r["steps"]["rewrite"]["prompt_file"] for r in result}
