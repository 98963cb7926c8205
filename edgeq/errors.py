"""One exception type for every mistake a user can fix.

The CLI prints ``str(error)`` as a single line and exits non-zero, so each
message says what went wrong and what to do about it.
"""

from __future__ import annotations


class EdgeqError(Exception):
    """A user-fixable problem: ``cause`` and ``fix`` are joined on one line."""

    exit_code = 2

    def __init__(self, cause: str, fix: str = "") -> None:
        self.cause = cause.rstrip(".")
        self.fix = fix.rstrip(".")
        super().__init__(f"{self.cause}. {self.fix}." if self.fix else f"{self.cause}.")


class AccuracyError(EdgeqError):
    """The shipped program missed an accuracy threshold."""

    exit_code = 3
    #: the build's report (what was measured), where the build that missed made one; its artifacts
    #: are not written
    report: dict | None = None


class SdkMissingError(EdgeqError):
    """A backend needs a vendor SDK that is not installed."""

    exit_code = 4


class ConfigError(EdgeqError, ValueError):
    """An invalid setting (a config field, a recipe's QAT setting, a command-line option)."""
