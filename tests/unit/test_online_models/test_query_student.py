"""The query student: a static query encoder distilled from the real text model on a catalogue's titles."""

from __future__ import annotations

import numpy as np
import pytest

from online_models.search import Catalogue, CatalogueItem, QueryStudent, TextEmbedder, fuse
from online_models.search.student import spans_of

TITLES = [
    "Women's long winter down jacket with hood",
    "女士冬季长款羽绒服 连帽 保暖",
    "Men's lightweight running shoes",
    "Trail running shoes, waterproof",
    "55 inch 4K LED smart TV",
    "Set of 10 battery operated LED Christmas lights",
    "Shockproof phone case for iPhone 15",
    "Stainless steel water bottle, 750 ml",
    "Ceramic coffee mug with lid",
    "Wireless noise cancelling headphones",
]


@pytest.fixture(scope="module")
def embedder():
    return TextEmbedder(threads=1)


@pytest.fixture(scope="module")
def student(embedder):
    return QueryStudent.fit(embedder.model, TITLES, spans=4, epochs=6)


def cosine_to_model(embedder, student, queries):
    model = embedder.model.encode(queries, True)
    return float(np.mean([student.encode(q) @ m for q, m in zip(queries, model, strict=True)]))


def test_fitting_brings_the_students_vectors_towards_the_models(embedder, student):
    start = QueryStudent.fit(embedder.model, TITLES, spans=4, epochs=1, lr=0.0)  # the per-token start, unlearned
    queries = ["running shoes", "winter down jacket", "led lights", "coffee mug", "羽绒服"]
    assert cosine_to_model(embedder, student, queries) > cosine_to_model(embedder, start, queries) + 0.01


def test_a_query_without_a_known_word_is_not_the_students(student):
    assert student.encode("   ") is None
    assert student.encode("가나다라") is None  # Korean: no word of it in the catalogue
    vector = student.encode("Running SHOES")  # read lower-cased, as it learned
    assert vector is not None and np.isclose(np.linalg.norm(vector), 1.0, atol=1e-5)
    assert np.allclose(vector, student.encode("running shoes"))


def test_the_embedder_asks_the_student_first_and_the_model_for_the_rest(embedder, student):
    with_student = TextEmbedder(threads=1, cache_size=0, student=QueryStudent.from_bytes(student.to_bytes()))
    vectors = with_student.queries(["running shoes", "   "])
    assert np.allclose(vectors[0], student.encode("running shoes"))
    assert np.allclose(vectors[1], embedder.queries(["   "])[0], atol=1e-5)  # no word at all: the model's
    assert with_student.student_queries == 1


def test_what_the_embedder_answers_without_running_the_model(embedder, student):
    """answers_at_once: a cached query, or one the student reads; not a new one it cannot."""
    alone = TextEmbedder(threads=1, cache_size=10)
    assert not alone.answers_at_once("running shoes")
    alone.queries(["running  shoes "])  # cached under its normalised form
    assert alone.answers_at_once("running shoes") and not alone.answers_at_once("coffee mug")
    with_student = TextEmbedder(threads=1, cache_size=0, student=QueryStudent.from_bytes(student.to_bytes()))
    assert with_student.answers_at_once("coffee mug") and student.reads("COFFEE mug")
    assert not with_student.answers_at_once("가나다라") and not student.reads("가나다라")


def test_a_student_round_trips_through_bytes_and_refuses_mismatched_tables(student):
    again = QueryStudent.from_bytes(student.to_bytes()).bind(lambda text: [])
    assert np.array_equal(again.tokens, student.tokens) and np.array_equal(again.vectors, student.vectors)
    with pytest.raises(ValueError, match="one vector per token"):
        QueryStudent(np.arange(3), np.zeros((2, 4)))
    with pytest.raises(RuntimeError, match="bind"):
        QueryStudent(np.arange(2), np.zeros((2, 4))).encode("x")


def test_a_search_with_the_students_vector_finds_the_item_by_meaning(student):
    embedder = TextEmbedder(threads=1, student=student)
    catalogue = Catalogue(embedder, candidates=10)
    catalogue.upsert([CatalogueItem(item_id=f"i{n}", title=t) for n, t in enumerate(TITLES)])
    catalogue.flush()
    assert catalogue.semantic("running shoes", 2)[0] in {"i2", "i3"}
    assert catalogue.semantic("羽绒服", 1) in (["i1"], ["i0"])
    assert embedder.student_queries == 2


def test_spans_are_runs_of_one_to_four_words_of_each_title():
    texts = spans_of(["a b c d e f", "one"], spans=5, seed=1)
    assert texts[:2] == ["a b c d e f", "one"] and len(texts) == 12
    for span in texts[2:7]:
        assert 1 <= len(span.split()) <= 4 and span in "a b c d e f"
    assert texts[7:] == ["one"] * 5
    with pytest.raises(ValueError, match="no titles"):
        QueryStudent.fit(None, [])


def test_the_catalogue_weighs_bm25_by_whose_vector_a_query_got(student):
    embedder = TextEmbedder(threads=1, cache_size=0, student=student)
    catalogue = Catalogue(embedder, candidates=10)
    catalogue.upsert([CatalogueItem(item_id=f"i{n}", title=t) for n, t in enumerate(TITLES)])
    catalogue.flush()
    assert (catalogue.lexical_weight, catalogue.student_lexical_weight) == (0.2, 0.5)

    def fused(query, vector, weight):
        return fuse(catalogue.lexical_scored(query, 10), catalogue.semantic_scored(query, 10, vector), 5, weight)

    for query, by_student in (("waterproof running shoes", True), ("가나다라 shoes", True), ("가나다라", False)):
        vectors, origin = embedder.queries_by([query])
        assert origin == [by_student]
        weight = 0.5 if by_student else 0.2
        assert catalogue.search(query, 5) == fused(query, vectors[0], weight)
    assert catalogue.search("waterproof running shoes", 5) != fused("waterproof running shoes",
                                                                    embedder.queries(["waterproof running shoes"])[0], 0.2)
