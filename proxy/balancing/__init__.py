"""Choosing a server: policies, servers and their breakers, health checks, retries, discovery."""
