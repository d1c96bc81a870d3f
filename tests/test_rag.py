"""RAG file QA (medgpt/rag, tools/chatpdf.py, --rag_docs in the servers) on the sample documents of data/rag:
six short medical documents written for this project (.md, .txt, .pdf, .docx; English and Chinese), where each
question's answer is in one document only."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import ROOT, build_tiny_model, free_port, running_server

SAMPLES = ROOT / "data" / "rag"

# question, the one document that answers it, a phrase of the answer
QUESTIONS = [
    ("How much sodium a day should adults with hypertension eat?", "hypertension.md", "2,300 mg"),
    ("When should oseltamivir be started for the flu?", "influenza.txt", "48 hours"),
    ("How often can I use my rescue inhaler before my asthma counts as not well controlled?", "asthma.pdf",
     "twice a week"),
    ("What ferritin level confirms low iron stores?", "anaemia.docx", "30 ng/mL"),
    ("糖尿病的空腹血糖诊断标准是多少？", "diabetes_zh.md", "7.0 mmol/L"),
    ("痛风急性发作时可以用什么药？", "gout_zh.txt", "秋水仙碱"),
    ("发生低血糖时应该吃多少糖？", "diabetes_zh.md", "15克"),
]


def write_text_pdf(path, pages, password=None):
    """A PDF with one Helvetica text line per entry of each page, written with pypdf (Latin-1 text only)."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    font = writer._add_object(DictionaryObject({NameObject("/Type"): NameObject("/Font"),
                                                NameObject("/Subtype"): NameObject("/Type1"),
                                                NameObject("/BaseFont"): NameObject("/Helvetica")}))
    for lines in pages:
        page = writer.add_blank_page(612, 792)
        esc = [line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") for line in lines]
        stream = DecodedStreamObject()
        stream.set_data("\n".join(["BT", "/F1 11 Tf", "14 TL", "72 740 Td"] + [f"({x}) Tj T*" for x in esc]
                                  + ["ET"]).encode("latin-1"))
        page[NameObject("/Contents")] = writer._add_object(stream)
        page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})})
    if password:
        writer.encrypt(password, algorithm="RC4-128")
    with open(path, "wb") as f:
        writer.write(f)


@pytest.fixture()
def docs(tmp_path):
    """A copy of the sample documents (tests change them)."""
    return str(shutil.copytree(SAMPLES, tmp_path / "docs"))


@pytest.fixture(scope="module")
def sample_index(tmp_path_factory):
    from medgpt.rag import DocumentIndex, DocumentQA

    docs = shutil.copytree(SAMPLES, tmp_path_factory.mktemp("rag") / "docs")
    return DocumentQA(DocumentIndex.build([str(docs)], str(docs.parent / "index")), top_k=3)


# ------------------------------------------------------------------------------------------------
def test_each_answer_is_in_one_document_only():
    from medgpt.rag import read_document

    texts = {p.name: "\n".join(s.text for s in read_document(str(p))) for p in SAMPLES.iterdir()}
    assert sorted(texts) == ["anaemia.docx", "asthma.pdf", "diabetes_zh.md", "gout_zh.txt", "hypertension.md",
                             "influenza.txt"]
    for _, doc, phrase in QUESTIONS:
        assert [name for name, text in texts.items() if phrase in text] == [doc]


@pytest.mark.parametrize("question,doc,phrase", QUESTIONS, ids=[q[1] + "-" + q[2] for q in QUESTIONS])
def test_bm25_ranks_the_answer_chunk_first(sample_index, question, doc, phrase):
    sources = sample_index.sources(question)
    assert sources[0].file == doc, [s.label() for s in sources]
    assert phrase in sources[0].chunk.text


