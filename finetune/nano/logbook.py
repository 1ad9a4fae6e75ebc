"""The build's log: each line printed and appended to <work>/nano.log, from any of its processes."""

from __future__ import annotations

import time
from pathlib import Path


def log_to(path: Path):
    def log(message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")

    return log
