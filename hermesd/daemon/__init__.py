"""The daemon: ZeroMQ server, request handlers, job queue and journal, executor, config, systemd notify."""
