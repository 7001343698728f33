"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (config, path, model id, data): shown as one line, exit code 2."""


class NotImplementedYet(UserError):
    """A command or option that a later release will provide."""
