"""Built-in offline task corpus: sources installable from the package registries (no web).

See :mod:`tans.data.builtin.base` for the source contract, :mod:`tans.data.builtin.registry` for the
sources and :mod:`tans.data.builtin.catalog` for the tasks they yield.
"""
