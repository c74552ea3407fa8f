"""Errors the user can fix (exit code 2) as opposed to bugs (exit code 1)."""

import difflib


class UserError(Exception):
    """Bad config, data or arguments. The CLI prints the message alone and exits with code 2."""


class ConfigError(UserError):
    pass


class Row(int):
    """A record's position in a table (Parquet, a saved dataset): 0-based, as `table[N]` reads it, and shown as
    'row N' where a text file's record shows its line."""


def position(line) -> str:
    """'line N' or 'row N' (a table's record), for messages that point at a record."""
    return f"row {int(line)}" if isinstance(line, Row) else f"line {line}"


class DataError(UserError):
    """A problem in a data file; the message names the file, line (a table's row) and field."""

    def __init__(self, path, line, message, field=None):
        if isinstance(line, Row):
            where = f"{path}: row {int(line)}"
        else:
            where = f"{path}:{line}" if line else str(path)
        field_part = f": field '{field}'" if field else ""
        super().__init__(f"{where}{field_part}: {message}")
        self.path, self.line, self.field = path, line, field


def did_you_mean(word, choices, aliases: dict | None = None) -> str:
    """' (did you mean 'x'?)' for the closest choice (or a known alias of `word`), else ''."""
    choices = [str(c) for c in choices]
    alias = (aliases or {}).get(str(word).lower())
    if alias in choices:
        return f" (did you mean '{alias}'?)"
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
