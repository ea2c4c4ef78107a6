"""Benchmark results on disk, configs and run records.

A results directory holds one JSON-lines file per sweep (``efficiency.jsonl``,
``tasks.jsonl``). Every finished case is appended as one line and flushed at once,
so a sweep that is interrupted (Ctrl-C, a kill, a crash) loses at most the case it
was running; ``--resume`` reads the file back and skips every case whose ``key`` is
already settled there (ok, or a failed correctness check); cases that errored, timed
out or ran out of memory are run again, and the report keeps each key's last record. A kill in the middle of a write can leave a partial last line: the
reader skips lines that are not JSON, and :meth:`ResultsFile.open_for_append` cuts
such a tail off before appending, so the file stays one record per line.

Each invocation first appends a ``{"kind": "run"}`` record: the run id, the config it
used (the whole TOML, as read), the command line, the git commit of the code and the
machine. Every case record carries its ``run_id``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator, Optional

import torch

from .. import allocator
from ..errors import AttentionInputError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

def find_config(name: str) -> Path:
    """A config path from a name (``"quick"`` -> ``benchmarks/quick.toml``) or a path.

    Looks in ``./benchmarks`` and in the ``benchmarks/`` folder of the source checkout
    attnzoo runs from."""
    path = Path(name)
    if path.suffix in (".toml",) and path.exists():
        return path
    tried = []
    for folder in (Path.cwd() / "benchmarks", Path(__file__).resolve().parents[2] / "benchmarks"):
        candidate = folder / (name if name.endswith(".toml") else f"{name}.toml")
        tried.append(str(candidate))
        if candidate.exists():
            return candidate
    raise AttentionInputError(f"benchmark config {name!r} not found (tried {name!r}, {', '.join(tried)}); "
                              "pass --config PATH to a TOML file (see benchmarks/quick.toml for the keys)")


def load_config(name: str) -> tuple[dict, Path]:
    """``(config dict, path)`` of a TOML benchmark config."""
    path = find_config(name)
    with open(path, "rb") as f:
        try:
            return tomllib.load(f), path
        except tomllib.TOMLDecodeError as e:
            raise AttentionInputError(f"benchmark config {path}: {e}") from None


def git_commit() -> Optional[str]:
    """The commit of the attnzoo source tree, with ``-dirty`` if it has uncommitted
    changes; None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "allocator": allocator.STATE,  # the malloc settings import attnzoo applied (attnzoo/allocator.py)
    }


def run_record(sweep: str, config: dict, config_file: Optional[Path], argv: Optional[list] = None) -> dict:
    """The ``{"kind": "run"}`` record that opens each invocation."""
    return {
        "kind": "run",
        "sweep": sweep,
        "run_id": _dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6],
        "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(argv if argv is not None else sys.argv),
        "config_file": str(config_file) if config_file else None,
        "config": config,
        "git_commit": git_commit(),
        "machine": machine_info(),
    }


def as_list(value) -> list:
    """A config value as a list: a list/tuple as is, a comma-separated string split, None empty."""
    if value is None:
        return []
    if isinstance(value, str):
        return [x.strip() for x in value.split(",") if x.strip()]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def jsonable(value):
    """Options as JSON: numbers, strings, lists; anything else (a tensor, a layout
    object) by its repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.numel() <= 16:
        return value.tolist()
    return repr(value)


def read_records(path: Path) -> Iterator[dict]:
    """The records of a JSON-lines file; blank and malformed lines (a write cut off
    by a kill) are skipped."""
    path = Path(path)
    if not path.exists():
        return
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record


#: Statuses that settle a case: ``--resume`` skips these and runs the others again
#: (error, timeout; and oom, which a less loaded machine may not hit).
DONE = ("ok", "failed", "failed_check")


class ResultsFile:
    """One sweep's JSON-lines file: append a record per finished case, skip done cases on resume.

    Without ``resume`` an existing file is moved aside to ``<name>.prev`` (the report
    reads ``*.jsonl`` only) and the sweep starts afresh."""

    def __init__(self, path: Path, resume: bool):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict = {}  # key -> the last record with that key (resume)
        if resume:  # cases that errored or timed out (a busy machine, say) are run again
            self.records = {r["key"]: r for r in read_records(self.path)
                            if r.get("key") and r.get("kind") != "run" and r.get("status") in DONE}
        elif self.path.exists() and self.path.stat().st_size:
            os.replace(self.path, self.path.with_name(self.path.name + ".prev"))
        self.done: set = set(self.records)
        self._file = self.open_for_append()

    def open_for_append(self):
        """Open for appending, first cutting off a partial last line left by a kill."""
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb+") as f:
                data = f.read()
                if not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
        return open(self.path, "a")

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record, default=repr) + "\n")
        self._file.flush()  # on disk (in the OS) as soon as the case is done
        if record.get("key") and record.get("status") in DONE:
            self.done.add(record["key"])
            self.records[record["key"]] = record

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
