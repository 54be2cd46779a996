"""tuneloop: a chat assistant that learns from its own users."""


def __getattr__(name: str) -> str:
    """`tuneloop.__version__`: the installed distribution's, which pyproject.toml alone sets. Read
    on first use, so that importing tuneloop's modules (`tuneloop --help`) reads no metadata."""
    if name == "__version__":
        from importlib.metadata import version

        return version("tuneloop")
    raise AttributeError(f"module 'tuneloop' has no attribute {name!r}")
