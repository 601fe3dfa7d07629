"""Where a result file came from: the command, the commit, the date and the host."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import torch

# CPU features the kernels or torch's references use: the popcount GEMM needs VPOPCNTDQ; oneDNN
# runs the bf16 and int8 references on AVX512-BF16 / VNNI, or on AMX tiles where there are some.
_HOST_FLAGS = ("avx512_vpopcntdq", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_host(cpuinfo: str | None = None) -> dict:
    """What distinguishes one host from another in these results: vendor, family and model
    numbers, the features above, and the ISA torch dispatches its CPU kernels to."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:  # the first processor's block is enough
                break
            continue
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {
        "vendor": fields.get("vendor_id", "unknown"),
        "family": fields.get("cpu family", "unknown"),
        "model": fields.get("model", "unknown"),
        "features": [f for f in _HOST_FLAGS if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def save_result(record: dict, out: str | None, default_name: str) -> Path:
    """Write `record` with its provenance as JSON to `out` (default
    bench/results/<default_name>_<date>.json) and return the path."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    date = datetime.date.today().isoformat()
    path = Path(out or f"bench/results/{default_name}_{date}.json")
    full = {
        "command": " ".join(["python", *sys.argv]),
        **record,
        "commit": commit,
        "date": date,
        "host": cpu_host(),
    }
    path.write_text(json.dumps(full, indent=1) + "\n")
    print(f"wrote {path}")
    return path
