"""The op registry: the name graph JSON gives a step's op -> the class that implements it.

Nothing registers itself by being imported: ``beamzoo.transforms`` lists the
built-in ops and registers them in one place, and a user's own op is
registered with ``register`` (``@bz.register`` on a class whose ``name`` is set).
"""
from __future__ import annotations

OPS: dict[str, type] = {}


def register(cls: type | str):
    """Make the op class ``cls`` known by its ``name``; as a decorator, ``@register`` or
    ``@register("name")`` (which sets the class's ``name``)."""
    if isinstance(cls, str):
        def named(c: type) -> type:
            c.name = cls
            return register(c)
        return named
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} has no name: set name = '...' (what graph JSON calls it)")
    known = OPS.get(name)
    if known is not None and known is not cls and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"op name {name!r} is taken by {known.__module__}.{known.__qualname__}")
    OPS[name] = cls
    return cls


def op_class(name: str) -> type:
    try:
        return OPS[name]
    except KeyError:
        raise ValueError(f"unknown operator {name!r}; known: {', '.join(sorted(OPS))}") from None


__all__ = ["OPS", "op_class", "register"]
