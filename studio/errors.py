"""The one error policy: which errors are meant for a person, and what everything else becomes.

Every error whose message is written for the person using the studio (a bad photo, preset,
concept file or prompt; missing weights; a busy session ...) derives from :class:`StudioError`.
The UI and the CLI show those messages as they are; any other exception is a bug or an
environment failure: it is logged once with its traceback and shown as one generic sentence
(:func:`user_message`). See docs/ARCHITECTURE.md, "Errors".

This module imports nothing heavy, so the CLI can answer a bad argument before torch loads.
"""
from __future__ import annotations

import logging
import sys

_LOG = logging.getLogger("studio")

GENERIC_MESSAGE = (
    "Something went wrong on the server (it has been logged). Your photos and concept are kept; "
    "try again, or reload the page."
)
OUT_OF_MEMORY_MESSAGE = (
    "Out of memory on the accelerator. Try a smaller batch size, a lower resolution, or a smaller preset "
    "('sd15-fast' or 'tiny'); the training so far is kept."
)


class StudioError(Exception):
    """An error meant for a person: ``str(err)`` is a plain sentence that says what to do.

    Subclasses usually also derive from the builtin they replace (``ValueError``,
    ``RuntimeError``), so code that catches those keeps working.
    """


class FormError(StudioError, ValueError):
    """A value typed into a form (or sent through the API) is not usable."""


class SessionBusy(StudioError, RuntimeError):
    """The session is doing something that has to end first (training, a sweep)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or another backend's RuntimeError that says so."""
    torch = sys.modules.get("torch")  # not imported: no tensor can have run out of memory
    cuda_oom = torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)
    return cuda_oom or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def one_line(text: str) -> str:
    """``text`` with its white space folded, so a message prints as one line."""
    return " ".join(str(text).split())


def user_message(exc: BaseException, *, context: str = "") -> str:
    """The sentence to show a person for ``exc``; the one place the UI turns errors into words.

    StudioError: its own message (no log line: it is an expected outcome). Out of memory: a
    sentence with what to try (logged as one line). Anything else: logged once here, with its
    traceback, and answered with GENERIC_MESSAGE. ``context`` names what was being done, for
    the log (e.g. "training in session 1a2b").
    """
    where = f" while {context}" if context else ""
    if isinstance(exc, StudioError):
        return one_line(str(exc)) or type(exc).__name__
    if is_out_of_memory(exc):
        _LOG.warning("out of memory%s: %s", where, one_line(str(exc)))
        return OUT_OF_MEMORY_MESSAGE
    _LOG.error("unexpected error%s", where, exc_info=(type(exc), exc, exc.__traceback__))
    return GENERIC_MESSAGE
