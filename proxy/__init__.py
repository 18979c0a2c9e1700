"""Sluicegate: an asyncio Layer-7 reverse-proxy load balancer."""

__version__ = "0.1.0"
