"""The knowledge base: documents, chunked by section, stored in Redis per tenant.

Documents are Markdown or JSON:

* Markdown: optional front matter (``id:``, ``title:``), the first ``# H1`` is
  the title, every ``##``/``###`` heading starts a section; a heading that
  begins with a number (``## 2.1 Checked baggage allowance``) gives the
  section id, otherwise the heading's slug does.
* JSON: ``{"id", "title", "sections": [{"id", "heading", "text"}]}`` or a list
  of such objects.

A section is one chunk; a long section is split at paragraph (then sentence)
boundaries into parts of at most `MAX_CHUNK_WORDS` words that keep its id.

Redis layout, for tenant `t` (one hash tag per tenant's knowledge base, so
the response cache's Lua can read the KB version next to its entries):

    kr:{t:kb}:meta                 hash   version (current), allocated (last
                                          version handed out), documents,
                                          chunks, ingested_at (ms)
    kr:{t:kb}:chunks:<version>     hash   chunk id -> JSON chunk
    kr:{t:kb}:cache:<version>:...  the response cache (see cache.py)

Every ingest writes a new version and then switches to it in one Lua script,
which also deletes the previous version's chunks and cached answers: the KB
version changes on every ingest, and so do all cache keys.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from korero.server.context import citations
from korero.server.context.retrieval import BM25Index
from korero.server.settings import KnowledgeSettings
from korero.server.storage.boundary import redis_boundary
from korero.server.storage.keys import kb_key
from korero.server.storage.scripts import ScriptCall

__all__ = [
    "MAX_CHUNK_WORDS",
    "Chunk",
    "Document",
    "KnowledgeBase",
    "KnowledgeStore",
    "Source",
    "load_documents",
]

MAX_CHUNK_WORDS = 220
"""A section longer than this is split into parts (each part keeps the section id)."""

_WRITE_BATCH = 500


@dataclass(frozen=True)
class Chunk:
    """One section (or part of a section) of a document."""

    id: str
    document_id: str
    document_title: str
    section: str
    heading: str
    text: str
    context: str = ""
    """Parent headings, indexed with the text (not shown)."""

    def indexed_text(self) -> str:
        return f"{self.document_title}\n{self.context}\n{self.heading}\n{self.heading}\n{self.text}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Chunk:
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class Document:
    """A parsed document: its id, title and chunks."""

    id: str
    title: str
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class Source:
    """A retrieved chunk with its relevance score (0..1)."""

    chunk: Chunk
    score: float

    @property
    def label(self) -> str:
        """How the model is asked to cite it."""
        return citations.label(self.chunk.document_title, self.chunk.section)


# Parsing -----------------------------------------------------------------------

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_NUMBERED = re.compile(r"^(\d+(?:\.\d+)*)\.?\s+(.*)$")
_SLUG = re.compile(r"[^a-z0-9]+")


def _slug(text: str) -> str:
    return _SLUG.sub("-", text.lower()).strip("-") or "section"


def _split_long(text: str) -> list[str]:
    words = text.split()
    if len(words) <= MAX_CHUNK_WORDS:
        return [text]
    pieces = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(pieces) == 1:
        pieces = re.split(r"(?<=[.!?])\s+", text)
    parts: list[str] = []
    current: list[str] = []
    for piece in pieces:
        if current and len(" ".join([*current, piece]).split()) > MAX_CHUNK_WORDS:
            parts.append(" ".join(current))
            current = []
        current.append(piece)
    if current:
        parts.append(" ".join(current))
    return parts


def _chunks(
    doc_id: str, title: str, sections: Iterable[tuple[str, str, str, str]]
) -> tuple[Chunk, ...]:
    out: list[Chunk] = []
    seen: set[str] = set()
    for section, heading, context, text in sections:
        body = text.strip()
        if not body:
            continue
        parts = _split_long(body)
        for n, part in enumerate(parts, start=1):
            base = f"{doc_id}#{section}" + (f"/{n}" if len(parts) > 1 else "")
            chunk_id, k = base, 1
            while chunk_id in seen:  # two sections with the same slug
                k += 1
                chunk_id = f"{base}~{k}"
            seen.add(chunk_id)
            out.append(Chunk(chunk_id, doc_id, title, section, heading, part, context))
    return tuple(out)


def parse_markdown(text: str, default_id: str) -> Document:
    """A Markdown document, chunked by its ##/### sections."""
    front: dict[str, str] = {}
    lines = text.splitlines()
    if lines and lines[0].strip() == "---":
        end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
        if end is not None:
            for line in lines[1:end]:
                key, sep, value = line.partition(":")
                if sep:
                    front[key.strip().lower()] = value.strip()
            lines = lines[end + 1 :]
    title = front.get("title", "")
    sections: list[tuple[str, str, str, str]] = []
    parents: dict[int, str] = {}
    current: tuple[str, str, str] = ("intro", "Overview", "")
    body: list[str] = []
    for line in lines:
        match = _HEADING.match(line)
        if not match:
            body.append(line)
            continue
        level, heading = len(match.group(1)), match.group(2)
        if level == 1 and not title:
            title = heading
            continue
        sections.append((*current, "\n".join(body)))
        body = []
        numbered = _NUMBERED.match(heading)
        section, name = (
            (numbered.group(1), numbered.group(2)) if numbered else (_slug(heading), heading)
        )
        parents = {lvl: h for lvl, h in parents.items() if lvl < level}
        context = " / ".join(parents[lvl] for lvl in sorted(parents))
        parents[level] = name
        current = (section, name, context)
    sections.append((*current, "\n".join(body)))
    doc_id = front.get("id", default_id)
    title = title or default_id
    return Document(doc_id, title, _chunks(doc_id, title, sections))


