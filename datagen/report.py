"""``datagen report``: one self-contained HTML file to read a run before training on it.

Counts, success and failure rates, token and cost totals, latency and length
histograms, a searchable, paged table of every item (inputs, rendered prompt, raw
response, parsed output, per step; the failed and dropped ones too, with why, filterable
by status), and failures grouped by reason. Inline CSS and JS,
no network: the file can be mailed or opened offline. The records are embedded as JSON
(long fields shortened) and the page renders one page of rows at a time, so 100,000
records stay fast; the search runs over all of them.
"""

from __future__ import annotations

import html
import re
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from datagen.export import records, results_file

FIELD_CHARS = 1200
PAGE_SIZE = 50


def _short(value: Any, limit: int = FIELD_CHARS) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _prompt(messages: Any, prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(messages, list):
        return "\n\n".join(f"[{m.get('role')}] {m.get('content')}" for m in messages
                           if isinstance(m, dict))
    return ""


def _row(record: dict[str, Any], status: str = "ok", why: str = "") -> dict[str, Any]:
    """One table row: short strings only. ``status``: ok, failed or dropped (and why)."""
    if "steps" in record:
        inputs = record.get("item", {})
        steps = [{"name": name, "prompt": _short(_prompt(t.get("messages"), t.get("prompt"))),
                  "raw": _short(t.get("raw_response", "")), "output": _short(t.get("output"))}
                 for name, t in record["steps"].items()]
    else:
        inputs = {"user": record.get("user_prompt_kwargs"),
                  "system": record.get("system_prompt_kwargs")}
        steps = [{"name": "output", "prompt": _short(_prompt(record.get("messages"), None)),
                  "raw": _short(record.get("raw_response", "")),
                  "output": _short(record.get("output", ""))}]
    return {"i": record.get("index"), "k": record.get("key", ""), "in": _short(inputs, 600),
            "s": steps, "st": status, "why": _short(why, 400)}


def _lines(path: Path) -> list[dict[str, Any]]:
    """The readable lines of a failures or dropped file (none when it does not exist)."""
    out = []
    if path.exists():
        for line in path.read_bytes().splitlines():
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(value, dict):
                out.append(value)
    return out


def _order(row: dict[str, Any]) -> tuple[int, str]:
    index = row["i"]
    return (index if isinstance(index, int) else 1 << 62, str(row["k"]))


def _histogram(values: list[float], bins: int = 20) -> dict[str, Any]:
    if not values:
        return {"lo": 0, "hi": 0, "counts": []}
    lo, hi = min(values), max(values)
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - lo) / width))] += 1
    return {"lo": lo, "hi": hi, "counts": counts}


def _reason(error: dict[str, Any]) -> str:
    message = re.sub(r"\d+", "N", str(error.get("message", "")))  # group like with like
    return f"{error.get('step', '')} {error.get('kind', '')}: {message[:140]}".strip()


def report_data(source: str | Path) -> dict[str, Any]:
    results = results_file(source)
    rows, latencies, lengths = [], [], []
    prompt_tokens = completion_tokens = 0
    for record in records(results):
        rows.append(_row(record))
        traces = list(record.get("steps", {}).values()) or [record]
        for trace in traces:
            usage = trace.get("usage") or {}
            prompt_tokens += int(usage.get("prompt_tokens", 0))
            completion_tokens += int(usage.get("completion_tokens", 0))
        latencies.append(sum(float(t.get("latency_s") or 0) for t in traces))
        output = record.get("output")
        lengths.append(len(output if isinstance(output, str) else orjson.dumps(output)))
    succeeded = len(rows)
    reasons: Counter[str] = Counter()
    failures = _lines(results.with_name(results.stem + "_failures.jsonl"))
    for failure in failures:
        found = failure.get("error")
        error: dict[str, Any] = found if isinstance(found, dict) else {}
        reasons[_reason(error)] += 1
        why = f"{error.get('step', failure.get('step', ''))} {error.get('kind', '')}: " \
              f"{error.get('message', '')}".strip()
        rows.append(_row(failure, "failed", why))
    dropped = _lines(results.with_name(results.stem + "_dropped.jsonl"))
    rows += [_row(d, "dropped", f"{d.get('step', '')}: {d.get('reason', '')}") for d in dropped]
    rows.sort(key=_order)
    manifest_path = results.with_name(results.stem + "_manifest.json")
    manifest = orjson.loads(manifest_path.read_bytes()) if manifest_path.exists() else {}
    total = succeeded + len(failures)
    return {
        "title": results.name, "records": succeeded, "failed": len(failures),
        "dropped": len(dropped),
        "success_rate": succeeded / total if total else None,
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "cost_usd": manifest.get("cost_usd"), "model": manifest.get("model", ""),
        "latency": _histogram(latencies), "length": _histogram([float(n) for n in lengths]),
        "reasons": reasons.most_common(), "rows": rows, "page_size": PAGE_SIZE,
        "batches": _batches(manifest),
    }


