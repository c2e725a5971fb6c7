"""User-facing errors: one line, naming the file/tensor and the problem; the CLI exits 2."""


class MergescopeError(ValueError):
    """Bad input from the user (file, tensor, recipe, option). Never shown with a traceback."""

    exit_code = 2
