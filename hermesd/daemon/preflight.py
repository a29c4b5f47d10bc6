"""What ``serve`` checks before it serves, shared with ``serve --check``: every model's store, task
defaults and budget, the TCP keys, the image directories. Nothing is loaded and nothing is profiled;
the first problem is a ConfigError naming the config field (exit 78)."""

from __future__ import annotations

from hermesd.daemon.config import ConfigError, ModelSettings, Settings
from hermesd.daemon.curve import server_secret
from hermesd.errors import BudgetError, StoreError, TaskError
from hermesd.plan.workload import Workload
from hermesd.planning import resolve
from hermesd.store.manifest import Manifest
from hermesd.tasks import check_params, task_problem


def workload_of(settings: ModelSettings) -> Workload:
    """The largest job a model's config allows: what its plan must fit in the budget."""
    return Workload(prompt_tokens=settings.max_prompt_tokens, new_tokens=settings.max_new_tokens)


def check_defaults(name: str, model: ModelSettings, architecture: str) -> None:
    """Each task's defaults: known parameter names, valid values, within the model's limits, and only
    for tasks the model can run."""
    for task, params in model.defaults.items():
        where = f"models.{name}.defaults.{task}"
        problem = task_problem(task, architecture)
        if problem is not None:
            raise ConfigError(f"{where}: {problem}")
        try:
            check_params(task, params)
        except TaskError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if params.get("max_new_tokens", 0) > model.max_new_tokens:
            raise ConfigError(f"{where}: max_new_tokens {params['max_new_tokens']} is over the model's "
                              f"max_new_tokens of {model.max_new_tokens}")


def check_stores_and_defaults(settings: Settings) -> None:
    """Each model's store has a readable manifest and its task defaults are valid (cheap: for SIGHUP)."""
    for name, model in settings.models.items():
        try:
            architecture = Manifest.load(model.store).architecture
        except StoreError as exc:
            raise ConfigError(f"models.{name}.store: {exc}") from None
        check_defaults(name, model, architecture)


def check_model(name: str, model: ModelSettings) -> str:
    """Store readable, defaults valid, the budget at or above the store's minimum; the plan it gets."""
    try:
        manifest = Manifest.load(model.store)
    except StoreError as exc:
        raise ConfigError(f"models.{name}.store: {exc}") from None
    check_defaults(name, model, manifest.architecture)
    try:
        resolved = resolve(model.store, model.memory_budget, workload_of(model), prefetch=model.prefetch,
                           resident=model.resident, profile="if-fresh")
    except BudgetError as exc:
        raise ConfigError(f"models.{name}.memory_budget: {exc}") from None
    except (ValueError, StoreError, OSError) as exc:  # unknown resident stage names, unreadable stage files
        raise ConfigError(f"models.{name}: {exc}") from None
    plan = resolved.plan
    return f"{name}: {manifest.architecture}, prefetch {plan.prefetch}, {len(plan.resident)} resident ({resolved.source})"


def check_tcp(settings: Settings) -> None:
    """A tcp_endpoint has its CURVE server key and clients directory, or allow_insecure_tcp."""
    if settings.tcp_endpoint and not settings.allow_insecure_tcp:
        if server_secret(settings) is None:
            raise ConfigError(f"tcp_endpoint {settings.tcp_endpoint} needs CURVE keys: run `hermesd keys` (they go "
                              f"to {settings.resolved_curve_keys_dir()}), or set allow_insecure_tcp = true")
        if not settings.resolved_curve_clients_dir().is_dir():
            raise ConfigError(f"curve_clients_dir {settings.resolved_curve_clients_dir()} does not exist: put the "
                              f"allowed clients' public *.key files there")


def check_settings(settings: Settings) -> list[str]:
    """Everything ``serve`` would refuse, without starting; one line per model on success."""
    lines = [check_model(name, model) for name, model in settings.models.items()]
    check_tcp(settings)
    for directory in settings.image_dirs:
        if not directory.is_dir():
            raise ConfigError(f"image_dirs: {directory} is not a directory")
    return lines
