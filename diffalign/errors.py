"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (config, path, model id, data): shown as one line, exit code 2."""


def error_text(error: Exception) -> str:
    """An exception's message on one line: its first line, with the next one when the first only introduces it
    ("Error(s) in loading state_dict for UNet2DConditionModel:")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
