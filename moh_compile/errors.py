"""User-facing errors: one clear line, no traceback, non-zero exit from the CLI."""


class MohCompileError(Exception):
    """A problem with the user's input or settings (shown as a single line)."""
