"""Search: an in-memory inverted index with TF-IDF ranking."""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

from fastapi import APIRouter, Query, status
from pydantic import BaseModel, Field
from servicekit import create_app

_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


class Document(BaseModel):
    id: str = Field(min_length=1, max_length=64)
    title: str
    text: str


class Hit(BaseModel):
    id: str
    title: str
    score: float


class Index:
    def __init__(self) -> None:
        self.docs: dict[str, Document] = {}
        self.postings: dict[str, dict[str, int]] = defaultdict(dict)  # term -> doc -> tf

    def add(self, doc: Document) -> None:
        self.remove(doc.id)
        self.docs[doc.id] = doc
        for term, count in Counter(tokenize(f"{doc.title} {doc.title} {doc.text}")).items():
            self.postings[term][doc.id] = count

    def remove(self, doc_id: str) -> None:
        if self.docs.pop(doc_id, None) is not None:
            for docs in self.postings.values():
                docs.pop(doc_id, None)

    def search(self, query: str, limit: int) -> list[Hit]:
        scores: defaultdict[str, float] = defaultdict(float)
        for term in set(tokenize(query)):
            docs = self.postings.get(term, {})
            if docs:
                idf = math.log(1 + len(self.docs) / len(docs))
                for doc_id, tf in docs.items():
                    scores[doc_id] += tf * idf
        return [
            Hit(id=doc_id, title=self.docs[doc_id].title, score=round(score, 4))
            for doc_id, score in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
        ]


INDEX = Index()
for seed in (
    Document(id="python-101", title="Python Basics", text="variables functions loops"),
    Document(id="ml-intro", title="Intro to Machine Learning", text="python models data"),
    Document(id="k8s-ops", title="Kubernetes Operations", text="pods deployments rollouts"),
):
    INDEX.add(seed)

router = APIRouter(tags=["search"])


@router.get("/search")
def search(q: str = Query(min_length=1), limit: int = Query(10, ge=1, le=50)) -> list[Hit]:
    return INDEX.search(q, limit)


@router.put("/documents", status_code=status.HTTP_204_NO_CONTENT)
def index_document(doc: Document) -> None:
    """Add or replace a document."""
    INDEX.add(doc)


app = create_app("search", routers=[router])
