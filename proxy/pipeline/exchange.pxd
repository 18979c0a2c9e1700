# The Exchange's C layout, so that other compiled modules (the cache's fresh hit, the
# access line) cimport it and read its fields as C fields instead of through Python's
# attribute protocol. exchange.py is the implementation; as Python this file is unused.

cdef class Exchange:
    cdef public object attempt
    cdef public object attempts
    cdef public object body_chunked
    cdef bint books_closed
    cdef public object budget
    cdef public object bytes_out
    cdef public object cache_status
    cdef public object clock
    cdef public object collector
    cdef public object conn
    cdef public object error
    cdef public object extra_headers
    cdef Py_ssize_t filter_at
    cdef public object group
    cdef public object head_bytes
    cdef bint holding_retry
    cdef public object key
    cdef public object last_error
    cdef public object last_response
    cdef public object limit_key
    cdef public object phase
    cdef public object pinned
    cdef public object rate_limited
    cdef public object replayable
    cdef public object request
    cdef public object response_filter
    cdef public object retry_started
    cdef public object route
    cdef public object route_runtime
    cdef public object runtime
    cdef public object server
    cdef public object started
    cdef public object status
    cdef public object sticky_cookie
    cdef public object sticky_presented
    cdef public object suspended_on
    cdef public object trace
    cdef public object tried
    cdef public object tries
    cdef public object tunnel
    cdef public object upstream
    cdef public object upstream_seconds

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