def parse_json(data: Any, default_id: str) -> list[Document]:
    """Documents from the JSON form (one object or a list of them)."""
    items = data if isinstance(data, list) else [data]
    docs: list[Document] = []
    for n, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("sections"), list):
            raise ValueError(f"{default_id}: a JSON document needs a 'sections' list")
        doc_id = str(item.get("id") or (default_id if len(items) == 1 else f"{default_id}-{n}"))
        title = str(item.get("title") or doc_id)
        sections = []
        for s in item["sections"]:
            heading = str(s.get("heading", ""))
            section = str(s.get("id") or _slug(heading))
            sections.append((section, heading, "", str(s.get("text", ""))))
        docs.append(Document(doc_id, title, _chunks(doc_id, title, sections)))
    return docs


def load_documents(directory: Path) -> list[Document]:
    """Every *.md and *.json document under `directory`, in path order."""
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    docs: list[Document] = []
    for path in sorted(directory.rglob("*")):
        if path.suffix.lower() in (".md", ".markdown"):
            docs.append(parse_markdown(path.read_text(encoding="utf-8"), path.stem))
        elif path.suffix.lower() == ".json":
            docs += parse_json(json.loads(path.read_text(encoding="utf-8")), path.stem)
    ids = [d.id for d in docs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"duplicate document ids: {', '.join(duplicates)}")
    return docs


# Storage -----------------------------------------------------------------------

_ACTIVATE = """
local meta = KEYS[1]
local new = tonumber(ARGV[1])
local prefix = ARGV[2]
local old = tonumber(redis.call('HGET', meta, 'version') or '0')
if old > new then
  redis.call('UNLINK', prefix .. 'chunks:' .. new)
  return old
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', meta, 'version', new, 'documents', ARGV[3], 'chunks', ARGV[4],
           'ingested_at', now)
if old > 0 and old ~= new then
  redis.call('UNLINK', prefix .. 'chunks:' .. old)
  local index = prefix .. 'cache:' .. old .. ':index'
  local members = redis.call('SMEMBERS', index)
  for i = 1, #members, 500 do
    redis.call('UNLINK', unpack(members, i, math.min(i + 499, #members)))
  end
  redis.call('UNLINK', index)
end
return new
"""


