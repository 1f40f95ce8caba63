"""fxopt's version, recorded in exports (a module of its own: the backend reads it without importing fxopt)."""

__version__ = "0.1.0"
