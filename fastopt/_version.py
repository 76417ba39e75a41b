"""The version of fastopt, in one place: pyproject.toml reads it ([tool.setuptools.dynamic],
statically, without importing fastopt) and fastopt/__init__.py re-exports it."""

__version__ = "0.1.0"
