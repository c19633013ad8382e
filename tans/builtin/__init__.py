"""Built-in offline task corpus: sources installable from the package registries (no web).

See :mod:`tans.builtin.base` for the source contract, :mod:`tans.builtin.registry` for the
sources and :mod:`tans.builtin.catalog` for the tasks they yield.
"""
