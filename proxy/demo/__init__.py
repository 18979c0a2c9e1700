"""The demo stack: three demo upstreams and the proxy in front of them (`sluicegate demo`)."""
