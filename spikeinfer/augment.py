"""Data augmentation for distillation on small tasks (TinyBERT's, with embedding neighbours).

Prediction KD needs no gold labels, only inputs the teacher can label, so a small training set
(MRPC's 3.7k pairs) can be enlarged with perturbed copies: each word piece is replaced, with
probability `prob`, by one of its `k` nearest tokens in the teacher's word-embedding space
(cosine similarity), chosen among the tokens that occur in the task's own training text and of
the same kind (a whole word by a whole word, a `##` continuation by a continuation). TinyBERT
draws replacements from BERT's masked-LM head and GloVe; the teacher here has no masked-LM head,
and its input embeddings serve the same purpose: similar tokens, so the pair stays a plausible
input whose teacher label carries information.

Special tokens, token types and lengths are kept; the copies keep the original's gold label,
which classification KD ignores (it learns the teacher's soft label of the copy). Regression
tasks train on the gold score, which a perturbed copy no longer has: they are refused.
"""

from __future__ import annotations

import numpy as np
import torch

from .data import Encoded


def embedding_neighbours(
    table: torch.Tensor, candidates: list[int], is_piece: list[bool], k: int
) -> dict[int, np.ndarray]:
    """For each candidate token id, its `k` nearest other candidates of the same kind (word or
    `##` piece) by cosine similarity of rows of `table` [vocab, D]; a candidate whose kind has
    fewer than k + 1 members gets all the others."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ids = torch.as_tensor(candidates, dtype=torch.long)
    piece = torch.as_tensor(is_piece, dtype=torch.bool)
    unit = torch.nn.functional.normalize(table[ids].float(), dim=-1)  # [C, D]
    out: dict[int, np.ndarray] = {}
    for kind in (False, True):
        members = ids[piece == kind]
        if len(members) < 2:
            continue
        vectors = unit[piece == kind]  # [Ck, D]
        similarity = vectors @ vectors.T  # [Ck, Ck]
        similarity.fill_diagonal_(-float("inf"))
        nearest = similarity.topk(min(k, len(members) - 1), dim=-1).indices  # [Ck, k]
        for token, row in zip(members.tolist(), members[nearest].numpy(), strict=True):
            out[token] = row
    return out


def augment_encoded(
    encoded: Encoded,
    neighbours: dict[int, np.ndarray],
    copies: int,
    prob: float,
    seed: int,
) -> Encoded:
    """The examples of `encoded` followed by `copies` perturbed copies of each (copy c of every
    example, then copy c + 1): every token with neighbours is replaced with probability `prob`
    by one of them, uniformly. Deterministic in `seed`."""
    if encoded.is_regression:
        raise ValueError(
            "augmentation keeps each copy's gold label, and regression KD trains on the gold "
            "score: a perturbed copy has none; train without --augment"
        )
    if copies < 0 or not 0.0 <= prob <= 1.0:
        raise ValueError(f"need copies >= 0 and 0 <= prob <= 1, got {copies} and {prob}")
    rng = np.random.default_rng(seed)
    input_ids = list(encoded.input_ids)
    for _ in range(copies):
        for ids in encoded.input_ids:
            new = list(ids)
            draws = rng.random(len(ids))
            for position, token in enumerate(ids):
                options = neighbours.get(token)
                if options is not None and draws[position] < prob:
                    new[position] = int(options[rng.integers(len(options))])
            input_ids.append(new)
    repeat = copies + 1
    return Encoded(
        input_ids=input_ids,
        token_type_ids=list(encoded.token_type_ids) * repeat,
        attention_mask=list(encoded.attention_mask) * repeat,
        labels=np.tile(encoded.labels, repeat),
        num_truncated=encoded.num_truncated * repeat,
        is_regression=encoded.is_regression,
    )


def augment_for_distillation(
    encoded: Encoded, tokenizer, table: torch.Tensor, copies: int, prob: float, k: int, seed: int
) -> Encoded:
    """`augment_encoded` with neighbours among the non-special tokens of `encoded`'s own text."""
    special = set(tokenizer.all_special_ids)
    candidates = sorted({t for ids in encoded.input_ids for t in ids} - special)
    pieces = [tokenizer.convert_ids_to_tokens(t).startswith("##") for t in candidates]
    neighbours = embedding_neighbours(table, candidates, pieces, k)
    return augment_encoded(encoded, neighbours, copies, prob, seed)
