"""What one request's exchange has decided and what has happened to it: the fields of an
``Exchange``, whose steps are in exchange.py.

The fields are their own extension type so that compiled code elsewhere (the attempt, the
cache's fresh hit, the access line) reads and writes them as C fields: state.pxd declares
them, and those modules cimport it without importing the pipeline's steps (the attempt
could not cimport the exchange, which imports it). As Python, the fields set where first
used (see ``Exchange.__init__``) read None, and ``filter_at`` 0, until then, as C fields
do.
"""

from __future__ import annotations

try:
    import cython
except ModuleNotFoundError:  # run as Python where Cython is not installed
    from proxy import cythonshim as cython


@cython.cclass
class ExchangeState:
    """An exchange's fields (state.pxd): see ``proxy.pipeline.exchange.Exchange``."""


if not cython.compiled:
    for _unset in (
        "body_chunked",
        "collector",
        "head_bytes",
        "last_error",
        "last_response",
        "pinned",
        "replayable",
        "retry_started",
        "sticky_presented",
        "suspended_on",
        "tunnel",
    ):
        setattr(ExchangeState, _unset, None)
    ExchangeState.filter_at = 0