def test_chunks_overlap_and_know_their_lines_and_pages(sample_index):
    from medgpt.rag import chunk_sections, read_document, split_spans

    text = (SAMPLES / "hypertension.md").read_text(encoding="utf-8")
    spans = split_spans(text, 250, 50)
    assert all(0 < e - s <= 250 for s, e in spans)
    assert all(s2 < e1 for (_, e1), (s2, _) in zip(spans, spans[1:]))  # each chunk shares text with the previous
    assert all(e1 - s2 <= 50 for (_, e1), (s2, _) in zip(spans, spans[1:]))
    assert "".join(text[s:e] for s, e in spans).replace(" ", "").replace("\n", "") != ""  # covers the text:
    covered = set()
    for s, e in spans:
        covered.update(range(s, e))
    assert all(i in covered or text[i].isspace() for i in range(len(text)))
    chunks = chunk_sections("x.md", read_document(str(SAMPLES / "hypertension.md")), 250, 50)
    lines = text.split("\n")
    for c in chunks:
        assert c.text.splitlines()[0] in lines[c.line_start - 1] and c.text.splitlines()[-1] in lines[c.line_end - 1]
    pdf = [c for c in sample_index.index.chunks if c.file.endswith("asthma.pdf")]
    assert {c.page for c in pdf} == {1, 2}
    rescue = next(c for c in pdf if "twice a week" in c.text)
    assert rescue.page == 2 and rescue.location().startswith("page 2, lines ")
    # Chinese text is cut at sentence ends (。), not in the middle of a word
    zh = [c for c in sample_index.index.chunks if c.file.endswith("diabetes_zh.md")]
    assert len(zh) > 1 and all(c.text[-1] in "。：\n）%" or c is zh[-1] for c in zh), [c.text[-3:] for c in zh]


def test_cache_rereads_only_changed_files(docs, tmp_path):
    from medgpt.rag import DocumentIndex

    index_dir = str(tmp_path / "index")
    first = DocumentIndex.build([docs], index_dir)
    assert (first.stats.read, first.stats.reused, first.stats.bm25_rebuilt) == (6, 0, True)
    again = DocumentIndex.build([docs], index_dir)
    assert (again.stats.read, again.stats.reused, again.stats.bm25_rebuilt) == (6 - 6, 6, False)
    assert [c.text for c in again.chunks] == [c.text for c in first.chunks]

    flu = os.path.join(docs, "influenza.txt")
    os.utime(flu, (time.time() + 5, time.time() + 5))  # touched, same content: the hash says unchanged
    assert DocumentIndex.build([docs], index_dir).stats.read == 0
    with open(flu, "a", encoding="utf-8") as f:
        f.write("\nChildren and teenagers with the flu must not take aspirin because of Reye syndrome.\n")
    changed = DocumentIndex.build([docs], index_dir)
    assert (changed.stats.read, changed.stats.reused, changed.stats.bm25_rebuilt) == (1, 5, True)
    from medgpt.rag import DocumentQA
    top = DocumentQA(changed).sources("Why must teenagers not take aspirin?")[0]
    assert top.file == "influenza.txt" and "Reye" in top.chunk.text

    os.remove(os.path.join(docs, "gout_zh.txt"))
    removed = DocumentIndex.build([docs], index_dir)
    assert removed.stats.documents == 5 and removed.stats.bm25_rebuilt
    assert not any(c.file.endswith("gout_zh.txt") for c in removed.chunks)
    assert DocumentIndex.build([docs], index_dir, chunk_size=120, chunk_overlap=20).stats.read == 5  # new sizes


