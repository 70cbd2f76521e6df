#!/usr/bin/env python3
"""Summarize a py-spy raw (collapsed-stack) profile as text: top functions.

    py-spy record --format raw -o relay.folded --pid PID --nonblocking
    .venv/bin/python bench/profile_summary.py relay.folded > profile.txt

"self" counts samples whose innermost frame is the function (where the time
is spent); "total" counts samples with the function anywhere on the stack
(what it costs including its callees). Functions are keyed by file and name,
lines merged. Idle gevent threadpool workers (blocked on their task queue)
are sampled by py-spy too; their samples are dropped and counted apart.
"""

from __future__ import annotations

import re
import sys
from collections import Counter

# An idle threadpool worker waits in these frames (gevent's own queue).
IDLE_MARKERS = ("Queue.get (gevent/_threading.py", "_Condition.wait (gevent/_threading.py")
_PROCESS = re.compile(r"^process \d+:")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")


def _key(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip() or "?"
    path = match.group("file")
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match.group('func')} ({path})"


def summarize(path: str, top: int = 30) -> str:
    self_samples: Counter[str] = Counter()
    total_samples: Counter[str] = Counter()
    self_lines: Counter[str] = Counter()
    samples = idle = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for raw in f:
            raw = raw.rstrip("\n")
            if not raw:
                continue
            stack, _, count_text = raw.rpartition(" ")
            try:
                count = int(count_text)
            except ValueError:
                continue
            if any(marker in stack for marker in IDLE_MARKERS):
                idle += count
                continue
            # py-spy --subprocesses puts a "process PID:<cmdline>" root frame first.
            frames = [frame for frame in stack.split(";") if frame.strip() and not _PROCESS.match(frame)]
            if not frames:
                frames = ["(no Python frame: native code or the interpreter)"]
            samples += count
            self_samples[_key(frames[-1])] += count
            self_lines[frames[-1].strip()] += count
            for key in {_key(frame) for frame in frames}:
                total_samples[key] += count
    out = [
        f"py-spy samples: {samples} (plus {idle} of idle threadpool workers, dropped)",
        "",
        f"Top {top} by self time (innermost frame):",
    ]
    for key, count in self_samples.most_common(top):
        out.append(f"  {100 * count / max(samples, 1):5.1f}%  {count:6d}  {key}")
    out += ["", f"Top {top} by total time (on the stack, callees included):"]
    for key, count in total_samples.most_common(top):
        out.append(f"  {100 * count / max(samples, 1):5.1f}%  {count:6d}  {key}")
    out += ["", f"Top {top} lines by self time:"]
    for key, count in self_lines.most_common(top):
        out.append(f"  {100 * count / max(samples, 1):5.1f}%  {count:6d}  {key}")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: profile_summary.py PROFILE.folded", file=sys.stderr)
        return 2
    sys.stdout.write(summarize(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
