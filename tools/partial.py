"""A results file of the tools that never loses what finished. The file is made at once, before any work, as
OUTPUT.partial (so an existing OUTPUT, a missing or unwritable folder fail in a second, not after an hour); the
results are rewritten into it whole (a new file renamed over it) after every piece that finishes; OUTPUT gets
them at the end, by a link that fails if OUTPUT appeared meanwhile. Ctrl-C or an error leaves OUTPUT.partial
with the pieces that finished."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from files import folder_problem, place_new


class PartialJSON:
    def __init__(self, path: str | Path):
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):  # Path("") is the current folder
            raise ValueError(f"a results file's name must be a non-empty str or Path, got {path!r}")
        if str(path).endswith("/"):  # Path would drop the slash and write a file where a folder was meant
            raise ValueError(f"{path} ends with / (a folder); name a file")
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        missing = folder_problem(self.path.parent)
        if missing:
            raise ValueError(f"{self.path}: {missing}")
        if os.path.lexists(self.path):
            raise ValueError(f"{self.path} exists; results are never overwritten: name a new file")
        try:
            os.close(os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            raise ValueError(f"{self.partial} exists (an interrupted run, or one still going?); move it away") from None
        except OSError as e:
            raise ValueError(f"cannot write {self.partial}: {e.strerror or e}") from None
        self.pieces = 0

    def save(self, res: dict):
        """The results so far, replacing the partial file's content at once (never half written)."""
        try:
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(res, indent=1) + "\n")
                os.chmod(tmp, 0o644)
                os.replace(tmp, self.partial)
            finally:
                if os.path.lexists(tmp):
                    os.unlink(tmp)
        except OSError as e:  # a full disk, a file-size limit: the partial file keeps what it held
            kept = "; what finished before is kept in it" if self.pieces else ""
            raise ValueError(f"cannot write {self.partial}: {e.strerror or e}{kept}") from None
        self.pieces += 1

    def commit(self, res: dict) -> Path:
        """Everything finished: OUTPUT holds it, the partial file is gone."""
        self.save(res)
        try:
            place_new(str(self.partial), self.path)  # a link, or on a file system without links a checked rename
        except FileExistsError:
            raise ValueError(f"{self.path} appeared while this run was going and is kept; the results are in "
                             f"{self.partial}") from None
        self.partial.unlink(missing_ok=True)
        return self.path

    def abandon(self) -> str:
        """The run stopped early: keep the partial file if it holds anything, and say where it is."""
        if self.pieces == 0 and os.path.lexists(self.partial) and os.path.getsize(self.partial) == 0:
            os.unlink(self.partial)
            return "nothing had finished"
        return f"what finished is in {self.partial}"


def error_line(e: Exception, out: PartialJSON | None) -> str:
    """The one line of an error that stopped a run: it says where what finished is kept, unless it already does."""
    if out is None:
        return f"error: {e}"
    where = out.abandon()
    return f"error: {e}" if not out.pieces or str(out.partial) in str(e) else f"error: {e}; {where}"


def new_results_path(folder: Path, stem: str) -> Path:
    """folder/stem.json, or stem-2.json, stem-3.json, ... : a results file (or an interrupted run's partial
    one) is never overwritten."""
    path, n = folder / f"{stem}.json", 1
    while path.exists() or path.with_name(path.name + ".partial").exists():
        n += 1
        path = folder / f"{stem}-{n}.json"
    return path
