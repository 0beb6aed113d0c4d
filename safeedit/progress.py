"""Terminal output: progress bars only where a person watches a terminal, plain lines elsewhere, silence on request.

Every bar in safeedit is a `tqdm` whose `disable` comes from `bars_off`: off when the caller asked for no progress,
and off when standard error is not a terminal (a pipe, a CI log), where bars would be escape-code noise; the
`[safeedit] ...` step lines (`say`) remain there as the plain log. `configure` applies the same rule to the
libraries' own bars (transformers, datasets, huggingface_hub, diffusers) and, with `quiet`, their warnings.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


def bars_off(progress: bool) -> bool | None:
    """tqdm's `disable`: True when progress is off; None (tqdm: off unless stderr is a terminal) otherwise."""
    return None if progress else True


def say(message: str, progress: bool) -> None:
    """One plain progress line on standard error."""
    if progress:
        print(f"[safeedit] {message}", file=sys.stderr, flush=True)


def configure(quiet: bool = False, verbose: bool = False) -> None:
    """Set the libraries' output for a command-line run: their bars only on a terminal and never when `quiet`;
    with `quiet` also no library warnings; with `verbose`, safeedit's and the libraries' info-level logs."""
    import datasets
    import diffusers
    import huggingface_hub
    import transformers

    if quiet or not sys.stderr.isatty():
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
        diffusers.utils.logging.disable_progress_bar()
    if quiet:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
        datasets.utils.logging.set_verbosity_error()
        warnings.filterwarnings("ignore")
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        transformers.utils.logging.set_verbosity_info()
        datasets.utils.logging.set_verbosity_info()


@contextmanager
def quiet_logger(name: str, level: int = logging.ERROR) -> Iterator[None]:
    """Only records of `level` and above from logger `name` inside the block (for messages safeedit says itself, in
    its own words, or that report what was intended)."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)
