"""An index of a set of documents, cached on disk: only files whose path, size or modification time changed
(and whose content hash then differs) are read again; the BM25 index is rebuilt only when a chunk changed, and
dense vectors are computed only for chunks the cache does not hold yet."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from ..data.io import DataError
from .documents import Chunk, SkipFile, chunk_sections, find_documents, read_document
from .retrieval import BM25Index, Encoder, Hit, rank_bm25, reciprocal_rank_fusion, tokenize

logger = logging.getLogger(__name__)

INDEX_VERSION = 1
DEFAULT_CHUNK_SIZE = 250  # characters, MedicalGPT chatpdf's default
DEFAULT_CHUNK_OVERLAP = 50


def default_index_dir(sources: Iterable[str]) -> str:
    """$MEDGPT_HOME/rag/<hash of the document folders/files>: one cache per set of sources."""
    from ..default_model import cache_root

    key = hashlib.sha1(json.dumps(sorted(os.path.abspath(s) for s in sources)).encode()).hexdigest()[:16]
    return str(cache_root() / "rag" / key)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _model_key(name_or_path: str) -> str:
    """Names the dense vectors of one encoder: its folder and the size and time of each of its files."""
    parts = [os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path]
    if os.path.isdir(name_or_path):
        for name in sorted(os.listdir(name_or_path)):
            st = os.stat(os.path.join(name_or_path, name))
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


def _write_json(path: str, data) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    os.replace(tmp, path)  # a reader never sees half a file


@dataclass
class BuildStats:
    documents: int = 0  # documents indexed
    reused: int = 0  # of which taken from the cache unchanged
    read: int = 0  # of which (re)read
    skipped: int = 0  # documents that could not be used (each warned about)
    other_files: int = 0  # files in the folders that are not documents
    chunks: int = 0
    bm25_rebuilt: bool = False
    vectors_computed: int = 0


class DocumentIndex:
    """Chunks of the documents with a BM25 index and, when an encoder is given, their dense vectors."""

    def __init__(self, chunks: list[Chunk], bm25: BM25Index, names: dict[str, str], index_dir: str,
                 stats: BuildStats, encoder: Optional[Encoder] = None, vectors: Optional[np.ndarray] = None):
        self.chunks, self.bm25, self.names, self.index_dir, self.stats = chunks, bm25, names, index_dir, stats
        self.encoder, self.vectors = encoder, vectors

    # --------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, sources: list[str], index_dir: Optional[str] = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
              chunk_overlap: int = DEFAULT_CHUNK_OVERLAP, embedding_model: Optional[str] = None,
              device: Optional[str] = None, trust_remote_code: bool = False) -> "DocumentIndex":
        """Index the documents under `sources` (folders or files), reusing what `index_dir` holds of them."""
        from .documents import split_spans

        split_spans("", chunk_size, chunk_overlap)  # bad sizes: a clear error before any work
        files, other = find_documents(sources)
        index_dir = index_dir or default_index_dir(sources)
        os.makedirs(index_dir, exist_ok=True)
        manifest_path = os.path.join(index_dir, "manifest.json")
        chunks_path = os.path.join(index_dir, "chunks.jsonl")
        bm25_dir = os.path.join(index_dir, "bm25")
        settings = {"version": INDEX_VERSION, "chunk_size": chunk_size, "chunk_overlap": chunk_overlap}

        old_files, old_chunks = {}, {}
        if os.path.isfile(manifest_path) and os.path.isfile(chunks_path):
            try:
                with open(manifest_path, encoding="utf-8") as f:
                    manifest = json.load(f)
                if {k: manifest.get(k) for k in settings} == settings:
                    old_files = manifest["files"]
                    with open(chunks_path, encoding="utf-8") as f:
                        for line in f:
                            row = json.loads(line)
                            old_chunks.setdefault(row["chunk"]["file"], []).append(row)
                else:
                    logger.info("The chunk settings changed: re-reading every document")
            except (OSError, ValueError, KeyError, TypeError) as e:
                logger.warning("%s: unusable index cache (%s): rebuilding it", index_dir, e)
                old_files, old_chunks = {}, {}

        stats = BuildStats(other_files=other)
        new_files: dict[str, dict] = {}
        rows: list[dict] = []  # {"chunk": Chunk fields, "tokens": [...]}
        for path in files:
            try:
                st = os.stat(path)
                entry = old_files.get(path)
                reuse = entry is not None and path in old_chunks and entry["size"] == st.st_size
                if reuse and entry["mtime_ns"] != st.st_mtime_ns:  # touched: re-read only if the content changed
                    digest = _sha256(path)
                    reuse = digest == entry["sha256"]
                    entry = dict(entry, mtime_ns=st.st_mtime_ns)
                if reuse:
                    stats.reused += 1
                    new_files[path] = entry
                    rows += old_chunks[path]
                    continue
                digest = _sha256(path)
                sections = read_document(path)
            except SkipFile as e:
                logger.warning("Skipped %s", e)
                stats.skipped += 1
                continue
            except OSError as e:
                logger.warning("Skipped %s: cannot be read (%s)", path, e.strerror or e)
                stats.skipped += 1
                continue
            file_chunks = chunk_sections(path, sections, chunk_size, chunk_overlap)
            stats.read += 1
            new_files[path] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
            rows += [{"chunk": c.to_dict(), "tokens": tokenize(c.text)} for c in file_chunks]
        stats.documents = len(new_files)
        if not rows:
            raise DataError(f"{', '.join(sources)}: none of the {len(files)} documents has usable text "
                            f"({stats.skipped} skipped: see the warnings above)")

        chunks = [Chunk(**row["chunk"]) for row in rows]
        stats.chunks = len(chunks)
        changed = stats.read > 0 or set(new_files) != set(old_files) or new_files != old_files
        bm25 = None
        if not stats.read and set(new_files) == set(old_files) and os.path.isdir(bm25_dir):
            try:
                bm25 = BM25Index.load(bm25_dir)
            except (OSError, ValueError, KeyError) as e:
                logger.warning("%s: unusable BM25 cache (%s): rebuilding it", bm25_dir, e)
        if bm25 is None:
            bm25 = BM25Index.build([row["tokens"] for row in rows])
            stats.bm25_rebuilt = True
            tmp = tempfile.mkdtemp(dir=index_dir, prefix=".bm25-")
            bm25.save(tmp)
            shutil.rmtree(bm25_dir, ignore_errors=True)
            os.replace(tmp, bm25_dir)
        if changed or stats.bm25_rebuilt:
            tmp = f"{chunks_path}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            os.replace(tmp, chunks_path)
            _write_json(manifest_path, {**settings, "files": new_files})

        encoder = vectors = None
        if embedding_model:
            encoder = Encoder(embedding_model, device=device, trust_remote_code=trust_remote_code)
            vectors = cls._dense_vectors(encoder, chunks, os.path.join(index_dir, f"dense-{_model_key(embedding_model)}.npz"),
                                         stats)

        names = _display_names(files, sources)
        index = cls(chunks, bm25, names, index_dir, stats, encoder, vectors)
        logger.info("Indexed %d documents, %d chunks (%d read, %d from the cache in %s)%s%s%s", stats.documents,
                    stats.chunks, stats.read, stats.reused, index_dir,
                    f"; {stats.skipped} skipped (see above)" if stats.skipped else "",
                    f"; {other} other files left out" if other else "",
                    f"; dense vectors by {embedding_model} ({stats.vectors_computed} computed)" if encoder else "")
        return index

    @staticmethod
    def _dense_vectors(encoder: Encoder, chunks: list[Chunk], path: str, stats: BuildStats) -> np.ndarray:
        """Vectors of every chunk: from the cache file where it has the chunk's text, else computed (and saved)."""
        keys = [_text_key(c.text) for c in chunks]
        cached: dict[str, np.ndarray] = {}
        if os.path.isfile(path):
            try:
                with np.load(path) as data:
                    cached = dict(zip(data["keys"].tolist(), data["vectors"]))
            except (OSError, ValueError, KeyError) as e:
                logger.warning("%s: unusable vector cache (%s): recomputing", path, e)
        missing = [i for i, k in enumerate(keys) if k not in cached]
        if missing:
            for i, vec in zip(missing, encoder.encode([chunks[i].text for i in missing])):
                cached[keys[i]] = vec
            stats.vectors_computed = len(missing)
            vectors = np.stack([cached[k] for k in keys]).astype(np.float32)
            tmp = f"{path}.tmp{os.getpid()}.npz"
            np.savez(tmp, keys=np.array(keys), vectors=vectors)
            os.replace(tmp, path)
            return vectors
        return np.stack([cached[k] for k in keys]).astype(np.float32)

    # --------------------------------------------------------------------------------------------
    def name(self, chunk: Chunk) -> str:
        """How a chunk's file is shown: its path inside the folder it was found in (or as given)."""
        return self.names.get(chunk.file, chunk.file)

    def search(self, query: str, top_k: int = 3) -> list[Hit]:
        """The top_k chunks for the question, best first: by BM25 score (chunks sharing no word with the question
        are left out), or, with an encoder, by the reciprocal rank fusion of the BM25 and dense rankings."""
        n = len(self.chunks)
        if self.encoder is not None:
            sims = self.vectors @ self.encoder.encode([query])[0]
            depth = max(4 * top_k, 20)  # fuse the heads of both lists
            rankings = {"bm25": rank_bm25(self.bm25.scores(tokenize(query), n))[:depth],
                        "dense": [int(i) for i in np.argsort(-sims, kind="stable")[:depth]]}
            return reciprocal_rank_fusion(rankings)[:top_k]
        scores = self.bm25.scores(tokenize(query), n)
        return [Hit(i, float(scores[i]), {"bm25": r}) for r, i in enumerate(rank_bm25(scores)[:top_k], 1)]


def _display_names(files: list[str], sources: list[str]) -> dict[str, str]:
    names = {}
    folders = [os.path.abspath(s) for s in sources if os.path.isdir(s)]
    for path in files:
        folder = next((f for f in folders if path.startswith(f + os.sep)), None)
        names[path] = os.path.relpath(path, folder) if folder else os.path.basename(path)
    return names
