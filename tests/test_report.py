"""The HTML report, opened in real headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from datagen.report import report_data, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("CI") != "true",
    reason="chromium not installed (.ci/run installs it)")


def make_run(folder: Path, n: int) -> Path:
    results = folder / "big_20261122_101500.jsonl"
    with open(results, "wb") as fh:
        for i in range(n):
            fh.write(orjson.dumps({
                "index": i, "key": f"key{i:06d}",
                "user_prompt_kwargs": {"topic": f"topic {i}"}, "system_prompt_kwargs": {},
                "messages": [{"role": "user", "content": f"Write about topic {i}."}],
                "output": f"Text number {i} about things.", "raw_response": f"<d>{i}</d>",
                "usage": {"prompt_tokens": 10, "completion_tokens": 5}, "latency_s": 0.1 + i % 7,
            }) + b"\n")
    failures = folder / "big_20261122_101500_failures.jsonl"
    failures.write_bytes(b"".join(orjson.dumps({
        "index": n + i, "key": f"bad{i}", "error": {
            "kind": "extraction" if i % 3 else "rate_limit",
            "message": f"no <draft> block in response {i}" if i % 3 else "429 again"}}) + b"\n"
        for i in range(30)))
    (folder / "big_20261122_101500_manifest.json").write_bytes(orjson.dumps(
        {"cost_usd": 1.25, "model": "openai/gpt-4o-mini"}))
    return results


def test_report_data_counts_and_groups(tmp_path: Path) -> None:
    data = report_data(make_run(tmp_path, 200))
    assert data["records"] == 200 and data["failed"] == 30
    assert data["prompt_tokens"] == 2000 and data["completion_tokens"] == 1000
    assert dict(data["reasons"]) == {"extraction: no <draft> block in response N": 20,
                                     "rate_limit: N again": 10}
    assert sum(data["latency"]["counts"]) == 200


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM, "chromium is missing: .ci/run installs the Debian package"
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--disable-background-networking", "--no-first-run", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=30000",
         *args], capture_output=True, text=True, timeout=180)


@needs_chromium
def test_a_100k_record_report_in_headless_chromium(tmp_path: Path) -> None:
    results = make_run(tmp_path, 100_000)
    report = write_report(results)
    assert report.suffix == ".html" and "http" not in re.sub(
        r'"[^"]*"', "", report.read_text()[:4000])  # no external resources in the page head
    url = report.as_uri() + "#q=key042424"
    dom = chromium("--dump-dom", url, profile=tmp_path / "profile1").stdout
    assert re.search(r'id="total-records">100000<', dom)
    assert re.search(r'id="total-failed">30<', dom)
    assert re.search(r'id="cost">\$1\.2500<', dom)
    assert "1 matching" in dom  # the search found the known record, and only it
    rendered = re.findall(r'<tr class="record ok" data-key="(key\d+)"', dom)
    assert rendered == ["key042424"]
    assert "Text number 42424 about things." in dom
    # without a search, one page of rows is rendered, not 100,000
    full = chromium("--dump-dom", report.as_uri(), profile=tmp_path / "profile2").stdout
    assert "100030 matching" in full  # every item: the 30 failed ones too
    assert len(re.findall(r'<tr class="record ok" data-key="key\d+"', full)) == 50
    shot = tmp_path / "report.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,1000", url,
             profile=tmp_path / "profile3")
    assert shot.exists() and shot.stat().st_size > 10_000


def test_report_command(tmp_path: Path) -> None:
    results = make_run(tmp_path, 10)
    out = subprocess.run([str(Path(sys.executable).parent / "datagen"), "report", str(tmp_path),
                          "--out", str(tmp_path / "r.html")], capture_output=True, text=True)
    assert out.returncode == 0 and (tmp_path / "r.html").read_text().count("key000009") == 1
    assert results.exists()
