"""Reading folders, chunking by tokens, the chunk cache, seeded subsets."""

from __future__ import annotations

import itertools
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datagen.ingest import ChunkCache, IngestError, chunk_spans, chunks, read_documents
from datagen.tokens import count_tokens

SENTENCE = "The quick brown fox jumps over the lazy dog near the quiet river bank. "


def corpus(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("First paragraph about bees.\n\nSecond paragraph about honey.")
    (root / "sub" / "b.md").write_text("# Title\n\n" + SENTENCE * 40)
    (root / "c.jsonl").write_text(orjson.dumps({"text": "Line one text."}).decode() + "\n"
                                  + orjson.dumps({"text": "Line two text."}).decode() + "\n")
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    return root


def test_reads_a_folder_recursively(tmp_path: Path) -> None:
    docs = list(read_documents(corpus(tmp_path)))
    assert [Path(d.source.split("#")[0]).name for d in docs] == ["a.txt", "c.jsonl",
                                                                  "c.jsonl", "b.md"]
    assert docs[1].text == "Line one text." and docs[1].source.endswith("c.jsonl#0")


def test_unreadable_files_are_named_before_anything_is_read(tmp_path: Path) -> None:
    corpus(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"no_text": 1}\n')
    with pytest.raises(IngestError) as err:
        list(read_documents(tmp_path))
    assert "latin1.txt: not UTF-8" in str(err.value)
    assert "bad.jsonl: entry 1 has no 'text'" in str(err.value)
    with pytest.warns(UserWarning) as caught:
        assert len(list(read_documents(tmp_path, on_error="skip"))) == 4
    named = " ".join(str(w.message) for w in caught)
    assert "latin1.txt" in named and "bad.jsonl" in named


def test_pdf_without_the_extra_says_which_extra(tmp_path: Path) -> None:
    pytest.importorskip("pytest")  # always present; the point is the message below
    (tmp_path / "doc.pdf").write_bytes(b"%PDF-1.4 not really")
    with pytest.raises(IngestError, match=r"doc\.pdf: (reading PDF needs the docs extra|"
                                          r"cannot read this PDF)"):
        list(read_documents(tmp_path))


def test_chunks_are_exact_slices_with_paragraph_breaks(tmp_path: Path) -> None:
    corpus(tmp_path)
    out = list(chunks(tmp_path, chunk_size=50, cache_dir=None))
    texts = {Path(d.source.split("#")[0]).name + d.source[-2:]: d.text
             for d in read_documents(tmp_path)}
    for chunk in out:
        name = Path(chunk["source"].split("#")[0]).name + chunk["source"][-2:]
        assert texts[name][chunk["start"]:chunk["end"]] == chunk["text"]
        assert chunk["tokens"] <= 50
    first = out[0]
    assert first["text"] == "First paragraph about bees.\n\nSecond paragraph about honey."
    long_doc = [c for c in out if c["source"].endswith("b.md")]
    assert len(long_doc) > 5  # the oversized paragraph was split at sentence ends
    assert all(c["text"].endswith(".") for c in long_doc[1:])


def test_a_sentence_longer_than_a_chunk_is_split_by_tokens() -> None:
    text = "word " * 300
    spans = chunk_spans(text, 40)
    assert len(spans) >= 7
    assert all(count_tokens(text[a:b]) <= 41 for a, b in spans)
    assert "".join(text[a:b] for a, b in spans).split() == text.split()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(alphabet="abc de.\n", min_size=1, max_size=120), min_size=1,
                max_size=12), st.integers(min_value=8, max_value=60))
def test_chunking_keeps_every_word_in_order(paragraphs: list[str], size: int) -> None:
    text = "\n\n".join(paragraphs)
    spans = chunk_spans(text, size)
    assert all(0 <= a < b <= len(text) for a, b in spans)
    assert all(b1 <= a2 for (_, b1), (a2, _) in itertools.pairwise(spans))
    assert " ".join(text[a:b] for a, b in spans).split() == text.split()


