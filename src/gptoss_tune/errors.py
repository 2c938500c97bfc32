"""The one user-facing error type.

The CLI prints its message (no traceback) and exits non-zero. Messages say where the problem is
(file, row, field) and what to do about it.
"""

from __future__ import annotations


class GptossTuneError(Exception):
    """An error caused by the user's input or environment, with a message meant for them."""


class DataError(GptossTuneError):
    """Bad input data: names the file, the row and the field."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        row: str | None = None,
        field: str | None = None,
        reason: str = "invalid",
    ):
        self.file, self.row, self.field, self.reason, self.detail = file, row, field, reason, message
        where = ", ".join(part for part in (file, row, f"field '{field}'" if field else None) if part)
        super().__init__(f"{where}: {message}" if where else message)

    def located(self, file: str, row: str) -> DataError:
        """The same error, said of the row it was found in."""
        return DataError(self.detail, file=file, row=row, field=self.field, reason=self.reason)
