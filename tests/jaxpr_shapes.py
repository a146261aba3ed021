"""Shapes of the arrays a traced function creates, for tests of memory use."""

import jax


def iter_avals(jaxpr):
    """Yield the abstract value of every variable in a jaxpr and its sub-jaxprs."""
    for var in list(jaxpr.invars) + list(jaxpr.constvars):
        yield var.aval
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield var.aval
        for param in eqn.params.values():
            params = param if isinstance(param, tuple | list) else (param,)
            for sub in params:
                if hasattr(sub, "eqns"):
                    yield from iter_avals(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    yield from iter_avals(sub.jaxpr)


def traced_shapes(fn, *args) -> list[tuple[int, ...]]:
    """Return the shape of every array created by tracing ``fn(*args)``."""
    closed = jax.make_jaxpr(fn)(*args)
    return [tuple(getattr(aval, "shape", ())) for aval in iter_avals(closed.jaxpr)]
