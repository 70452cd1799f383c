"""User-facing errors: each names the problem and the fix, and the CLI prints it as one line."""


class TokenCompileError(Exception):
    """An error caused by the user's input (model, options, files), not by a bug in tokencompile."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} ({fix})" if fix else problem)


class UnsupportedModelError(TokenCompileError):
    """The graph does not have the structure a reduction needs (no blocks, no attention, ...)."""
