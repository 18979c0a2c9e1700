# The exchange's fields as C fields (state.py), for every compiled module that reads or
# writes them: cimported, they are C struct members there, not getset descriptors. As
# Python this file is unused.

cdef class ExchangeState:
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
