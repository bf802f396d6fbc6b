"""Reading a checkpoint folder as untrusted input: only regular files inside it are read (a link may not lead
out, except to a Hugging Face cache snapshot's own blobs), JSON files are bounded in size and nesting, and
every problem is a CheckpointError whose one-line message names the file or field and the fix."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path


class CheckpointError(Exception):
    """A checkpoint folder that cannot be read; the message names the problem and the fix."""


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not token id 1


MAX_JSON_BYTES = 256 << 20  # tokenizer.json of a 150k vocabulary is about 11 MB


def _allowed_roots(folder: Path) -> list[Path]:
    """Where a file of the folder may really live: the folder, and for a snapshot in the Hugging Face cache
    (.../models--X/snapshots/REV, whose files are links to ../../blobs) that repository's blobs."""
    roots = [folder]
    if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
        roots.append(folder.parent.parent / "blobs")
    return roots


def inside_file(folder: Path, name, what: str | None = None, required: bool = True) -> Path | None:
    """The real path of the file `name` of the (resolved) folder, or None when it is absent and not required.
    Refuses a name that leaves the folder (absolute, ..), a link that leads outside it, and anything but a
    regular file (a folder, a fifo, a device: reading one could hang or never end)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts or \
            not Path(name).parts:  # "." is the folder itself
        raise CheckpointError(f"{what or name}: {name!r} is not a file name inside the checkpoint folder {folder}")
    path = folder / name
    if not os.path.lexists(path):
        if required:
            raise CheckpointError(f"{path} is missing; a checkpoint folder needs config.json, model.safetensors "
                                  "(or shards with model.safetensors.index.json) and tokenizer.json")
        return None
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError) as e:  # a dangling link, a link loop
        raise CheckpointError(f"{path} cannot be read ({first_line(e)})") from None
    if not any(real == root or root in real.parents for root in _allowed_roots(folder)):
        raise CheckpointError(f"{path} leads outside the checkpoint folder (to {real}); only files inside it are "
                              "read: copy the file into the folder")
    mode = real.stat().st_mode
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise CheckpointError(f"{what + ': ' if what else ''}{path} is {kind}; it must be a file")
    return real


def read_bytes(path: Path, limit: int) -> bytes:
    try:
        if path.stat().st_size > limit:
            raise CheckpointError(f"{path} is larger than {limit >> 20} MB; that is not a file of a checkpoint")
        return path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror or first_line(e)})") from None


def _each_key_once(pairs: list) -> dict:
    """A JSON object; a key given twice (json would keep the last without a word) is a KeyError naming it."""
    d = dict(pairs)
    if len(d) < len(pairs):
        seen = set()
        raise KeyError(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return d


def read_json(folder: Path, name: str, required: bool = True) -> dict:
    """A JSON file of the folder as a dict ({} when absent and not required)."""
    path = inside_file(folder, name, required=required)
    if path is None:
        return {}
    try:
        d = json.loads(read_bytes(path, MAX_JSON_BYTES).decode("utf-8-sig"),  # a byte-order mark is no error
                       object_pairs_hook=_each_key_once)
    except ValueError as e:  # bad JSON or UTF-8, a number of more than 4300 digits
        raise CheckpointError(f"{folder / name} is not valid JSON ({first_line(e)})") from None
    except KeyError as e:
        raise CheckpointError(f"{folder / name}: \"{e.args[0]}\" is given twice; keep one") from None
    except RecursionError:
        raise CheckpointError(f"{folder / name} is nested too deeply to be a checkpoint file") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{name} must hold a JSON object, not a {type(d).__name__}")
    return d
