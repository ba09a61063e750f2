"""Monitoring never costs a run: a failure while logging or sampling is one warning line, and training goes on.

The trainer wraps each piece of rank-local monitoring work (figures, samples, closing the logger) in
`nonfatal`. Collectives stay outside it: every rank must still take part in them, whatever rank 0's logging
does, so only work that one rank does on its own may fail quietly.
"""

from __future__ import annotations

import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, TextIO


@contextmanager
def nonfatal(what: str, step: Optional[int] = None, stream: Optional[TextIO] = None) -> Iterator[None]:
    """Run the block; if it raises, print one line naming `what`, the step, the error and where it came from."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - whatever monitoring raises, the run goes on
        frames = traceback.extract_tb(err.__traceback__)
        where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
        at = f" at step {step}" if step is not None else ""
        message = " ".join(str(err).split())
        print(f"warning: {what}{at} failed, training goes on: {type(err).__name__}: {message}{where}",
              file=stream or sys.stderr, flush=True)
