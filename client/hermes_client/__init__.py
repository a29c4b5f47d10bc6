"""hermes_client: submit jobs to a hermesd daemon (pyzmq + msgpack; no torch).

    from hermes_client import Client
    with Client("ipc:///run/hermesd/hermesd.sock") as client:
        print(client.generate("smollm2", "What is the capital of France?", max_new_tokens=24)["text"])
"""

from hermes_client.client import Client, Job, default_endpoint
from hermes_client.errors import (
    Conflict,
    DaemonUnreachable,
    HermesClientError,
    JobCancelled,
    JobFailed,
    ServerError,
    TryLater,
)
from hermes_client.protocol import PROTOCOL_VERSION, ErrorCode, JobState
from hermes_client.version import __version__

__all__ = ["Client", "Job", "default_endpoint", "HermesClientError", "DaemonUnreachable", "ServerError",
           "TryLater", "Conflict", "JobFailed", "JobCancelled", "ErrorCode", "JobState", "PROTOCOL_VERSION",
           "__version__"]
