"""What the proxy tells about itself: Prometheus metrics, the access log, status statistics."""
