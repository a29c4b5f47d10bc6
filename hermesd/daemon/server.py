"""The daemon: ``hermesd serve``. STARTING -> READY -> DRAINING -> STOPPED.

The main thread owns the ROUTER socket and the journal and never waits on inference: it answers
requests, journals and queues jobs, forwards the executor's events as replies, and on each tick pings
the systemd watchdog (only while the executor makes progress), updates STATUS= and applies the
watchdogs. Signal handlers only record the signal; the loop acts on it (SIGTERM/SIGINT: drain and
stop; SIGHUP: re-read the config).
"""

from __future__ import annotations

import enum
import errno
import logging
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import zmq
from hermes_client import protocol
from hermes_client.protocol import ErrorCode, JobState, Reply
from zmq.auth.thread import ThreadAuthenticator

from hermesd.daemon import logs
from hermesd.daemon.config import ConfigError, Settings, load_settings
from hermesd.daemon.counters import JobCounters
from hermesd.daemon.curve import reload_clients
from hermesd.daemon.executor import Event, Executor, JobHook
from hermesd.daemon.handlers import RequestHandlers, final_message
from hermesd.daemon.hosting import ModelHost, open_model
from hermesd.daemon.identity import partial_uid_namespace
from hermesd.daemon.jobs import JobQueue, QueuedJob
from hermesd.daemon.journal import Journal
from hermesd.daemon.notify import Notifier
from hermesd.daemon.preflight import check_stores_and_defaults, check_tcp
from hermesd.daemon.sockets import WakePair, open_router, receive
from hermesd.daemon.statedir import AlreadyRunning, make_private, open_state_dir
from hermesd.daemon.status_report import DaemonView, status_line
from hermesd.daemon.watchdogs import Watchdogs
from hermesd.errors import HermesError
from hermesd.version import __version__

log = logging.getLogger("hermesd.server")
EX_OK, EX_SOFTWARE, EX_CONFIG = 0, 70, 78
TICK_S = 0.25
BATCH = 64                 # requests handled per loop turn before the outbox gets its turn
SHUTDOWN_GRACE_S = 5.0     # after the drain timeout: how long an interrupted job may take to stop
PURGE_EVERY_S = 600.0
STARTUP_EXTEND_S = 600.0   # EXTEND_TIMEOUT_USEC per model loaded (profiling can take minutes)


