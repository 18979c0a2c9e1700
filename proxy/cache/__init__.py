"""The response cache (RFC 9111), cut by concept as pingora-cache is.

``control`` parses the directives, ``policy`` decides what may be stored and for how long,
``key`` and ``variance`` name what is stored, ``store``/``memory`` keep it, ``lock`` makes
concurrent misses for one key send one request upstream. None of them does network I/O:
the request pipeline calls them.
"""