def test_editing_one_file_rechunks_only_that_file(tmp_path: Path) -> None:
    docs = corpus(tmp_path / "in")
    cache = ChunkCache(tmp_path / "cache")
    list(chunks(docs, chunk_size=50, cache=cache))
    assert cache.hits == 0 and cache.misses == 4
    (docs / "a.txt").write_text("Edited paragraph.\n\nAnother one.")
    again = ChunkCache(tmp_path / "cache")
    out = list(chunks(docs, chunk_size=50, cache=again))
    assert again.misses == 1 and again.hits == 3
    assert out[0]["text"] == "Edited paragraph.\n\nAnother one."
    other_size = ChunkCache(tmp_path / "cache")
    list(chunks(docs, chunk_size=60, cache=other_size))
    assert other_size.misses == 4  # the chunk size is part of the key


def test_seeded_subset_is_repeatable(tmp_path: Path) -> None:
    docs = corpus(tmp_path)
    def ids(**kw: object) -> list[tuple[str, int]]:
        return [(c["source"], c["start"]) for c in chunks(docs, chunk_size=20, cache_dir=None,
                                                          **kw)]  # type: ignore[arg-type]

    every = ids()
    pick = ids(subset_size=5, seed=1)
    assert len(pick) == 5 and pick == ids(subset_size=5, seed=1)
    assert pick != ids(subset_size=5, seed=2)
    assert pick == [c for c in every if c in pick]  # in document order


def test_chunks_are_a_data_pool(tmp_path: Path) -> None:
    from datagen import DataGenerationPipeline
    from datagen.testing import FakeOpenAIServer

    docs = corpus(tmp_path / "in")
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "poem.txt").write_text("Write a poem about: {{ text }}")
    (tmp_path / "config.yaml").write_text(
        "model: {provider: openai, model: m, max_retries: 0}\nrun: {progress: false}\n"
        f"output_data: {{output_dir: {tmp_path}/out}}\n")
    with FakeOpenAIServer(responder=lambda body: "A poem.") as server:
        p = (DataGenerationPipeline(config=tmp_path / "config.yaml", base_url=server.base_url)
             .step("poem", prompt="poem.txt"))
        results = p.run_sync(chunks(docs, chunk_size=50, cache_dir=None))
    assert len(results) == len(list(chunks(docs, chunk_size=50, cache_dir=None)))
    assert results[0]["item"]["source"].endswith("a.txt")


def test_docx_with_the_docs_extra(tmp_path: Path) -> None:
    docx = pytest.importorskip("docx")
    document = docx.Document()
    document.add_paragraph("First paragraph of the report.")
    document.add_paragraph("Second paragraph, with more detail.")
    document.save(str(tmp_path / "report.docx"))
    (doc,) = read_documents(tmp_path)
    assert doc.text == "First paragraph of the report.\n\nSecond paragraph, with more detail."
    (chunk,) = chunks(tmp_path, chunk_size=100, cache_dir=None)
    assert chunk["text"] == doc.text


def test_pdf_with_the_docs_extra(tmp_path: Path) -> None:
    pypdf = pytest.importorskip("pypdf")
    writer = pypdf.PdfWriter()
    writer.add_blank_page(width=200, height=200)
    with open(tmp_path / "blank.pdf", "wb") as fh:
        writer.write(fh)
    (doc,) = read_documents(tmp_path)  # a PDF without text reads as empty, not an error
    assert doc.source.endswith("blank.pdf") and doc.text.strip() == ""
    assert list(chunks(tmp_path, chunk_size=50, cache_dir=None)) == []


def test_a_folder_moved_elsewhere_gives_the_same_keys(tmp_path: Path) -> None:
    """A chunk's source is part of its content, hence of its key (resume, the cache, the
    prompt variation it gets, its cluster shard): it must not say where the folder lives.
    (The varied_rewrites example picked other variations in a fresh clone at another path
    and missed its cassette.)"""
    from datagen.pool import plain_item

    here, there = corpus(tmp_path / "here" / "docs"), corpus(tmp_path / "elsewhere" / "x")
    keys = [[plain_item(i, item).content_key for i, item in
             enumerate(chunks(root, chunk_size=20, cache_dir=None))] for root in (here, there)]
    assert keys[0] == keys[1] and len(keys[0]) >= 3
    sources = {c["source"] for c in chunks(here, chunk_size=20, cache_dir=None)}
    assert all(not s.startswith("/") and str(tmp_path) not in s for s in sources), sources
    one_file = next(p for p in sorted(here.rglob("*.txt")))
    (single,) = {c["source"] for c in chunks(one_file, chunk_size=1000, cache_dir=None)}
    assert single == one_file.name
