# The exchange's steps as C methods (exchange.py); its fields are ExchangeState's
# (state.pxd). As Python this file is unused.

from proxy.pipeline.state cimport ExchangeState


cdef class Exchange(ExchangeState):
    cpdef _enter(self, phase)
    cdef _run_filters(self)
    cdef proceed(self)
    cdef bint holds_body(self)
    cdef prepare(self)
    cdef set _tried_set(self)
    cdef _select(self)
    cdef _connect_again(self)
    cdef _hold_failed(self, response)
    cdef _try_failed(self, tuple result)
    cdef _release_retry(self)
    cdef _give_up(self)
    cdef _answer_with_best(self)
    cpdef retry_refusal(self, word, bint response_started)
    cpdef double budget_left(self)
    cdef tuple method_facts(self)
    cdef _open_tunnel(self, response)
    cdef _forward_over(self)
    cdef answered(self)
    cdef close_books(self)
    cdef _crashed(self)
