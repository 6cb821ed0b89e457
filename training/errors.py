"""User-input errors that the command-line tools report as one line (``error: …``) instead of a traceback.

``cli_errors`` is a context manager (and decorator) for CLI entry points: a ``training.data.BadRowError``
becomes ``error: <file>: row N: <reason> (use --skip-bad-rows to skip such rows)``, a ``UserError`` (data file
not found / unreadable format, LoRA targets the model lacks) ``error: <message>``; both exit with status 1.
"""

from __future__ import annotations

import contextlib
import sys

SKIP_HINT = "use --skip-bad-rows to skip such rows"


class UserError(Exception):
    """An error in the user's input (paths, formats, names) that a CLI reports as one line."""


class DataNotFoundError(UserError, FileNotFoundError):
    """A data source that is neither a local file / folder nor a loadable Hub dataset."""


class DataFormatError(UserError, ValueError):
    """A local data file that ``read_rows`` cannot read (unknown suffix, missing decompressor, bad JSON)."""


class LoraTargetError(UserError, ValueError):
    """``lora_target_modules`` names modules the model lacks, or a keyword finds none."""


def one_line(text: str) -> str:
    """``text`` with line breaks shown as ``\\n`` (so a message stays on one line)."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def cli_message(exc: BaseException) -> str | None:
    """The one-line CLI message of ``exc``, or ``None`` when it is not a user-input error."""
    from .data import BadRowError

    if isinstance(exc, BadRowError):
        return f"error: {one_line(str(exc))} ({SKIP_HINT})"
    if isinstance(exc, UserError):
        return f"error: {one_line(str(exc))}"
    return None


@contextlib.contextmanager
def cli_errors():
    """Report bad rows and other user-input errors as one line on stderr and exit 1 (no traceback).

    Use as ``with cli_errors(): ...`` or as the decorator ``@cli_errors()`` of a ``*_main`` function.
    """
    try:
        yield
    except Exception as exc:
        msg = cli_message(exc)
        if msg is None:
            raise
        print(msg, file=sys.stderr, flush=True)
        raise SystemExit(1) from None
