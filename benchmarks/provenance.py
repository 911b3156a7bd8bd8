"""What every benchmark result file records about how it was made, and how it is written."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path


def device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # the result is still useful without the device name
        return "unknown"


def write_result(summary: dict, script: str, argv, started: float, out: str, from_json=None):
    """Add the command, date, device and wall time to ``summary`` and write it to ``out``.

    A re-analysis of stored curves (``from_json``) keeps the record of the run that measured
    them under ``command``/``date``/``device`` and names itself under ``analysed_by``."""
    argv = argv if argv is not None else sys.argv[1:]
    command = f"python benchmarks/{script} " + " ".join(shlex.quote(a) for a in argv)
    record = {
        "command": command,
        "wall_seconds": time.time() - started,
        "date": time.strftime("%Y-%m-%d"),
        "device": device_name(),
    }
    if from_json:
        measured = json.loads(Path(from_json).read_text())
        record = {key: measured.get(key) for key in record} | {"analysed_by": command}
    summary.update(record)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))
    return path
