"""The gateway's way to the daemon: ``hermes_client`` calls run on worker threads, awaited from asyncio.

A ``Client`` is not thread-safe, so each HTTP request gets its own, used by one worker thread at a
time under a lock. Waiting for a job is cut into short steps, so an awaiting request can be
cancelled (its HTTP client went away) between two steps; the job is then cancelled in the daemon.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from typing import Any, Awaitable, Callable

from hermes_client import Client
from hermes_client.client import ipc_path
from hermes_client.errors import HermesClientError
from hermes_client.textchunks import TextChunks

from hermesd.gateway.config import GatewaySettings
from hermesd.gateway.errors import GatewayError, from_client_error

log = logging.getLogger("hermesd.gateway")
STEP_S = 0.5        # longest a worker waits on a job before the awaiting request may be cancelled
MAX_WORKERS = 64    # concurrent daemon calls; each HTTP request holds at most one at a time


class DaemonBridge:
    """Runs hermes_client calls for the gateway's requests."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.endpoint = settings.daemon_endpoint()
        self.pool = concurrent.futures.ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="hermesd-gateway")
        self._models: tuple[float, list[dict[str, Any]]] | None = None

    def client(self) -> Client:
        """A new client; refuses at once when an ipc socket file is missing (the daemon is not up)."""
        path = ipc_path(self.endpoint)
        if path is not None and not os.path.exists(path):
            raise GatewayError("unreachable", f"no daemon socket at {path} (is hermesd running?)")
        return Client(self.endpoint, timeout=self.settings.daemon_timeout_s, retries=self.settings.daemon_retries)

    async def run(self, call: Callable[[], Any]) -> Any:
        """``call()`` on a worker thread; hermes_client errors become GatewayErrors."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, call)
        except HermesClientError as exc:
            raise from_client_error(exc) from None

    async def request(self, op: str) -> dict[str, Any]:
        """One request (status, models, ping) on a short-lived client."""
        def call() -> dict[str, Any]:
            with self.client() as client:
                return client.request(op)
        return await self.run(call)

    async def unload(self, model: str) -> bool:
        """Ask the daemon to release a model's memory; True if it was loaded."""
        def call() -> bool:
            with self.client() as client:
                return client.unload(model)
        return await self.run(call)

    async def models(self) -> list[dict[str, Any]]:
        """The daemon's models, cached for ``models_cache_s`` (clients list them before every call)."""
        now = time.monotonic()
        if self._models is None or now - self._models[0] > self.settings.models_cache_s:
            self._models = (now, (await self.request("models"))["models"])
        return self._models[1]

    async def model(self, name: str) -> dict[str, Any]:
        """One model's description; ``NAME:latest`` (Ollama's tag) names ``NAME``. Unknown: 404."""
        wanted = name.removesuffix(":latest")
        for model in await self.models():
            if model["name"] == wanted:
                return model
        raise GatewayError("unknown_model", f"model {name!r} is not served by this hermesd "
                                            f"(models: {', '.join(m['name'] for m in await self.models())})")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class DaemonJob:
    """One job of one HTTP request: submit, wait in short steps, cancel when abandoned."""

    def __init__(self, bridge: DaemonBridge) -> None:
        self.bridge = bridge
        self.job = None
        self._client: Client | None = None
        self._lock = threading.Lock()
        self._ended = False
        self._chunks = TextChunks()

    def _locked(self, call: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with self._lock:
                return call()
        return run

    async def submit(self, task: str, model: str, inputs: Any, params: dict[str, Any], progress: bool = False) -> str:
        """Queue the job; a refusal (unknown model, bad params, busy) raises GatewayError. Returns its id.
        ``progress``: ask for progress messages (a streamed answer's text comes with them)."""
        def call() -> str:
            self._client = self.bridge.client()
            self.job = self._client.submit(task, model, inputs, params, priority=self.bridge.settings.priority,
                                           progress=progress)
            return self.job.id
        try:
            return await self.bridge.run(self._locked(call))
        except BaseException:
            self._ended = True
            self.release()
            raise

    async def result(self, on_text: Callable[[str], Awaitable[None]] | None = None) -> dict[str, Any]:
        """Wait for the job's result. Cancelled while waiting (the HTTP client left): the job is
        cancelled in the daemon. Past ``job_timeout_s``: cancelled, and a ``timeout`` error.
        ``on_text``: awaited with each piece of a generate job's text as it arrives (submitted with
        ``progress``); the pieces add up to the result's text, which it still holds."""
        deadline = time.monotonic() + self.bridge.settings.job_timeout_s
        try:
            while True:
                ended, result, pieces = await self.bridge.run(self._locked(self._step))
                if ended and on_text is not None:
                    pieces.append(self._chunks.rest(result.get("text", "")))
                for piece in filter(None, pieces if on_text is not None else ()):
                    await on_text(piece)
                if ended:
                    self._ended = True
                    return result
                if time.monotonic() > deadline:
                    raise GatewayError("timeout", f"the job took longer than {self.bridge.settings.job_timeout_s:g} s")
        finally:
            self.release()

    def _step(self) -> tuple[bool, Any, list[str]]:
        """Wait up to STEP_S: (ended, result, text pieces); returns early once text has come."""
        pieces: list[str] = []
        try:
            for event in self.job.progress(STEP_S):
                if piece := self._chunks.take(event):
                    pieces.append(piece)
                    return False, None, pieces
        except TimeoutError:
            return False, None, pieces
        try:
            return True, self.job.result(0), pieces
        except HermesClientError:
            self._ended = True
            raise

    def release(self) -> None:
        """Close the client on a worker thread (after any step in flight); cancel the job if it may still run."""
        def close() -> None:
            if self._client is None:
                return
            if self.job is not None and not self._ended:
                try:
                    self._client.cancel(self.job.id)
                    log.info("job %s cancelled: its HTTP client went away or it timed out", self.job.id)
                except Exception as exc:  # the daemon may be gone; nothing more to do
                    log.warning("job %s: cancel failed: %s", self.job.id, exc)
            self._client.close()
            self._client = None
        try:
            self.bridge.pool.submit(self._locked(close))
        except RuntimeError:  # the pool is shut down: the gateway is stopping
            pass
