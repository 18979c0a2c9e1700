"""What the hot modules use of the ``cython`` module, for installs without Cython.

Compiled, ``import cython`` is resolved by the compiler and nothing is imported at run
time. Run as Python, the hot modules import Cython's own pure-Python ``cython`` module
when Cython is installed, and this one when it is not (an installed wheel needs no
Cython): the decorators change nothing, the C types are their Python counterparts.
Only what the hot modules use is here; tests/unit/test_compiled.py checks that.
"""

from __future__ import annotations

# cython.dataclasses.dataclass: as Python, the standard library's.
import dataclasses as dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")

compiled = False

# C types, as the Python types that hold their values.
int = int  # the name cython.int
double = float
bint = bool
uchar = int
Py_ssize_t = int
longlong = int
long = int
Py_UCS4 = str  # one character


def _unchanged(thing: _T) -> _T:
    return thing


cclass = _unchanged
cfunc = _unchanged
ccall = _unchanged
inline = _unchanged
final = _unchanged


def locals(**_types: Any) -> Callable[[_T], _T]:
    return _unchanged


def exceptval(*_args: Any, **_kwargs: Any) -> Callable[[_T], _T]:
    return _unchanged


def cast(_type: Any, value: _T, *, typecheck: bool = False) -> _T:
    return value


def declare(_type: Any, value: Any = None, **_kwargs: Any) -> Any:
    """A C field or variable; as Python, just ``value`` (the instance sets the real one)."""
    return value
