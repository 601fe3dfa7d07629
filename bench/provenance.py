"""Where an analysis script's result file came from: the command, the commit and the date."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path


def save_result(record: dict, out: str | None, default_name: str) -> Path:
    """Write `record` with its provenance as JSON to `out` (default
    bench/results/<default_name>_<date>.json) and return the path."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    date = datetime.date.today().isoformat()
    path = Path(out or f"bench/results/{default_name}_{date}.json")
    full = {"command": " ".join(["python", *sys.argv]), **record, "commit": commit, "date": date}
    path.write_text(json.dumps(full, indent=1) + "\n")
    print(f"wrote {path}")
    return path
