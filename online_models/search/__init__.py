"""Search over the item catalogue: a multilingual text model, BM25 and vector indexes, and
hybrid retrieval (see docs/search.md).

Pure, like the rest of ``online_models``: no Kafka, no Redis, no HTTP.
"""

from online_models.search.catalogue import Catalogue, CatalogueItem, SearchHit, fuse
from online_models.search.cold_start import ContentMatcher
from online_models.search.e5_onnx import TextModelMissing
from online_models.search.lexical import LexicalIndex
from online_models.search.semantic import VectorIndex
from online_models.search.student import QueryStudent
from online_models.search.text import MODEL_NAME, TextEmbedder, normalise_query

__all__ = [
    "MODEL_NAME",
    "Catalogue",
    "CatalogueItem",
    "ContentMatcher",
    "LexicalIndex",
    "QueryStudent",
    "SearchHit",
    "TextEmbedder",
    "TextModelMissing",
    "VectorIndex",
    "fuse",
    "normalise_query",
]
