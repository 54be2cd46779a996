"""Writing a file so that a reader sees the old content or the new, never half of it: the text
goes to `<name>.tmp` beside it, which is then renamed over it (atomic on POSIX)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_atomic(path: Path, text: str, *, durable: bool = False) -> Path:
    """Replace `path` with `text`. `durable` also syncs the data to disk before the rename, for
    files that must survive a power cut along with what refers to them (snapshot manifests)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json_atomic(path: Path, data: Any, **dumps: Any) -> Path:
    """`write_atomic` of `json.dumps(data, indent=2, **dumps)` and a final newline."""
    return write_atomic(path, json.dumps(data, indent=2, **dumps) + "\n")