BATCH_COLUMNS = ("seq", "id", "step", "status", "requests", "completed", "failed", "expired",
                 "cancelled", "missing", "waiting", "sent_again", "failed_for_good")


def _batches(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """Batch mode: each batch's counts, the cost beside online, the explanation."""
    section = manifest.get("batches")
    if not isinstance(section, dict) or not section.get("batches"):
        return None
    return {"columns": BATCH_COLUMNS,
            "rows": [[row.get(c) for c in BATCH_COLUMNS] for row in section["batches"]],
            "cost": section.get("cost") or {}, "explanation": section.get("explanation", [])}


def write_report(source: str | Path, out: str | Path | None = None) -> Path:
    """Write the report; returns its path (default: beside the results, ``.html``)."""
    data = report_data(source)
    target = Path(out) if out else results_file(source).with_suffix(".html")
    payload = orjson.dumps(data).decode().replace("</", "<\\/")  # safe inside <script>
    page = PAGE.replace("__TITLE__", html.escape(data["title"])).replace("__DATA__", payload)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(target)
    return target


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>datagen report: __TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 12px}h2{font-size:16px;margin:24px 0 8px}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{background:#fff;border:1px solid #ddd;
border-radius:8px;padding:10px 14px;min-width:120px}.card b{display:block;font-size:20px}
.hists{display:flex;gap:24px;flex-wrap:wrap}svg{background:#fff;border:1px solid #ddd}
table{border-collapse:collapse;width:100%;background:#fff}td,th{border:1px solid #ddd;
padding:6px;vertical-align:top;text-align:left}pre{white-space:pre-wrap;margin:0;
max-height:220px;overflow:auto;font:12px/1.4 ui-monospace,monospace}
.bar{fill:#4a78c2}#search{padding:6px;width:320px}.pager button{margin:0 4px}
.muted{color:#777}tr.failed td.why{color:#a11}tr.dropped td.why{color:#a60}
</style></head><body>
<h1>datagen report: __TITLE__</h1>
<div class="cards" id="cards"></div>
<div class="hists"><div><h2>Latency per record (s)</h2><svg id="h-latency" width="420"
height="140"></svg></div><div><h2>Output length (characters)</h2><svg id="h-length"
width="420" height="140"></svg></div></div>
<div id="batches"></div>
<h2>Failures by reason</h2><table id="reasons"><tbody></tbody></table>
<h2>Records</h2>
<p><input id="search" type="search" placeholder="search inputs, prompts, responses, keys">
<select id="status"><option value="">all items</option><option value="ok">ok</option>
<option value="failed">failed</option><option value="dropped">dropped</option></select>
<span id="match-count" class="muted"></span></p>
<p class="pager"><button id="prev">previous</button><span id="page"></span>
<button id="next">next</button></p>
<table id="rows"><thead><tr><th>#</th><th>status</th><th>inputs</th><th>step</th>
<th>prompt</th><th>raw response</th><th>output</th></tr></thead><tbody></tbody></table>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",
  '"':"&quot;"}[c]));
function card(label, value, id) { return `<div class="card"><span class="muted">${label}
  </span><b id="${id}">${value}</b></div>`; }
document.getElementById("cards").innerHTML =
  card("records", D.records, "total-records") + card("failed", D.failed, "total-failed") +
  card("dropped", D.dropped, "total-dropped") +
  card("success rate", D.success_rate === null ? "-" : (100 * D.success_rate).toFixed(2) +
       "%", "success-rate") +
  card("prompt tokens", D.prompt_tokens, "prompt-tokens") +
  card("completion tokens", D.completion_tokens, "completion-tokens") +
  card("cost", D.cost_usd === null || D.cost_usd === undefined ? "unknown" :
       "$" + D.cost_usd.toFixed(4), "cost") + card("model", esc(D.model || "-"), "model");