class State(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


class Daemon:
    """One hermesd process: its settings, models, journal, queue, executor and sockets."""

    def __init__(self, settings: Settings, config_path: Path | None = None,
                 executor_hook: JobHook | None = None) -> None:
        """``executor_hook`` runs on the executor thread as each job starts (a seam for tests only)."""
        self.settings = settings
        self.config_path = config_path
        self.state = State.STARTING
        self.started = time.monotonic()
        self.notifier = Notifier()
        self.hosts: dict[str, ModelHost] = {}
        self.queue = JobQueue(settings.queue_size)
        self.running: dict[str, QueuedJob] = {}  # job id -> the job the executor holds
        self.counters = JobCounters()  # jobs ended since start, for status (Prometheus)
        self.watchdogs = Watchdogs(settings)
        self.wakeup = WakePair()
        self.executor = Executor(self.queue, self.hosts, self.wakeup.wake, settings.progress_interval_s,
                                 before_job=executor_hook, images=settings.image_policy())
        self.handlers = RequestHandlers(self)
        self.journal: Journal | None = None  # opened by startup(), once the state directory is locked
        self.context: zmq.Context | None = None
        self.router: zmq.Socket | None = None
        self.endpoints: list[str] = []
        self.authenticator: ThreadAuthenticator | None = None  # ZAP handler of a CURVE tcp_endpoint
        self.poller = zmq.Poller()
        self._lock_fd: int | None = None
        self._signals: list[int] = []
        self._drain_deadline = 0.0
        self._shutdown_sent = False
        self._last_purge = 0.0
        self._stall_warned = False

    @property
    def accepting(self) -> bool:
        """Whether new jobs are taken (READY); draining and stopping daemons refuse them."""
        return self.state == State.READY

    # -- lifecycle ----------------------------------------------------------------------------
    def run(self) -> int:
        """Start, serve until stopped, shut down; returns the exit status."""
        try:
            self.startup()
        except ConfigError as exc:
            log.error("configuration error: %s", exc)
            return EX_CONFIG
        except AlreadyRunning as exc:
            log.error("%s", exc)
            return EX_SOFTWARE
        except (HermesError, OSError, sqlite3.Error) as exc:  # a damaged store, an unreadable journal
            log.error("cannot start: %s", exc)
            return EX_SOFTWARE
        try:
            self.main_loop()
        finally:
            self.shutdown()
        return EX_OK

    def startup(self) -> None:
        state_dir = self.settings.resolved_state_dir()
        self._lock_fd = open_state_dir(state_dir)  # umask 077, the directory 0700, the lock
        self.journal = Journal(state_dir / "journal.sqlite3")
        for path in self.journal.files():  # a journal made before this rule, or under another umask
            make_private(path, 0o600)
        self.journal.purge(self.settings.result_retention_s)
        check_tcp(self.settings)  # before minutes of model loading: a missing key is a config error
        if partial_uid_namespace():
            log.warning("in a user namespace (PrivateUsers=): local clients whose uid is not mapped all read as "
                        "uid 65534 and share one job identity")
        for name, model in self.settings.models.items():
            self.notifier.extend_timeout(STARTUP_EXTEND_S, f"loading model {name}")
            log.info("loading model %s from %s", name, model.store)
            self.hosts[name] = open_model(name, model, progress=lambda text: self.notifier.extend_timeout(
                STARTUP_EXTEND_S, text))
        self._restore_jobs()
        self._bind()
        self.executor.start()
        self._install_signals()
        self.state = State.READY
        self.notifier.ready(self._status_line())
        log.info("ready on %s: %d model(s), %d job(s) queued", self.endpoints, len(self.hosts), len(self.queue))

    def _restore_jobs(self) -> None:
        """Queue again what was queued or running when the daemon last stopped (crash or restart)."""
        for record in self.journal.unfinished():
            if record.cancel_requested is not None:
                self.journal.finish(record.id, JobState.CANCELLED)
                log.info("job %s was cancelled before the daemon stopped; it stays cancelled", record.id)
                continue
            if record.state == JobState.RUNNING.value and record.attempts >= self.settings.max_attempts:
                message = f"the daemon stopped during this job {record.attempts} times; not trying again"
                self.journal.finish(record.id, JobState.FAILED, error=(ErrorCode.TASK_FAILED.value, message))
                log.error("job %s given up: %s", record.id, message)
                continue
            if record.state == JobState.RUNNING.value:
                self.journal.requeue(record.id)
                log.warning("job %s was running when the daemon stopped; running it again", record.id)
            self.queue.put(QueuedJob(record), force=True)

    def _bind(self) -> None:
        self.context = zmq.Context()
        self.router, self.endpoints, self.authenticator = open_router(self.context, self.settings)
        self.poller.register(self.router, zmq.POLLIN)
        self.poller.register(self.wakeup.reader.fileno(), zmq.POLLIN)

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self.wakeup.writer.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda number, frame: self._signals.append(number))

    def main_loop(self) -> None:
        while self.state != State.STOPPED:
            ready = dict(self.poller.poll(TICK_S * 1000))
            if self.wakeup.reader.fileno() in ready:
                self.wakeup.drain()
            self._handle_signals()  # before requests: a submit that arrives with SIGTERM is refused
            for step in (self._receive_batch if self.router in ready else None, self._handle_events, self.on_tick):
                if step is not None:
                    self._guarded(step)

    def _guarded(self, step) -> None:
        """One loop step; a failure (a full disk under the journal, a sensor that lies) is logged, not fatal."""
        try:
            step()
        except Exception:
            log.exception("%s failed; still serving", step.__name__)

    def shutdown(self) -> None:
        """Close sockets and journal. Queued jobs stay journaled for the next start."""
        if self.executor.is_alive():
            self.executor.stop()
            self.executor.join(timeout=1.0)
            self._handle_events()  # record what ended while stopping
        if self.router is not None:
            self.router.close()
        if self.authenticator is not None:
            self.authenticator.stop()
        if self.context is not None:
            self.context.term()
        if not self.executor.is_alive():
            for host in self.hosts.values():
                host.close()
        if self.journal is not None:
            self.journal.close()
        self.state = State.STOPPED
        log.info("stopped; %d job(s) left queued in the journal", len(self.queue))

    # -- signals ------------------------------------------------------------------------------------
    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGHUP:
                self.reload()
            elif self.state == State.READY:
                self.begin_drain(signal.Signals(signum).name)

    def begin_drain(self, why: str) -> None:
        """Stop taking jobs; let the running one finish within drain_timeout_s."""
        self.state = State.DRAINING
        self._drain_deadline = time.monotonic() + self.settings.drain_timeout_s
        self.executor.stop()
        self.notifier.stopping(f"draining ({why}): {len(self.queue)} queued job(s) stay journaled")
        log.info("%s: draining (timeout %.0f s); %d queued job(s) stay in the journal", why,
                 self.settings.drain_timeout_s, len(self.queue))

    def _drain_step(self) -> None:
        current = self.executor.current
        now = time.monotonic()
        if current is None or not self.executor.is_alive():
            self.state = State.STOPPED
        elif now >= self._drain_deadline and not self._shutdown_sent:
            for job in self.executor.batch:  # every member of a running batch
                log.warning("drain timeout: interrupting job %s; it stays journaled and runs at the next start",
                            job.id)
                job.cancel_reason = "shutdown"
                job.cancel.set()
            self._shutdown_sent = True
        elif self._shutdown_sent and now >= self._drain_deadline + SHUTDOWN_GRACE_S:
            log.error("job %s did not stop; exiting anyway (it runs again at the next start)", current.id)
            self.state = State.STOPPED

    def reload(self) -> None:
        """SIGHUP: re-read the config. An invalid file is refused and the running config kept."""
        self.notifier.reloading()
        try:
            new = load_settings(self.config_path)
            check_stores_and_defaults(new)  # a typo in a default would otherwise fail every job
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            self.notifier.ready(self._status_line())
            return
        old = self.settings
        if [new.resolved_endpoint(), new.tcp_endpoint] != [old.resolved_endpoint(), old.tcp_endpoint]:
            log.warning("endpoint changes take effect at the next restart")
        changed = {n for n, m in new.models.items() if old.models.get(n) != m}
        removed = set(old.models) - set(new.models)
        if changed or removed:
            self.executor.between_jobs(lambda: self._swap_models(new, changed, removed))
        self.queue.capacity = new.queue_size
        self.executor.progress_interval_s = new.progress_interval_s
        self.executor.images = new.image_policy()
        self.watchdogs.configure(new)
        reload_clients(self.authenticator, new)
        logs.set_level(new.log_level)
        self.settings = new
        self.notifier.ready(self._status_line())
        log.info("config reloaded: %d model(s) changed, %d removed; %d job(s) still queued",
                 len(changed), len(removed), len(self.queue))

    def _swap_models(self, new: Settings, changed: set[str], removed: set[str]) -> None:
        """On the executor thread, between jobs: open changed models, close removed ones."""
        for name in removed:
            self.hosts.pop(name).close()
        for name in changed:
            try:
                host = open_model(name, new.models[name])
            except Exception as exc:  # keep serving the old version (if any) rather than nothing
                log.error("model %s: reload failed, keeping the previous version: %s", name, exc)
                continue
            old = self.hosts.get(name)
            self.hosts[name] = host
            if old is not None:
                old.close()

    # -- requests ------------------------------------------------------------------------------
    def _receive_batch(self) -> None:
        for _ in range(BATCH):
            try:
                incoming = receive(self.router, self.settings.max_message_frames, self.settings.max_message_bytes)
            except zmq.Again:
                return
            if incoming.problem is not None:
                log.debug("message dropped: %s", incoming.problem)  # debug: a flood must not flood the log
                self.send(incoming.envelope, {**protocol.error(ErrorCode.TOO_LARGE, incoming.problem), "rid": None})
            elif incoming.payload is not None:
                self.handlers.dispatch(incoming.envelope, incoming.payload, incoming.identity)

    def send(self, envelope: list[bytes] | None, body: dict[str, Any]) -> bool:
        """Send to one client; False if it is gone (its job's result stays fetchable by id)."""
        if envelope is None:
            return False
        try:
            self.router.send_multipart([*envelope, protocol.pack(body)], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EHOSTUNREACH, zmq.EAGAIN):
                log.warning("reply not sent: %s", exc)
            return False

    # -- executor events ---------------------------------------------------------------------------
    def _handle_events(self) -> None:
        while not self.executor.outbox.empty():
            event = self.executor.outbox.get()
            getattr(self, f"_on_{event.kind.value}")(event)

    def _on_started(self, event: Event) -> None:
        self.running[event.job.id] = event.job
        self.journal.mark_running(event.job.id)
        log.info("job %s started (%s %s)", event.job.id, event.job.record.model, event.job.record.task)

    def _on_progress(self, event: Event) -> None:
        message = {"type": Reply.PROGRESS.value, "job_id": event.job.id, "tokens": event.tokens, "stages": event.stages}
        if event.text is not None:  # generate: the text since the previous message (docs/PROTOCOL.md)
            message.update(text=event.text, text_offset=event.text_offset)
        self.send(event.job.reply_to, message)

    def _on_finished(self, event: Event) -> None:
        self.running.pop(event.job.id, None)
        self.finish(event.job, event.state, event.result, event.error)

    def _on_requeued(self, event: Event) -> None:
        self.running.pop(event.job.id, None)
        self.journal.requeue(event.job.id)
        log.info("job %s interrupted (shutdown, or a higher-priority job took its place in a batch); it stays "
                 "queued", event.job.id)

    def finish(self, job: QueuedJob, state: JobState, result: Any = None, error: tuple[str, str] | None = None) -> None:
        """Journal a job's end, then send its one final reply."""
        self.journal.finish(job.id, state, result, error)
        record = self.journal.get(job.id)
        self.counters.record(record)
        delivered = self.send(job.reply_to, final_message(record))
        took = (record.finished or 0) - (record.started or record.submitted)
        detail = f"{error[0]}: {error[1]}" if error else f"{took:.2f} s"
        log.info("job %s %s (%s)%s", job.id, state.value, detail, "" if delivered else "; kept for fetching by id")

    # -- tick ---------------------------------------------------------------------------------------
    def on_tick(self) -> None:
        if self.state == State.DRAINING:
            self._drain_step()
        self.watchdogs.apply(self.executor.gate, sum(host.shed_bytes for host in list(self.hosts.values())))
        if self.notifier.watchdog_due() and self._executor_healthy():
            self.notifier.watchdog()
        self.notifier.status(self._status_line())
        if time.monotonic() - self._last_purge > PURGE_EVERY_S:
            self._last_purge = time.monotonic()
            self.journal.purge(self.settings.result_retention_s)

    def _executor_healthy(self) -> bool:
        """Alive and making progress: the only condition under which systemd's watchdog is fed, and what
        ``status`` reports as the executor's health."""
        limit = self.settings.executor_stall_s or (self.notifier.watchdog_usec or 60e6) / 1e6
        stalled_for = time.monotonic() - self.executor.last_progress
        healthy = self.executor.is_alive() and stalled_for < limit
        if not healthy and not self._stall_warned:
            log.error("executor made no progress for %.0f s; withholding watchdog pings", stalled_for)
        self._stall_warned = not healthy
        return healthy

    def view(self) -> DaemonView:
        return DaemonView(state=self.state.value, version=__version__, uptime_s=time.monotonic() - self.started,
                          queued=len(self.queue), current=self.executor.current, journal_counts=self.journal.counts(),
                          executor_healthy=self._executor_healthy(),
                          since_progress_s=time.monotonic() - self.executor.last_progress,
                          watchdogs=self.watchdogs.report(), models=sorted(self.hosts),
                          counters=self.counters.snapshot())

    def _status_line(self) -> str:
        return status_line(self.view()) if self.journal is not None else self.state.value


def serve(config_path: Path | None = None, executor_hook: JobHook | None = None) -> int:
    """Entry point of ``hermesd serve``: load the config (exit 78 if invalid) and run the daemon.

    ``executor_hook``: see ``Daemon``; the ``hermesd serve`` command never passes one.
    """
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        logs.setup("info")
        log.error("configuration error: %s", exc)
        return EX_CONFIG
    logs.setup(settings.log_level)
    return Daemon(settings, config_path, executor_hook).run()
