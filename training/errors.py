"""User-input errors that the command-line tools report as one line instead of a traceback.

``cli_message`` gives that line (``cli.run_cli`` prints it, exit status 1): a ``BadRowError`` becomes
``error: <file>: row N: <reason> (use --skip-bad-rows to skip such rows)``, a ``UserError`` (data file not found /
unreadable format, LoRA targets the model lacks) ``error: <message>``.
"""

from __future__ import annotations

SKIP_HINT = "use --skip-bad-rows to skip such rows"


class BadRowError(ValueError):
    """A data row that cannot be used; the message is ``<source>: row <N>: <reason>`` (N 1-based: the line number
    of a JSON-lines file). CLIs report it as one line plus the ``--skip-bad-rows`` hint (``cli_message``)."""


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
    if isinstance(exc, BadRowError):
        return f"error: {one_line(str(exc))} ({SKIP_HINT})"
    if isinstance(exc, UserError):
        return f"error: {one_line(str(exc))}"
    return None
