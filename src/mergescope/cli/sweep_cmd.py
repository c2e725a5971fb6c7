"""Commands for this capability are registered here (not built yet)."""


def register(app) -> None:
    """Add this module's commands to the app."""
