"""Where a served step's time goes, call by call, on the device's own clock (bench.py --timeline).

torch.profiler reports kernels and syncs, not which of the decoder's calls the GPU was waiting on. Here every
entry to and exit from the calls below records a CUDA event; the device time between two events is charged to
the innermost call open when the first was recorded ("call:child" is the call's own work after that child
returned). A call the GPU runs kernels for (a graph's replay) is charged their run time; a call the GPU waits on
(eager work after a host read) is charged the host's time to launch it, since the device sits idle meanwhile.
Each call's host time is kept beside it: a call whose host time far exceeds its device time waited for the device
(a sync). The events cost a little host time of their own. On a CPU both clocks are the host's.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import time

import torch

import decoder
import focus
import kernels
import model
import replay

# (owner, attribute, label): the decoder's calls, FOCUS's two stages around its host read, a graph's input copies
CALLS = [(decoder.Decoder, "plan", "plan"), (decoder.Decoder, "finish_blocks", "finish_blocks"),
         (decoder.Decoder, "admit", "admit"), (replay.ReplayDecoder, "step", "step"),
         (replay.ReplayDecoder, "forward", "forward"), (replay.ReplayDecoder, "choose", "choose"),
         (focus, "select_in_graph", "select_in_graph"), (focus, "compact_step", "compact_step"),
         (focus, "read_compacted", "read_compacted"),
         (model.SDAR, "logits", "logits"), (kernels._Graph, "fill", "graph inputs")]


@contextlib.contextmanager
def recorded(device):
    """Inside the block, the calls above are timed; on the way out they are put back and `result` (the dict
    yielded) gets `per_step`: {label: {"device_ms", "host_ms", "calls"} per step}, largest device time first."""
    cuda = torch.device(device).type == "cuda"
    stack, marks, after, steps, result = ["between steps"], [], [""], [0], {}

    def mark():
        event = None
        if cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        marks.append((stack[-1] + (":" + after[0] if after[0] else ""), event, time.perf_counter()))

    def timed(fn, label):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            name = label(args[0]) if callable(label) else label
            stack.append(name)
            after[0] = ""
            mark()
            try:
                return fn(*args, **kwargs)
            finally:
                stack.pop()
                after[0] = name
                mark()
        return call

    def graph_name(graph):  # a graph's replay, named by the function it captured
        return "graph " + getattr(graph.fn, "__name__", "?")

    def count_steps(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            steps[0] += 1
            return fn(*args, **kwargs)
        return call

    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in CALLS + [(kernels._Graph, "run", None)]]
    try:
        for owner, name, label in CALLS:
            fn = getattr(owner, name)
            setattr(owner, name, timed(count_steps(fn) if label == "step" else fn, label))
        kernels._Graph.run = timed(kernels._Graph.run, graph_name)
        yield result
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
    if cuda:
        torch.cuda.synchronize()
    device_ms, host_ms, calls = collections.Counter(), collections.Counter(), collections.Counter()
    for (label, event, t), (_, next_event, next_t) in zip(marks, marks[1:]):
        device_ms[label] += event.elapsed_time(next_event) if cuda else (next_t - t) * 1e3
        host_ms[label] += (next_t - t) * 1e3
        calls[label] += 1
    n = max(steps[0], 1)

    def named(label):  # a graph's own run is what follows its inputs' copy
        return label.replace(":graph inputs", " (replay)") if label.startswith("graph ") else label
    result["per_step"] = {named(label): {"device_ms": device_ms[label] / n, "host_ms": host_ms[label] / n,
                                         "calls": calls[label] / n}
                          for label in sorted(device_ms, key=device_ms.get, reverse=True)}


def lines(per_step: dict, top: int = 12) -> list[str]:
    """The largest entries, one line each: device ms / host ms a step, and calls a step."""
    return [f"{label:50s} {v['device_ms']:7.3f} / {v['host_ms']:7.3f} ms  x{v['calls']:.2f}"
            for label, v in list(per_step.items())[:top]]
