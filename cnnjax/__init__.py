"""cnnjax: a JAX functional CNN library."""

__version__ = "0.1.0"
