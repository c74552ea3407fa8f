"""Errors the user can fix (exit code 2) as opposed to bugs (exit code 1)."""


class UserError(Exception):
    """Bad config, data or arguments. The CLI prints the message alone and exits with code 2."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    """A problem in a data file; the message names the file, line and field."""

    def __init__(self, path, line, message, field=None):
        where = f"{path}:{line}" if line else str(path)
        field_part = f": field '{field}'" if field else ""
        super().__init__(f"{where}{field_part}: {message}")
        self.path, self.line, self.field = path, line, field
