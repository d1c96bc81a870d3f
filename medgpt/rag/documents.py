"""Reading .txt, .md, .pdf and .docx documents and cutting them into overlapping chunks that remember where
they came from (file, page, lines or paragraphs, characters).

A document that cannot be used (an encrypted or broken PDF, a binary file named .txt, a file of another type,
an unreadable file) raises SkipFile: the index skips it with a one-line warning and counts it.
"""
from __future__ import annotations

import bisect
import logging
import os
import re
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

from ..data.io import DataError, read_text_file

logger = logging.getLogger(__name__)

DOCUMENT_TYPES = (".txt", ".md", ".pdf", ".docx")


class SkipFile(DataError):
    """A document that is left out of the index; its message is one line naming the file and why."""


@dataclass
class Section:
    """Text read from a document: the whole file, or one page of a PDF."""
    text: str
    page: Optional[int] = None


@dataclass
class Chunk:
    """A piece of a document as it is indexed and shown to the model."""
    file: str  # absolute path
    text: str
    start: int  # character offsets of text in its section (the file, or the PDF page)
    end: int
    line_start: int  # 1-based; paragraphs for a .docx (one line each in the extracted text)
    line_end: int
    page: Optional[int] = None  # 1-based PDF page

    def location(self) -> str:
        """'lines 3-8', 'page 2, line 4', 'paragraphs 1-3' (.docx)."""
        unit = "paragraph" if self.file.lower().endswith(".docx") else "line"
        if self.line_start == self.line_end:
            span = f"{unit} {self.line_start}"
        else:
            span = f"{unit}s {self.line_start}-{self.line_end}"
        return f"page {self.page}, {span}" if self.page else span

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------
def find_documents(sources: Iterable[str]) -> tuple[list[str], int]:
    """The documents under `sources` (folders, searched recursively, or files): their absolute paths, sorted and
    without repeats, and how many files in the folders were left out for their type. A file named directly is
    kept whatever its type (read_document then skips it with a warning if it is not a document)."""
    files: list[str] = []
    other = 0
    for src in sources:
        if not os.path.exists(src):
            raise DataError(f"{src}: no such file or directory")
        if os.path.isfile(src):
            files.append(os.path.abspath(src))
            continue
        for root, dirs, names in os.walk(src):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .git, an index folder kept inside, ...
            for name in sorted(names):
                if name.startswith("."):
                    continue
                if name.lower().endswith(DOCUMENT_TYPES):
                    files.append(os.path.abspath(os.path.join(root, name)))
                else:
                    other += 1
    files = sorted(dict.fromkeys(files))
    if not files:
        where = ", ".join(sources) or "(no folder or file given)"
        extra = f" ({other} other files left out)" if other else ""
        raise DataError(f"{where}: no .txt, .md, .pdf or .docx documents found{extra}")
    return files, other


