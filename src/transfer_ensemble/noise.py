"""Keep stderr to this tool's own logs and bars: drop the C libraries' chatter.

TensorFlow 2.21 ignores TF_CPP_MIN_LOG_LEVEL for its start-up lines (absl's preamble, oneDNN and
CUDA notices in glog format), and libjpeg prints "Corrupt JPEG data" for photos it decodes
anyway (and under `--engine ray`, Ray's core worker warns about every Ray Data actor it
starts that its constructor arguments sit in the object store). All write to file descriptor
2 from C, which Python's logging cannot reach, so `filtered_stderr` puts a pipe on descriptor 2
and a thread copies to the real stderr every line but those. Warnings and errors in glog format (W..., E..., F...) pass, as does everything else.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from typing import Iterator

NOISE = re.compile(
    rb"(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] "
    rb"|Corrupt JPEG data: |Premature end of JPEG file|libpng warning: "
    rb"|\[[\d\- :,]+ E \d+ \d+\] core_worker\.cc:\d+: Actor with class name: "
    rb".*constructor arguments in the object store)"
)
"""Where a noise line starts: at a line's start, or after a progress bar's text (no newline)."""


def clean(line: bytes) -> bytes:
    """A complete line (without its newline) as it should reach stderr: noise and its newline cut."""
    match = NOISE.search(line)
    return line + b"\n" if match is None else line[:match.start()]


def _pump(source: int, sink: int) -> None:
    """Copy `source` to `sink` until end of file, dropping noise lines.

    An unfinished line (a progress bar) is passed on at once, up to where noise may start.
    """
    pending = b""
    while True:
        try:
            chunk = os.read(source, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        out = b"".join(clean(line) for line in lines)
        match = NOISE.search(pending)
        if match is None:
            out, pending = out + pending, b""
        else:
            out, pending = out + pending[:match.start()], pending[match.start():]
        if out:
            with contextlib.suppress(OSError):
                os.write(sink, out)
    if pending and NOISE.search(pending) is None:
        with contextlib.suppress(OSError):
            os.write(sink, pending)
    os.close(source)


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
    """Within the block, file descriptor 2 drops noise lines. A no-op where there is no fd 2."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    pump = threading.Thread(target=_pump, args=(read_end, saved), name="stderr-filter", daemon=True)
    pump.start()
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(saved, 2)
        pump.join(timeout=5)
        os.close(saved)
