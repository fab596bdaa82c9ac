"""The package version, in a module of its own so records can read it without the package."""

__version__ = "0.1.0"