_VERSION = "return redis.call('HGET', KEYS[1], 'version') or '0'"


class KnowledgeStore:
    """Versioned knowledge-base chunks of every tenant, in Redis."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self._activate: AsyncScript = client.register_script(_ACTIVATE)
        self._version: AsyncScript = client.register_script(_VERSION)

    def version_call(self, tenant: str) -> ScriptCall:
        """Reads the tenant's KB version; sent in the pipeline that begins a turn."""
        return ScriptCall(self._version, (kb_key(tenant, "meta"),), ())

    async def ingest(self, tenant: str, documents: Sequence[Document]) -> int:
        """Store `documents` as the tenant's new KB version; returns that version."""
        chunks = [c for d in documents for c in d.chunks]
        async with redis_boundary():
            version = int(await self._redis.hincrby(kb_key(tenant, "meta"), "allocated", 1))
            key = kb_key(tenant, f"chunks:{version}")
            for i in range(0, len(chunks), _WRITE_BATCH):
                batch = chunks[i : i + _WRITE_BATCH]
                await self._redis.hset(key, mapping={c.id: c.to_json() for c in batch})
            active = await self._activate(
                keys=[kb_key(tenant, "meta")],
                args=[version, kb_key(tenant, ""), len(documents), len(chunks)],
            )
        return int(active)

    async def version(self, tenant: str) -> int:
        """The tenant's current KB version (0: nothing ingested)."""
        async with redis_boundary():
            raw = await self._redis.hget(kb_key(tenant, "meta"), "version")
        return int(raw or 0)

    async def chunks(self, tenant: str, version: int) -> list[Chunk]:
        """All chunks of one KB version, in a stable order."""
        async with redis_boundary():
            raw = await self._redis.hgetall(kb_key(tenant, f"chunks:{version}"))
        return sorted((Chunk.from_json(v) for v in raw.values()), key=lambda c: c.id)


@dataclass(frozen=True)
class _Loaded:
    version: int
    chunks: list[Chunk]
    index: BM25Index


class KnowledgeBase:
    """Retrieval over a tenant's current KB version, with the index kept in memory.

    The first search of a version in this process loads its chunks (one
    round trip) and builds the index; later searches cost no Redis call.
    """

    def __init__(self, store: KnowledgeStore, settings: KnowledgeSettings) -> None:
        self._store = store
        self._settings = settings
        self._loaded: dict[str, _Loaded] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def store(self) -> KnowledgeStore:
        return self._store

    async def _index(self, tenant: str, version: int) -> _Loaded:
        loaded = self._loaded.get(tenant)
        if loaded is not None and loaded.version == version:
            return loaded
        lock = self._locks.setdefault(tenant, asyncio.Lock())
        async with lock:
            loaded = self._loaded.get(tenant)
            if loaded is None or loaded.version != version:
                chunks = await self._store.chunks(tenant, version)
                loaded = _Loaded(version, chunks, BM25Index([c.indexed_text() for c in chunks]))
                self._loaded[tenant] = loaded
        return loaded

    async def search(
        self, tenant: str, version: int, query: str, k: int | None = None
    ) -> list[Source]:
        """The best chunks for `query` (relevant or not), best first."""
        if version <= 0:
            return []
        loaded = await self._index(tenant, version)
        hits = loaded.index.search(query, k or self._settings.top_k)
        return [Source(loaded.chunks[h.index], h.score) for h in hits]

    async def relevant(self, tenant: str, version: int, query: str) -> list[Source]:
        """The chunks that clear the relevance threshold, best first."""
        sources = await self.search(tenant, version, query)
        return [s for s in sources if s.score >= self._settings.min_score]
