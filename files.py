"""The command line's files: the prompts file read in, the results file written out. Nothing the user has is
lost or overwritten: --output is checked before any work and never replaces an input (the prompts file under
any name, a file of --model, the project's results/ and shipped checkpoints/) or anything but a regular file;
results go to OUTPUT.partial as each prompt finishes, whole lines only, and OUTPUT receives them all at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import stat
import tempfile
from pathlib import Path

try:
    import fcntl  # locks --output's partial file against a second run (POSIX; elsewhere O_EXCL alone)
except ImportError:
    fcntl = None

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # the project's published measurements
SHIPPED_DIR = Path(__file__).resolve().parent / "checkpoints"  # the shipped models, whichever --model is used
MAX_PROMPTS_BYTES = 256 << 20


def file_name(text: str) -> str:
    """A flag's file or folder name (ArgumentParser's type "path"). One with a NUL, which os refuses deep inside as
    "embedded null byte", is a usage error that names the flag."""
    if "\0" in text:
        raise argparse.ArgumentTypeError(f"{text!r} holds a NUL character, which no file name can; remove it")
    return text


def folder_problem(folder: Path) -> str | None:
    """Why a file cannot be made in `folder`, as the end of a sentence, or None: the folder is missing, or a
    file stands where it or a folder above it should be."""
    if folder.is_dir():
        return None
    above = next((p for p in (folder, *folder.parents) if os.path.exists(p)), None)
    if above is not None and not above.is_dir():
        return f"{above} is a file, not a folder; name a file in a folder"
    return f"the folder {folder} does not exist; create it first"


def prompt_problem(prompt) -> str | None:
    """What is wrong with a prompt, as the end of a sentence, or None."""
    if not isinstance(prompt, str):
        return f"is a {type(prompt).__name__}, not text"
    if not prompt.strip():
        return "is empty; give some text"
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: from JSON "\ud800", or undecodable command-line bytes
        return f"is not valid Unicode ({e.reason} at character {e.start + 1}); save it as UTF-8"
    return None


def _one_prompt_key(pairs: list) -> dict:
    """A JSON object; a second "prompt" key (which json would let win silently), or one in other letters
    ("Prompt"), is a KeyError."""
    if [k.lower() for k, _ in pairs].count("prompt") > 1:
        raise KeyError("prompt")
    return dict(pairs)


def _one_document(text: str) -> bool:
    """Whether the whole text is one JSON value (a file of pretty-printed JSON)."""
    try:
        json.loads(text.removeprefix("\ufeff"))
        return True
    except (ValueError, RecursionError):
        return False


def read_prompts(path: str) -> list[str]:
    """The prompts of a JSONL file; a bad line is named by its line number in the file. Lines end at "\\n"
    only: U+2028 or U+0085 inside a JSON string is text, as JSON Lines says."""
    try:
        with open(path, "rb") as f:
            if stat.S_ISREG(os.fstat(f.fileno()).st_mode) and os.fstat(f.fileno()).st_size > MAX_PROMPTS_BYTES:
                raw = b"x" * (MAX_PROMPTS_BYTES + 1)  # refused below without reading it
            else:
                raw = f.read(MAX_PROMPTS_BYTES + 1)   # a device such as /dev/zero never ends
    except OSError as e:
        raise ValueError(f"cannot read prompts file {path}: {e.strerror}") from None
    if len(raw) > MAX_PROMPTS_BYTES:
        raise ValueError(f"prompts file {path} is larger than {MAX_PROMPTS_BYTES >> 20} MB; split it")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # Windows' "Unicode"
        raise ValueError(f"{path} is UTF-16 or UTF-32 text (it starts with their byte-order mark); save the file "
                         "as UTF-8")
    if b"\0" in raw:  # no JSON text holds one; UTF-16 without a mark has one in every ASCII character
        line = raw[:raw.index(b"\0")].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: a NUL byte, which no JSON text holds (UTF-16 text?); save the file "
                         "as UTF-8")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 text ({e.reason}); "
                         "save the file as UTF-8") from None
    from dataclasses import fields
    from decoder import Options   # here, not at the top: this module stays free of torch until a file is read
    settings = {f.name for f in fields(Options)} | {"chat", "seed"}
    prompts = []
    for n, line in enumerate(text.split("\n"), 1):
        line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark: each file's first line, also when joined
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_one_prompt_key)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data" and "\r" in line[:e.pos]:  # objects apart by a lone CR: old Mac line ends
                raise ValueError(f"{path}, line {n}: lines end in CR only (old Mac line ends), not LF; convert the "
                                 "line ends to LF (\\n), e.g. tr '\\r' '\\n' < old > new") from None
            if _one_document(text):  # pretty-printed JSON: valid, but not one object a line
                raise ValueError(f"{path} is one JSON document over several lines, not JSON Lines; put each "
                                 "{\"prompt\": ...} object on a line of its own") from None
            raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg}); each line must be one object such as "
                             "{\"prompt\": \"...\"}") from None
        except ValueError:  # Python reads integers of at most 4300 digits
            raise ValueError(f"{path}, line {n}: not valid JSON (a number too long to read)") from None
        except RecursionError:
            raise ValueError(f"{path}, line {n}: JSON nested too deeply") from None
        except KeyError:
            raise ValueError(f"{path}, line {n}: \"prompt\" is given twice; keep one") from None
        if isinstance(obj, list) and obj and all(isinstance(o, dict) for o in obj):
            raise ValueError(f"{path}, line {n}: a JSON array of objects, not one object; put each on a line of its "
                             "own")
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise ValueError(f"{path}, line {n}: expected an object with a string \"prompt\" field")
        setting = next((k for k in obj if k.lower().replace("-", "_") in settings), None)  # Max-New-Tokens too
        if setting:  # a per-prompt setting would be ignored: every prompt runs with the command line's
            raise ValueError(f"{path}, line {n}: \"{setting}\" is a setting, which a prompts file cannot give "
                             f"per prompt; pass --{setting.lower().replace('_', '-')} on the command line")
        problem = prompt_problem(obj["prompt"])
        if problem:
            raise ValueError(f"{path}, line {n}: the prompt {problem}")
        prompts.append(obj["prompt"])
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def _write_all(fd: int, data: bytes):
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n == 0:
            raise OSError(28, os.strerror(28))  # ENOSPC
        view = view[n:]


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _lock(fd: int) -> bool:
    """Take the run's lock on an open file; False when another live run holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def partial_in_use(partial: Path) -> bool:
    """Whether a live run holds OUTPUT.partial (its lock ends with its process, so a killed run's does not)."""
    try:
        fd = os.open(partial, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        return not _lock(fd)
    finally:
        os.close(fd)


def _same_inode(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.lstat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class ResultsFile:
    """--output: one JSONL line per prompt, written as each finishes into OUTPUT.partial. Only when every
    prompt has finished does OUTPUT receive them all, in prompt order, by one rename; so an interrupted or
    failed run leaves OUTPUT as it was, and what finished, whole lines only, in OUTPUT.partial.

    The partial file is new (an old one, with --overwrite, is removed first, never written into) and locked
    while the run lives, so a second run writing the same OUTPUT is refused instead of mixing results."""

    def __init__(self, path: Path, overwrite: bool):
        self.path, self.partial, self.lines = path, path.with_name(path.name + ".partial"), {}
        self.overwrite, self.size, self.fd = overwrite, 0, None
        self.busy = (f"another run is writing --output {path} now ({self.partial} is in use); wait for it or name "
                     "another file")
        try:
            if overwrite and os.path.lexists(self.partial):
                self._remove_stale()
            self.fd = self._create()
        except FileExistsError:
            raise ValueError(self.busy) from None
        except OSError as e:
            raise ValueError(f"cannot write {self.partial}: {e.strerror or e}") from None

    def _remove_stale(self):
        """An interrupted run's partial file, removed while holding its lock, so never a live run's."""
        fd = os.open(self.partial, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            if not _lock(fd) or not _same_inode(fd, self.partial):
                raise ValueError(self.busy)
            self.partial.unlink()
        finally:
            os.close(fd)

    def _create(self) -> int:
        """OUTPUT.partial, new and locked: made and locked under a private name, then linked to its name, which
        fails if that exists; so no other run can find it unlocked."""
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".partial")
        try:
            _lock(fd)
            os.fchmod(fd, _new_file_mode())
            os.link(tmp, self.partial)
            return fd
        except FileExistsError:
            os.close(fd)
            raise
        except OSError:  # a file system without hard links: O_EXCL on the name itself
            os.close(fd)
            fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            _lock(fd)
            return fd
        finally:
            os.unlink(tmp)

    def add(self, index: int, r):
        line = json.dumps({"index": index, "prompt": r.prompt, "text": r.text, "stats": r.stats})
        data = (line + "\n").encode("utf-8")
        try:
            _write_all(self.fd, data)
        except BaseException as e:  # a full disk, a size limit, Ctrl-C mid-line: no cut line is left
            try:
                os.ftruncate(self.fd, self.size)
                os.lseek(self.fd, self.size, os.SEEK_SET)
            except OSError:
                pass
            if not isinstance(e, OSError):
                raise
            kept = f"; the {len(self.lines)} results that finished before are kept whole in it" if self.lines else ""
            raise ValueError(f"cannot write {self.partial}: {e.strerror or e}{kept}") from None
        self.size += len(data)
        self.lines[index] = line

    def commit(self):
        """Every prompt finished: OUTPUT gets them all in prompt order, by a rename (--overwrite) or a link
        that fails if OUTPUT appeared meanwhile (without it); then the partial file goes."""
        tmp = None
        try:  # the folder too may be gone by now
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            try:
                _write_all(fd, "".join(self.lines[i] + "\n" for i in sorted(self.lines)).encode("utf-8"))
                os.fchmod(fd, _new_file_mode())
            finally:
                os.close(fd)
            if self.overwrite:
                os.replace(tmp, self.path)
            else:
                place_new(tmp, self.path)
        except FileExistsError:
            raise ValueError(f"{self.path} appeared while this run was going and is kept; the results are in "
                             f"{self.partial}") from None
        except OSError as e:
            kept = f"the results are in {self.partial}" if _same_inode(self.fd, self.partial) else \
                f"{self.partial} is gone too"
            raise ValueError(f"cannot write {self.path}: {e.strerror or e}; {kept}") from None
        finally:
            if tmp and os.path.lexists(tmp):
                os.unlink(tmp)
        if _same_inode(self.fd, self.partial):
            self.partial.unlink()
        self.close()

    def close(self):
        if self.fd is not None:
            os.close(self.fd)  # also ends the lock
            self.fd = None

    def abandon(self):
        """The run did not finish: keep the partial file if it holds results, else remove it."""
        if not self.lines and self.fd is not None and _same_inode(self.fd, self.partial):
            self.partial.unlink()
        self.close()


def place_new(tmp: str, path: Path):
    """tmp takes the name path, which must not exist: a hard link fails if it does (FileExistsError)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: checked, then renamed
        if os.path.lexists(path):
            raise FileExistsError(path) from None
        os.replace(tmp, path)


def _same_file(a: Path, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(output: str, prompts_file: str | None, overwrite: bool, model: str | None = None) -> Path:
    """Refuse, before any work, an --output that could not be written or would destroy a file: --overwrite
    replaces only a regular file, and never an input (the prompts file under any name, a file of --model, the
    project's results/ and checkpoints/), nor the output of a run still going. Returns the path to write (a
    link's target)."""
    if not output:
        raise ValueError("--output is empty; name a file")
    if output == "-":  # not stdout, as many tools read it, but a file named "-"
        raise ValueError("--output - would be a file named \"-\" (the texts are printed on stdout anyway); name a file")
    if output.endswith("/") and not os.path.isdir(output):  # "out/" names a folder, not a file called out
        raise ValueError(f"--output {output} ends with / but is not a folder; name a file")
    try:
        path = Path(output).resolve()  # through links: the file they name is what gets replaced
        is_dir, missing = path.is_dir(), folder_problem(path.parent)
    except (OSError, RuntimeError) as e:  # a link loop, a name too long
        raise ValueError(f"--output {output}: {getattr(e, 'strerror', None) or e}") from None
    if is_dir:
        raise ValueError(f"--output {output} is a folder; name a file in it")
    if missing:
        raise ValueError(f"--output {output}: {missing}")
    partial = path.with_name(path.name + ".partial")
    for target, what in ((path, f"--output {output}"), (partial, f"--output {output}: its partial file {partial}")):
        if prompts_file and _same_file(target, prompts_file):
            raise ValueError(f"{what} is the prompts file; name another file")
        if not os.path.lexists(target):
            continue
        if model:
            folder = Path(model).resolve()
            if _inside(target, folder) or (folder.is_dir() and any(_same_file(target, f) for f in folder.iterdir())):
                raise ValueError(f"{what} is a file of the checkpoint --model {model}; write results elsewhere")
        if _inside(target, RESULTS_DIR):
            raise ValueError(f"{what} would replace a file in results/, the project's published results; name a "
                             "new file")
        if _inside(target, SHIPPED_DIR):
            raise ValueError(f"{what} would replace a file of the shipped checkpoints in checkpoints/; name a new "
                             "file")
    # output, not path: /dev/stdout on a pipe resolves to a name that is not there ("pipe:[...]")
    if os.path.exists(output) and not stat.S_ISREG(os.stat(output).st_mode):
        raise ValueError(f"--output {output} is not a regular file (a device, fifo or socket); name a file")
    if os.path.lexists(partial) and not stat.S_ISREG(partial.lstat().st_mode):
        raise ValueError(f"{partial} exists and is not a regular file; move it away")
    if partial_in_use(partial):
        raise ValueError(f"another run is writing --output {output} now ({partial} is in use); wait for it or name "
                         "another file")
    if not overwrite:
        if path.exists():
            raise ValueError(f"--output {output} exists; name a new file, or pass --overwrite to replace it "
                             "once every prompt has finished")
        if os.path.lexists(partial):
            raise ValueError(f"{partial} exists (results of an interrupted run?); move it away or pass --overwrite")
    return path
