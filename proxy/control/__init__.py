"""The process: daemon, supervisor and workers, the admin API, config generations, reload, drain."""
