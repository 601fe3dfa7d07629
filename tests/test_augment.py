"""TinyBERT-style augmentation by embedding neighbours (spikeinfer.augment)."""

import numpy as np
import pytest
import torch

from spikeinfer.augment import augment_encoded, augment_for_distillation, embedding_neighbours
from spikeinfer.data import Encoded, load_tokenizer


def test_neighbours_by_cosine_within_kind():
    table = torch.zeros(10, 2)
    # words 1..4 on the unit circle at 0, 10, 90 and 100 degrees; pieces 5, 6, 7 elsewhere
    for token, degrees in {1: 0, 2: 10, 3: 90, 4: 100, 5: 5, 6: 95, 7: 180}.items():
        r = np.deg2rad(degrees)
        table[token] = torch.tensor([np.cos(r), np.sin(r)]) * (1 + token)  # norms differ
    got = embedding_neighbours(table, [1, 2, 3, 4, 5, 6, 7], [False] * 4 + [True] * 3, k=2)
    assert got[1].tolist() == [2, 3] and got[2].tolist() == [1, 3]
    assert got[3].tolist() == [4, 2] and got[4].tolist() == [3, 2]
    assert got[5].tolist() == [6, 7]  # pieces only ever map to pieces
    one_kind = embedding_neighbours(table, [1, 2], [False, False], k=5)
    assert one_kind[1].tolist() == [2] and one_kind[2].tolist() == [1]


def encoded(n=5):
    ids = [[101, 7, 8, 102, 9, 102][: 4 + i % 3] for i in range(n)]
    return Encoded(
        input_ids=ids,
        token_type_ids=[[0] * len(x) for x in ids],
        attention_mask=[[1] * len(x) for x in ids],
        labels=np.arange(n) % 2,
    )


NEIGHBOURS = {7: np.array([70, 71]), 8: np.array([80]), 9: np.array([90, 91, 92])}


def test_augment_copies_keep_layout_and_use_neighbours():
    enc = encoded()
    out = augment_encoded(enc, NEIGHBOURS, copies=3, prob=0.5, seed=0)
    assert len(out) == 4 * len(enc)
    assert out.input_ids[: len(enc)] == enc.input_ids
    assert (out.labels == np.tile(enc.labels, 4)).all()
    for i, ids in enumerate(out.input_ids):
        original = enc.input_ids[i % len(enc)]
        assert len(ids) == len(original) == len(out.token_type_ids[i])
        for new, old in zip(ids, original, strict=True):
            assert new == old or new in NEIGHBOURS[old]
    changed = sum(
        a != b
        for i, x in enumerate(out.input_ids[len(enc) :])
        for a, b in zip(x, enc.input_ids[i % len(enc)], strict=True)
    )
    assert changed > 0
    assert augment_encoded(enc, NEIGHBOURS, 3, 0.5, seed=0).input_ids == out.input_ids
    assert augment_encoded(enc, NEIGHBOURS, 3, 0.5, seed=1).input_ids != out.input_ids


def test_augment_probability_edges_and_errors():
    enc = encoded()
    same = augment_encoded(enc, NEIGHBOURS, copies=2, prob=0.0, seed=0)
    assert same.input_ids == enc.input_ids * 3
    every = augment_encoded(enc, NEIGHBOURS, copies=1, prob=1.0, seed=0)
    for ids in every.input_ids[len(enc) :]:
        assert not set(ids) & set(NEIGHBOURS) and ids.count(101) == 1 and ids.count(102) >= 1
    with pytest.raises(ValueError, match="prob"):
        augment_encoded(enc, NEIGHBOURS, copies=1, prob=1.5, seed=0)
    regression = Encoded(
        enc.input_ids,
        enc.token_type_ids,
        enc.attention_mask,
        enc.labels.astype(np.float32),
        is_regression=True,
    )
    with pytest.raises(ValueError, match="regression"):
        augment_encoded(regression, NEIGHBOURS, copies=1, prob=0.5, seed=0)


def test_augment_real_tokens_keeps_special_tokens():
    tok = load_tokenizer()
    first = tok("the movie was a great success", "a film that did very well")
    second = tok("stocks fell sharply on monday", "shares dropped on monday")
    enc = Encoded(
        input_ids=[first["input_ids"], second["input_ids"]],
        token_type_ids=[first["token_type_ids"], second["token_type_ids"]],
        attention_mask=[first["attention_mask"], second["attention_mask"]],
        labels=np.array([1, 1]),
    )
    table = torch.randn(tok.vocab_size, 8, generator=torch.Generator().manual_seed(0))
    out = augment_for_distillation(enc, tok, table, copies=2, prob=1.0, k=3, seed=0)
    special = set(tok.all_special_ids)
    vocabulary = {t for ids in enc.input_ids for t in ids}
    for i, ids in enumerate(out.input_ids[2:]):
        original = enc.input_ids[i % 2]
        for new, old in zip(ids, original, strict=True):
            if old in special:
                assert new == old
            else:  # replaced (prob 1) by another token of the task's own text
                assert new != old and new in vocabulary and new not in special
