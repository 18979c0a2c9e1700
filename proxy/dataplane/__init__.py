"""Connections: the client side (parse, frame, stream), the upstream side and its pool,
flow control, timers."""