def test_bad_documents_are_counted_skips_with_one_line_each(tmp_path, caplog):
    from medgpt.rag import DocumentIndex, DocumentQA

    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(SAMPLES / "hypertension.md", folder)
    write_text_pdf(folder / "locked.pdf", [["Secret: the cure for gout is in here."]], password="s3cret")
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf\n")
    (folder / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00")
    (folder / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (folder / "gbk.md").write_bytes("# 高血压\n\n高血压患者的饮食\n".encode("gbk"))
    (folder / "fake.docx").write_text("not a zip", encoding="utf-8")
    (folder / "empty.md").write_text("\n  \n", encoding="utf-8")
    write_text_pdf(folder / "scan.pdf", [[]])  # a page without text, as a scanned PDF
    (folder / "photo.png").write_bytes(b"\x89PNG")
    with caplog.at_level(logging.WARNING):
        index = DocumentIndex.build([str(folder)], str(tmp_path / "index"))
    assert (index.stats.documents, index.stats.skipped, index.stats.other_files) == (1, 8, 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 8 and all("\n" not in w for w in warnings)
    expect = {"locked.pdf": "encrypted PDF (it needs a password)", "broken.pdf": "unreadable PDF",
              "binary.txt": "a binary file, not text", "latin1.txt": ":1: not UTF-8 text", "gbk.md": ":1: not UTF-8 text",
              "fake.docx": "not a readable .docx file", "empty.md": "no text", "scan.pdf": "no text (a scanned PDF"}
    for name, what in expect.items():
        assert any(name in w and what in w for w in warnings), (name, warnings)
    assert DocumentQA(index).sources("cure for gout") == []  # the locked PDF's text is not in the index


def test_empty_folder_and_nothing_usable_are_one_line_errors(tmp_path):
    from medgpt.data.io import DataError
    from medgpt.rag import DocumentIndex

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no \.txt, \.md, \.pdf or \.docx documents found"):
        DocumentIndex.build([str(tmp_path / "empty")], str(tmp_path / "i1"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.txt").write_bytes(b"\x00\x01")
    with pytest.raises(DataError, match=r"none of the 1 documents has usable text \(1 skipped"):
        DocumentIndex.build([str(tmp_path / "bad")], str(tmp_path / "i2"))
    with pytest.raises(DataError, match="nope: no such file or directory"):
        DocumentIndex.build([str(tmp_path / "nope")], str(tmp_path / "i3"))
    with pytest.raises(DataError, match="0 <= overlap < size"):
        DocumentIndex.build([str(SAMPLES)], str(tmp_path / "i4"), chunk_size=100, chunk_overlap=100)


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory, smol_tokenizer) -> str:
    """A tiny random BERT encoder (with the SmolLM2 tokenizer): real vectors, no meaning."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(BertConfig(vocab_size=len(smol_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512)).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return str(path)


def test_reciprocal_rank_fusion():
    from medgpt.rag import reciprocal_rank_fusion

    hits = reciprocal_rank_fusion({"bm25": [3, 1, 2], "dense": [1, 4, 3]})
    assert [h.index for h in hits] == [1, 3, 4, 2]  # in both lists near the top beats first in one
    assert hits[0].ranks == {"bm25": 2, "dense": 1}
    assert hits[0].score == pytest.approx(1 / 62 + 1 / 61)


@pytest.mark.parametrize("encoder", ["bert", "llama"])
def test_dense_retrieval_fused_with_bm25_and_cached(encoder, docs, tmp_path, tiny_encoder_dir, tiny_model_dir):
    from medgpt.rag import DocumentIndex, DocumentQA

    model = tiny_encoder_dir if encoder == "bert" else tiny_model_dir  # AutoModel: the Llama without its head
    index = DocumentIndex.build([docs], str(tmp_path / "index"), embedding_model=model, device="cpu")
    assert index.stats.vectors_computed == len(index.chunks) and index.vectors.shape[0] == len(index.chunks)
    target = next(c for c in index.chunks if "twice a week" in c.text)
    hits = index.search(target.text, top_k=3)  # the same text gives the same vector: dense rank 1
    assert index.chunks[hits[0].index] is target and hits[0].ranks == {"bm25": 1, "dense": 1}
    # a question: fused hits keep the ranks of both retrievers, and the BM25 answer chunk is among them
    sources = DocumentQA(index, top_k=5).sources(QUESTIONS[0][0])
    assert any(s.file == "hypertension.md" and "2,300 mg" in s.chunk.text for s in sources)
    again = DocumentIndex.build([docs], str(tmp_path / "index"), embedding_model=model, device="cpu")
    assert again.stats.vectors_computed == 0 and (again.vectors == index.vectors).all()
    with open(os.path.join(docs, "influenza.txt"), "a", encoding="utf-8") as f:
        f.write("\nA new paragraph about flu shots for people with egg allergy: they are safe.\n")
    changed = DocumentIndex.build([docs], str(tmp_path / "index"), embedding_model=model, device="cpu")
    assert 0 < changed.stats.vectors_computed < len(changed.chunks)  # only the changed file's chunks


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_chat(tiny_model_dir):
    from medgpt.generation import ChatModel

    return ChatModel(tiny_model_dir, device="cpu", template_name="chatml")


@pytest.mark.parametrize("question,doc,phrase", [QUESTIONS[0], QUESTIONS[4]], ids=["english", "chinese"])
def test_answer_prompt_holds_the_passages_and_the_answer_shows_its_source(sample_index, tiny_chat, question, doc,
                                                                          phrase):
    from medgpt.generation import GenerationOptions
    from medgpt.rag import format_sources, mark_cited

    prompt, sources = sample_index.prompt(tiny_chat, question, max_new_tokens=8)
    assert prompt.startswith("<|im_start|>") and question in prompt
    assert f"[1] ({doc}, {sources[0].chunk.location()})\n" in prompt and phrase in prompt
    assert ("已知内容" in prompt) == (doc == "diabetes_zh.md")  # MedicalGPT's Chinese prompt for a Chinese question
    answer = tiny_chat.complete([prompt], GenerationOptions(max_new_tokens=8, temperature=0))[0].text
    shown = format_sources(mark_cited(sources, answer + " see [1]"))
    assert shown.splitlines()[0] == "Sources:"
    assert shown.splitlines()[1] == f"  [1] {doc} ({sources[0].chunk.location()}) (cited)"


def test_passages_that_do_not_fit_the_context_are_left_out(sample_index, tiny_chat):
    from medgpt.rag import DocumentQA

    qa = DocumentQA(sample_index.index, top_k=10)
    question = "What should I know about blood pressure, salt and exercise?"
    _, all_sources = qa.prompt(tiny_chat, question, max_new_tokens=8)
    prompt, fitted = qa.prompt(tiny_chat, question, max_new_tokens=tiny_chat.context_length - 300)
    assert 0 < len(fitted) < len(all_sources) and fitted == all_sources[:len(fitted)]
    assert tiny_chat.count_tokens(prompt) <= 300


def test_chinese_note_only_for_the_embedded_model():
    from medgpt.rag import chinese_note

    assert "English-only" in chinese_note(None, None, "高血压怎么办？")
    assert chinese_note(None, None, "What is hypertension?") is None
    assert chinese_note("/models/qwen", None, "高血压怎么办？") is None


# ------------------------------------------------------------------------------------------------
def run_chatpdf(*args: str, stdin: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "chatpdf.py"), *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))


def sources_after(stdout: str, question: str) -> list[str]:
    block = stdout.split(f"Question: {question}", 1)[1].split("Sources:\n", 1)[1]
    return [line.strip() for line in block.splitlines() if line.startswith("  [")]


def test_cli_answers_english_and_chinese_questions_with_their_sources(docs, tmp_path, tiny_model_dir):
    en, zh = QUESTIONS[2], QUESTIONS[5]
    proc = run_chatpdf("--docs_dir", docs, "--index_dir", str(tmp_path / "index"), "--base_model", tiny_model_dir,
                       "--template_name", "chatml", "--query", en[0], "--query", zh[0], "--max_new_tokens", "6",
                       "--temperature", "0", "--top_k", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Answer: ") == 2 and "English-only" not in proc.stdout
    first_en, first_zh = sources_after(proc.stdout, en[0])[0], sources_after(proc.stdout, zh[0])[0]
    assert first_en.startswith("[1] asthma.pdf (page 2, lines "), proc.stdout
    assert first_zh.startswith("[1] gout_zh.txt (lines "), proc.stdout
    assert "Indexed 6 documents" in proc.stderr and "(6 read, 0 from the cache" in proc.stderr


def test_cli_interactive_and_the_cached_index(docs, tmp_path):
    index_dir = str(tmp_path / "index")
    questions = "\n".join([QUESTIONS[1][0], QUESTIONS[6][0], "exit"]) + "\n"
    for run in range(2):
        proc = run_chatpdf("--corpus_files", f"{docs}/influenza.txt,{docs}/diabetes_zh.md", "--index_dir", index_dir,
                           "--interactive", "--retrieve_only", stdin=questions)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Ask about the 2 documents" in proc.stdout
        assert sources_after(proc.stdout, QUESTIONS[1][0])[0].startswith("[1] influenza.txt (lines ")
        assert sources_after(proc.stdout, QUESTIONS[6][0])[0].startswith("[1] diabetes_zh.md (lines ")
        assert "15克" in proc.stdout  # --retrieve_only prints the passages
        assert ("(2 read, 0 from the cache" if run == 0 else "(0 read, 2 from the cache") in proc.stderr


def test_cli_bad_input_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_chatpdf("--docs_dir", str(tmp_path / "empty"), "--query", "hi", "--retrieve_only",
                       "--index_dir", str(tmp_path / "index"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {tmp_path / 'empty'}: no .txt, .md, .pdf or .docx "
                                                    f"documents found")
    proc = run_chatpdf("--query", "hi")
    assert proc.returncode == 2 and "give the documents: --docs_dir FOLDER" in proc.stderr


# ------------------------------------------------------------------------------------------------
def post(url: str, body: dict) -> dict | list[dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        if not body.get("stream"):
            return json.loads(r.read())
        return [json.loads(line[6:]) for line in r.read().decode().splitlines()
                if line.startswith("data: {")]


def test_openai_api_rag_docs_returns_the_sources(tiny_model_dir, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ["--base_model", tiny_model_dir, "--template_name", "chatml", "--port", str(port), "--rag_docs",
            str(SAMPLES), "--rag_index_dir", str(tmp_path / "index"), "--rag_top_k", "2", "--max_new_tokens", "6"]
    question = QUESTIONS[3][0]
    with running_server("openai_api.py", args, f"{base}/health", tmp_path / "server.log"):
        r = post(f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": question}],
                                                 "temperature": 0})
        chunks = post(f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": question}],
                                                      "temperature": 0, "stream": True})
    sources = r["sources"]
    assert [s["number"] for s in sources] == [1, 2]
    assert sources[0]["file"] == "anaemia.docx" and "30 ng/mL" in sources[0]["text"]
    assert sources[0]["location"].startswith("paragraph")
    assert r["usage"]["prompt_tokens"] > 100  # the passages are in the prompt
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and chunks[-1]["sources"] == sources
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == r["choices"][0]["message"]["content"]


def test_gradio_demo_rag_docs_adds_a_sources_message(sample_index, tiny_chat):
    from medgpt.generation import GenerationOptions
    from medgpt.serving.gradio_app import build_demo

    demo = build_demo(tiny_chat, GenerationOptions(max_new_tokens=6, temperature=0), "", rag=sample_index)
    answer = next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "answer")
    question = QUESTIONS[1][0]
    *_, history = answer([{"role": "user", "content": question}], 6, 0, 0.9, "")
    assert [m["role"] for m in history] == ["user", "assistant", "assistant"]
    assert history[-1]["metadata"] == {"title": "Sources"}
    assert history[-1]["content"].splitlines()[0].startswith("- [1] influenza.txt (lines ")
    # the next turn: the Sources message stays out of the prompt (no error about roles), new sources come
    *_, history2 = answer(history + [{"role": "user", "content": QUESTIONS[4][0]}], 6, 0, 0.9, "")
    assert history2[-1]["content"].splitlines()[0].startswith("- [1] diabetes_zh.md (lines ")
    assert len(history2) == 6
