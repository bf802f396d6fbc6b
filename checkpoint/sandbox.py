"""A checkpoint's chat template is code from the checkpoint: it renders in jinja2's immutable sandbox, with
bounds on what it may build, on its memory and on its time, so that no template can hang, exhaust memory or end
in a traceback (the tokenizer turns every failure into one line naming the template's file)."""
from __future__ import annotations

import functools
import math
import re
import signal
import threading
import time
from contextlib import contextmanager

from checkpoint.folder import is_int


MAX_TEMPLATE_CHARS = 1_000_000  # the template itself, its output and any string or list it builds
MAX_TEMPLATE_NUMBER = 100_000   # the largest number a template may pass to a call or a filter
MAX_TEMPLATE_RANGE = 10_000     # the longest range() (jinja2's own sandbox allows 100,000)
MAX_TEMPLATE_BITS = 4096        # the largest integer it may build with * or **
TEMPLATE_SECONDS = 5.0          # a chat template renders in milliseconds
TEMPLATE_MEMORY = 1 << 30       # bytes of address space rendering may add (it needs a few MB)


class TemplateLimit(Exception):
    """A chat template went past a bound of the sandbox."""


def _bounded(value):
    """value, if it is not a string or collection past MAX_TEMPLATE_CHARS."""
    if isinstance(value, (str, bytes, list, tuple, dict, set)) and len(value) > MAX_TEMPLATE_CHARS:
        raise TemplateLimit(f"the template built a value of {len(value):,} items (at most {MAX_TEMPLATE_CHARS:,})")
    return value


def _check_counts(args, kwargs):
    for v in (*args, *kwargs.values()):
        if is_int(v) and abs(v) > MAX_TEMPLATE_NUMBER:
            raise TemplateLimit(f"the number {v} is too large for a template (at most {MAX_TEMPLATE_NUMBER:,})")


_FORMAT_WIDTH = re.compile(r"%[-+ #0*]*(\d*)(?:\.(\d+))?|\{[^{}]*?:[^{}]*?(\d+)(?:\.(\d+))?[^{}]*\}")


def _check_format(text: str):
    """A %- or {}-format string: no field width or precision past MAX_TEMPLATE_NUMBER."""
    for match in _FORMAT_WIDTH.finditer(text):
        if any(g and int(g) > MAX_TEMPLATE_NUMBER for g in match.groups()):
            raise TemplateLimit(f"the format {match.group(0)[:40]!r} asks for too wide a field")


def _check_replace(text, old=None, new=None, *rest):
    """text.replace(old, new) must not build a string past MAX_TEMPLATE_CHARS (replacing "" inserts everywhere)."""
    if all(isinstance(v, str) for v in (text, old, new)):
        if len(text) + (text.count(old) if old else len(text) + 1) * len(new) > MAX_TEMPLATE_CHARS:
            raise TemplateLimit("the template's replace would build too long a string")


def _check_binop(op: str, left, right):
    """Refuse * and ** whose result would be huge, before computing it."""
    numbers = all(isinstance(v, (int, float)) for v in (left, right))
    if op == "**" and numbers and is_int(left) and is_int(right) and abs(left) > 1 and right > 0:
        if right * math.log2(abs(left)) > MAX_TEMPLATE_BITS:
            raise TemplateLimit(f"{left} ** {right} is too large a number for a template")
    elif op == "*" and numbers and is_int(left) and is_int(right):
        if abs(left).bit_length() + abs(right).bit_length() > MAX_TEMPLATE_BITS:
            raise TemplateLimit("the template multiplies too large numbers")
    elif op == "*":
        seq, n = (left, right) if is_int(right) else (right, left)
        if is_int(n) and hasattr(seq, "__len__") and len(seq) * max(n, 0) > MAX_TEMPLATE_CHARS:
            raise TemplateLimit(f"the template repeats a value {n:,} times")
    elif op == "%" and isinstance(left, str):
        _check_format(left)


def _sandbox():
    """jinja2's immutable sandbox (no access to Python internals, no changes to lists or dicts) with bounds:
    *, ** and % checked before they run, ranges of at most MAX_TEMPLATE_RANGE, no call or filter given a
    number past MAX_TEMPLATE_NUMBER, and no string or list built past MAX_TEMPLATE_CHARS."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%", "+"})

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            return _bounded(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's own spelling)
            _check_counts(args, kwargs)
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, str) and getattr(__obj, "__name__", "") in ("format", "format_map"):
                _check_format(owner)
            if isinstance(owner, str) and getattr(__obj, "__name__", "") == "replace":
                _check_replace(owner, *args[:2])
            return _bounded(super().call(__context, __obj, *args, **kwargs))

    def raise_exception(message):  # templates call it to refuse a conversation
        raise TemplateError(message)

    def bounded_range(*args):
        r = range(*args)
        if len(r) > MAX_TEMPLATE_RANGE:
            raise TemplateLimit(f"range of {len(r):,} items (at most {MAX_TEMPLATE_RANGE:,})")
        return r

    def bounded_filter(f, name):
        def run(*args, **kwargs):
            _check_counts(args, kwargs)
            if name == "format" and args and isinstance(args[0], str):
                _check_format(args[0])
            if name == "replace" and len(args) >= 3:
                _check_replace(*args[:3])
            return _bounded(f(*args, **kwargs))
        if hasattr(f, "jinja_pass_arg"):  # jinja2's pass_context / pass_environment mark
            run.jinja_pass_arg = f.jinja_pass_arg
        return run

    env = Sandbox(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=raise_exception, range=bounded_range)
    env.globals.pop("lipsum", None)  # builds text of a size the template chooses
    env.filters = {name: bounded_filter(f, name) for name, f in env.filters.items()}
    return env


@contextmanager
def _time_limit(seconds: float):
    """Raise TemplateLimit in the with-block after `seconds` (a timer signal: main thread only, elsewhere the
    size bounds still hold). An earlier timer of the process is put back afterwards."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expired(signum, frame):
        raise TemplateLimit(f"rendering took more than {seconds:g} s")

    old_handler = signal.signal(signal.SIGALRM, expired)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    t0 = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay:
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - t0), 1e-3), old_interval)


@contextmanager
def _memory_limit(extra: int):
    """Allocations past `extra` more bytes of the process's address space fail in the with-block (MemoryError),
    so that a value built from small ones in one call (a join, an indent, ~ in a loop) cannot fill the machine's
    memory before the size bounds see it. Linux only (the size from /proc); the earlier limit is put back."""
    try:
        import resource
        with open("/proc/self/statm") as f:
            limit = int(f.read().split()[0]) * resource.getpagesize() + extra
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        yield
        return
    if soft != resource.RLIM_INFINITY and soft <= limit or hard != resource.RLIM_INFINITY and hard < limit:
        yield  # already bounded more tightly
        return
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@functools.lru_cache(maxsize=8)
def _compiled(source: str):
    return _sandbox().from_string(source)


def render_template(source: str, **variables) -> str:
    """A chat template rendered in the bounded sandbox; raises TemplateLimit past a bound, or whatever the
    template raises."""
    with _time_limit(TEMPLATE_SECONDS), _memory_limit(TEMPLATE_MEMORY):
        out, size = [], 0
        try:
            for chunk in _compiled(source).generate(**variables):
                out.append(chunk)
                size += len(chunk)
                if size > MAX_TEMPLATE_CHARS:
                    raise TemplateLimit(f"the output passed {MAX_TEMPLATE_CHARS:,} characters")
        except MemoryError:
            raise TemplateLimit(f"the template needed more than {TEMPLATE_MEMORY >> 20:,} MB of memory") from None
        return "".join(out)
