"""The version of peftc (its own module, so storage and export read it without importing the package API)."""

__version__ = "0.1.0"
