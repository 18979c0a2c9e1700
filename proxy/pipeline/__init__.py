"""One request's way through the proxy: the exchange and its phases, routing, the filters."""
