"""Question answering over your own files (RAG, MedicalGPT's chatpdf.py): index a folder of .txt, .md, .pdf and
.docx documents into overlapping chunks, retrieve with BM25 (and an optional dense encoder), and answer with any
chat model from the passages, naming their sources."""
from .documents import DOCUMENT_TYPES, Chunk, SkipFile, chunk_sections, find_documents, read_document, split_spans
from .index import DEFAULT_CHUNK_OVERLAP, DEFAULT_CHUNK_SIZE, DocumentIndex, default_index_dir
from .qa import DocumentQA, Source, chinese_note, cited_numbers, format_sources, mark_cited
from .retrieval import Encoder, Hit, has_cjk, reciprocal_rank_fusion, tokenize

__all__ = ["DOCUMENT_TYPES", "Chunk", "SkipFile", "chunk_sections", "find_documents", "read_document", "split_spans",
           "DEFAULT_CHUNK_OVERLAP", "DEFAULT_CHUNK_SIZE", "DocumentIndex", "default_index_dir", "DocumentQA",
           "Source", "chinese_note", "cited_numbers", "format_sources", "mark_cited", "Encoder", "Hit", "has_cjk",
           "reciprocal_rank_fusion", "tokenize"]
