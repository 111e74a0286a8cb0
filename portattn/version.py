"""The package version, in one place (``portattn.__version__``, ``portattn --version``, bench records)."""

__version__ = "0.1.0"
