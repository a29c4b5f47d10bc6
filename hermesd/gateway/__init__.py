"""The HTTP gateway: Ollama- and OpenAI-compatible endpoints in front of the hermesd daemon.

A separate process (``hermesd gateway``) that translates HTTP requests into jobs submitted through
``hermes_client``; the daemon stays ZeroMQ-first. It imports neither torch nor the daemon: chat
templates are applied by the daemon (generate jobs take chat messages as inputs).
"""
