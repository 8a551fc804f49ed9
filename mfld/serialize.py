"""JSON-native conversion of results (NumPy arrays and scalars, tuples, non-finite floats).

Core modules and the app layer both write results as strict JSON; the conversion lives here so
that no core module imports the app layer.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["jsonable"]


def jsonable(o, *, nonfinite_as_str: bool = False, nonfinite_as_null: bool = False):
    """``o`` with NumPy arrays/scalars, tuples and dict keys made JSON-native (recursively).
    ``nonfinite_as_str``: nan/inf floats become the strings "nan", "inf", "-inf";
    ``nonfinite_as_null``: they become None (``null``). Either gives strict JSON."""
    kw = dict(nonfinite_as_str=nonfinite_as_str, nonfinite_as_null=nonfinite_as_null)
    if isinstance(o, dict):
        return {str(k): jsonable(v, **kw) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v, **kw) for v in o]
    if isinstance(o, np.ndarray):
        return jsonable(o.tolist(), **kw)
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        if nonfinite_as_null:
            return None
        if nonfinite_as_str:
            return str(o)
    return o
