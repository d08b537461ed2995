"""``train.keep_cpu_memory``: freed large blocks are reused, not mapped and faulted in again."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import json, resource, sys
    import torch
    from distill_depth.train.cpu_memory import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "keep" else False
    faults = []
    for _ in range(int(sys.argv[2])):  # a step's pattern, repeated: two activations above glibc's largest mmap threshold
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.empty(64 * 2**20 // 4)
        x.fill_(1.0)  # touch every page
        y = torch.empty(32 * 2**20 // 4)
        y.fill_(2.0)
        del x, y
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"applied": applied, "faults": faults}))
""")


ROUNDS = 64


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(ROUNDS)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_kept_memory_is_reused_without_page_faults() -> None:
    """Two tensors (64 and 32 MiB) allocated, written and freed 64 times, as a training step
    does with its activations: by default every round maps them afresh and faults in their
    ~24,000 pages; with the memory kept the heap settles (measured: after 3 to 16 rounds, by the
    process's heap layout) and from then on serves them without a fault. (The trainer's own step
    at 640×192 settles in two steps: docs/benchmarks.md.)"""
    system, kept = _probe("system"), _probe("keep")
    assert kept["applied"] is True
    pages = 96 * 2**20 // 4096
    assert sum(f > pages // 2 for f in system["faults"]) >= 0.9 * ROUNDS, system
    quiet = [f < pages // 20 for f in kept["faults"]]
    settled = next((i for i in range(ROUNDS) if all(quiet[i:])), None)
    assert settled is not None and settled <= ROUNDS - 16, kept  # the last 16 rounds or more without faults


def test_the_switch_is_on_by_default() -> None:
    from distill_depth.config import Config

    assert Config().train.keep_cpu_memory is True