function hist(id, h) {
  const svg = document.getElementById(id), n = h.counts.length, max = Math.max(1, ...h.counts);
  let out = "";
  h.counts.forEach((c, i) => { const bh = 110 * c / max;
    out += `<rect class="bar" x="${10 + i * 400 / n}" y="${120 - bh}" width="${400 / n - 2}"
      height="${bh}"><title>${c}</title></rect>`; });
  out += `<text x="10" y="136" font-size="11">${(+h.lo).toFixed(2)}</text>
    <text x="360" y="136" font-size="11">${(+h.hi).toFixed(2)}</text>`;
  svg.innerHTML = out;
}
hist("h-latency", D.latency); hist("h-length", D.length);
if (D.batches) { const B = D.batches, c = B.cost || {};
  document.getElementById("batches").innerHTML = "<h2>Batches</h2><table id='batch-table'>" +
    "<thead><tr>" + B.columns.map(h => `<th>${esc(h)}</th>`).join("") + "</tr></thead>" +
    "<tbody>" + B.rows.map(r => "<tr>" + r.map(v => `<td>${esc(v === null ? "-" : v)}</td>`)
    .join("") + "</tr>").join("") + "</tbody></table>" + (c.batch_usd != null ?
    `<p>cost $${c.batch_usd.toFixed(4)} through batches; online $${(c.online_usd || 0)
    .toFixed(4)}</p>` : "") + B.explanation.map(x => `<p class="muted">${esc(x)}</p>`)
    .join(""); }
document.querySelector("#reasons tbody").innerHTML = D.reasons.length ?
  D.reasons.map(([r, c]) => `<tr><td>${c}</td><td>${esc(r)}</td></tr>`).join("") :
  "<tr><td class='muted'>no failures</td></tr>";
let hay = null, matches = D.rows.map((_, i) => i), page = 0;
function haystack() {
  if (hay === null) hay = D.rows.map(r => (r.k + " " + r.in + " " + r.why + " " +
    r.s.map(s => s.prompt + " " + s.raw + " " + s.output).join(" ")).toLowerCase());
  return hay;
}
function search(q, status) {
  q = q.trim().toLowerCase();
  matches = [];
  const h = q ? haystack() : null;
  for (let i = 0; i < D.rows.length; i++)
    if ((!status || D.rows[i].st === status) && (!q || h[i].includes(q))) matches.push(i);
  page = 0; render();
}
function render() {
  const pages = Math.max(1, Math.ceil(matches.length / D.page_size));
  page = Math.min(page, pages - 1);
  document.getElementById("match-count").textContent = matches.length + " matching";
  document.getElementById("page").textContent = `page ${page + 1} of ${pages}`;
  const rows = matches.slice(page * D.page_size, (page + 1) * D.page_size).map(i => {
    const r = D.rows[i];
    return r.s.map((s, j) => `<tr class="record ${r.st}" data-key="${esc(r.k)}"
      data-status="${r.st}">` + (j === 0 ?
      `<td rowspan="${r.s.length}">${r.i}<br><span class="muted">${esc(r.k)}</span></td>
       <td rowspan="${r.s.length}" class="why"><b>${r.st}</b><br>${esc(r.why)}</td>
       <td rowspan="${r.s.length}"><pre>${esc(r.in)}</pre></td>` : "") +
      `<td>${esc(s.name)}</td><td><pre>${esc(s.prompt)}</pre></td><td><pre>${esc(s.raw)}
      </pre></td><td><pre>${esc(s.output)}</pre></td></tr>`).join("");
  });
  document.querySelector("#rows tbody").innerHTML = rows.join("");
}
const box = document.getElementById("search"), pick = document.getElementById("status");
let timer = null;
box.addEventListener("input", () => { clearTimeout(timer);
  timer = setTimeout(() => search(box.value, pick.value), 150); });
pick.addEventListener("change", () => search(box.value, pick.value));
document.getElementById("prev").onclick = () => { page = Math.max(0, page - 1); render(); };
document.getElementById("next").onclick = () => { page++; render(); };
const hash = new URLSearchParams(location.hash.slice(1));
box.value = hash.get("q") || ""; pick.value = hash.get("status") || "";
if (box.value || pick.value) { search(box.value, pick.value); } else { render(); }
</script></body></html>
"""