def read_document(path: str) -> list[Section]:
    """The text of a document, by its extension; raises SkipFile when it cannot be used."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in DOCUMENT_TYPES:
        raise SkipFile(f"{path}: not a .txt, .md, .pdf or .docx document")
    try:
        if ext == ".pdf":
            sections = _read_pdf(path)
        elif ext == ".docx":
            sections = _read_docx(path)
        else:
            sections = [Section(_read_text(path))]
    except OSError as e:  # permissions, a file that vanished, a device error
        raise SkipFile(f"{path}: cannot be read ({e.strerror or e})") from None
    if not any(s.text.strip() for s in sections):
        hint = " (a scanned PDF needs OCR first)" if ext == ".pdf" else ""
        raise SkipFile(f"{path}: no text{hint}")
    return sections


def _read_text(path: str) -> str:
    try:  # the project's one decoding of user files: UTF-8, BOM dropped, binary/GBK/UTF-16 a one-line error
        text = read_text_file(path)
    except DataError as e:
        raise SkipFile(str(e)) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_pdf(path: str) -> list[Section]:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    pypdf_log = logging.getLogger("pypdf")
    level = pypdf_log.level
    pypdf_log.setLevel(logging.ERROR)  # its own warnings ("EOF marker not found") do not name the file
    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            try:  # a PDF locked only against editing opens with an empty user password
                opened = reader.decrypt("")
            except (PyPdfError, NotImplementedError, ValueError):
                opened = 0
            if not opened:
                raise SkipFile(f"{path}: encrypted PDF (it needs a password)")
        return [Section((page.extract_text() or "").replace("\r\n", "\n"), page=i + 1)
                for i, page in enumerate(reader.pages)]
    except SkipFile:
        raise
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - pypdf raises many kinds on a broken file; any of them: skip it
        raise SkipFile(f"{path}: unreadable PDF ({type(e).__name__}: {_one_line(e)})") from None
    finally:
        pypdf_log.setLevel(level)


def _read_docx(path: str) -> list[Section]:
    import zipfile

    import docx
    from docx.opc.exceptions import PackageNotFoundError
    from docx.table import Table

    try:
        document = docx.Document(path)
    except (PackageNotFoundError, zipfile.BadZipFile):
        raise SkipFile(f"{path}: not a readable .docx file (not a Word document package)") from None
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - not a zip, no Word part, broken XML: skip it
        raise SkipFile(f"{path}: not a readable .docx file ({type(e).__name__}: {_one_line(e)})") from None
    lines = []  # one line per paragraph, and per table row (cells joined by ' | '), in document order
    for block in document.iter_inner_content():
        if isinstance(block, Table):
            lines += [" | ".join(cell.text.strip() for cell in row.cells) for row in block.rows]
        else:
            lines.append(block.text)
    return [Section("\n".join(lines))]


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] or "no details"


# ------------------------------------------------------------------------------------------------
# Where a chunk may end, best first: a paragraph, a sentence (Chinese or English), a line (text is often
# hard-wrapped mid-sentence), a clause, a word.
# Written here because neither bm25s nor transformers split documents, and a splitter library (langchain's)
# would be a large dependency for these few lines and does not report line numbers.
_BREAKS = ("\n\n", "。", "！", "？", ".\n", ". ", "! ", "? ", "\n", "；", "; ", "，", ", ", "、", " ")
# Where the overlap (the next chunk's start) may begin, best first: a sentence, a line, a clause, a word.
_STARTS = [re.compile(p) for p in (r"[。！？]|[.!?]\s", r"\n", r"[；，、]|[;,]\s", r"\s")]


def _cut(text: str, lo: int, hi: int) -> int:
    """The best place in (lo, hi] to end a chunk that starts before lo."""
    for sep in _BREAKS:
        i = text.rfind(sep, lo, hi)
        if i != -1:
            return i + len(sep)
    return hi


def split_spans(text: str, chunk_size: int, chunk_overlap: int) -> list[tuple[int, int]]:
    """(start, end) character spans of chunks of at most chunk_size characters that cover the text, each
    ending at the best break in its second half and starting chunk_overlap characters (rounded to a word or
    sentence boundary) before the previous one ended."""
    if chunk_size < 1 or not 0 <= chunk_overlap < chunk_size:
        raise DataError(f"chunk size {chunk_size} and overlap {chunk_overlap}: need a size of at least 1 and "
                        f"0 <= overlap < size")
    spans: list[tuple[int, int]] = []
    n, start = len(text), 0
    while start < n:
        while start < n and text[start].isspace():
            start += 1
        if start >= n:
            break
        end = n if n - start <= chunk_size else _cut(text, start + max(1, chunk_size // 2), start + chunk_size)
        stripped = end
        while stripped > start and text[stripped - 1].isspace():
            stripped -= 1
        spans.append((start, stripped))
        if end >= n:
            break
        nxt = stripped - chunk_overlap  # the overlap: the last chunk_overlap characters of this chunk's text
        for pattern in _STARTS if chunk_overlap else ():
            m = pattern.search(text, nxt, stripped - 1)
            if m:
                nxt = m.end()
                break
        start = max(nxt, start + 1)
    return spans


def chunk_sections(path: str, sections: list[Section], chunk_size: int, chunk_overlap: int) -> list[Chunk]:
    chunks = []
    for section in sections:
        text = section.text
        newlines = [i for i, ch in enumerate(text) if ch == "\n"]
        for start, end in split_spans(text, chunk_size, chunk_overlap):
            chunks.append(Chunk(path, text[start:end], start, end, bisect.bisect_left(newlines, start) + 1,
                                bisect.bisect_left(newlines, end - 1) + 1, section.page))
    return chunks
