"""Progress bars (tqdm, on stderr) for the steps that take seconds: ONNX export and its onnxruntime
check, tie calibration and scoring, fine-tuning, benchmarks.

A bar is drawn only when stderr is a terminal and ``FXFUSE_QUIET`` is unset (or ``0``);
``FXFUSE_QUIET=1`` silences every bar. ``finetune`` and ``finetune_collapse`` also take
``progress=False`` to silence one call.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable


def enabled() -> bool:
    """True when bars are drawn: stderr is a terminal and FXFUSE_QUIET is unset or 0."""
    return os.environ.get("FXFUSE_QUIET", "0") in ("", "0") and sys.stderr.isatty()


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, show: bool = True, **kwargs):
    """A tqdm bar on stderr (a silent one unless ``show`` and ``enabled()``); nested bars vanish when done."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not (show and enabled()), file=sys.stderr, leave=None,
                dynamic_ncols=True, **kwargs)


def write(line: str) -> None:
    """Print ``line`` to stdout (flushed) without breaking a bar being drawn."""
    from tqdm import tqdm

    with tqdm.external_write_mode():
        print(line, flush=True)
