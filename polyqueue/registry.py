"""The app object and its task registry: ``@app.register`` turns a typed async
function into a task spec (payload model, result type, queue, retry, time limit)."""

from __future__ import annotations

import inspect
import typing
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from pydantic import BaseModel, TypeAdapter, ValidationError

from polyqueue.errors import ConfigurationError, UnknownTaskError
from polyqueue.metrics import GuardedMetrics
from polyqueue.retry import Backoff
from polyqueue.settings import Settings, queue_name_problem
from polyqueue.types import TimeoutStrategy

__all__ = ["Polyqueue", "Schedule", "TaskSpec", "find_task", "resolve_task", "task_of"]

Handler = Callable[..., Awaitable[Any]]
F = TypeVar("F", bound=Handler)

# Tasks belong to their app (``app.tasks``). To let ``enqueue(session, payload)`` find the
# app from the payload alone, each registration is also indexed by its payload model, and
# the apps alive in the process are known for lookups by name without an app. Both are weak:
# an app (or a model) that goes away takes its entries with it. Nothing is keyed by task name
# across apps, so two apps with a task of the same name never take each other's place: a
# lookup that several apps could answer is refused, naming them, instead of picking one.
_BY_MODEL: weakref.WeakKeyDictionary[type, weakref.WeakSet[Polyqueue]] = weakref.WeakKeyDictionary()
_APPS: weakref.WeakSet[Polyqueue] = weakref.WeakSet()


@dataclass(frozen=True)
class TaskSpec:
    """A registered handler and its per-task defaults."""

    name: str
    func: Handler
    payload_model: type[BaseModel]
    takes_context: bool
    result_type: Any = None
    queue: str = "default"
    priority: int = 0
    max_attempts: int = 3
    max_run_seconds: float | None = None
    timeout_strategy: TimeoutStrategy = TimeoutStrategy.RETRY
    backoff: Backoff = field(default_factory=Backoff)
    max_payload_bytes: int = 1_000_000
    max_meta_bytes: int = 64 * 1024
    max_result_bytes: int = 1_000_000
    metrics: GuardedMetrics = field(default_factory=lambda: GuardedMetrics(None), repr=False, compare=False)

    @property
    def result_adapter(self) -> TypeAdapter[Any]:
        """Validates a stored result back into the handler's return type."""
        return TypeAdapter(Any if self.result_type in (None, inspect.Signature.empty) else self.result_type)


@dataclass(frozen=True)
class Schedule:
    """A periodic job: ``task`` enqueued with ``payload`` at each ``cron`` slot (UTC).

    ``name`` (default: the task's name) keys the slots' ``unique_key``
    (``cron:{name}:{slot}``), so two schedules of one task need two names.
    """

    name: str
    task: str
    cron: str
    payload: dict[str, Any]


def validate_cron(expression: str, where: str) -> None:
    """``ConfigurationError`` unless croniter is installed and ``expression`` is valid cron."""
    try:
        from croniter import croniter  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigurationError(f"{where}: cron schedules need croniter: pip install 'polyqueue[cron]'") from None
    if not croniter.is_valid(expression):
        raise ConfigurationError(f"{where}: {expression!r} is not a valid cron expression")


def _inspect_handler(func: Handler, name: str) -> tuple[type[BaseModel], bool, Any]:
    if not inspect.iscoroutinefunction(func):
        raise ConfigurationError(f"task {name!r}: the handler must be an async function")
    params = list(inspect.signature(func).parameters.values())
    if not params or len(params) > 2:
        raise ConfigurationError(
            f"task {name!r}: the handler takes (payload: Model) or (payload: Model, ctx: JobContext)"
        )
    hints = typing.get_type_hints(func)
    model = hints.get(params[0].name)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise ConfigurationError(
            f"task {name!r}: annotate the first parameter with a pydantic BaseModel subclass, got {model!r}"
        )
    return model, len(params) == 2, hints.get("return")


class Polyqueue:
    """A polyqueue application: its settings and its registered tasks.

    >>> app = Polyqueue()
    >>> class Email(BaseModel):
    ...     to: str
    >>> @app.register(max_attempts=5)
    ... async def send_email(payload: Email) -> None: ...
    """

    def __init__(self, settings: Settings | None = None, *, metrics: object | None = None, **overrides: Any) -> None:
        """``settings`` (else read from ``POLYQUEUE_*``), with ``overrides`` applied; ``metrics``
        is a :class:`~polyqueue.metrics.MetricsHook` for this app's enqueues and workers."""
        self.metrics = GuardedMetrics(metrics)
        base = settings or Settings()
        self.settings: Settings = base.model_copy(update=overrides) if overrides else base
        if overrides:  # re-validate the overridden values
            self.settings = Settings.model_validate(self.settings.model_dump())
        self.tasks: dict[str, TaskSpec] = {}
        self.schedules: dict[str, Schedule] = {}
        _APPS.add(self)

    @overload
    def register(self, func: F, /) -> F: ...

    @overload
    def register(
        self,
        *,
        name: str | None = None,
        queue: str = "default",
        priority: int = 0,
        max_attempts: int = 3,
        max_run_seconds: float | None = None,
        timeout_strategy: TimeoutStrategy | str = TimeoutStrategy.RETRY,
        backoff: Backoff | None = None,
        cron: str | None = None,
    ) -> Callable[[F], F]: ...

    def register(  # type: ignore[misc]  # mypy cannot pair a decorator-factory TypeVar with the bare form
        self,
        func: F | None = None,
        /,
        *,
        name: str | None = None,
        queue: str = "default",
        priority: int = 0,
        max_attempts: int = 3,
        max_run_seconds: float | None = None,
        timeout_strategy: TimeoutStrategy | str = TimeoutStrategy.RETRY,
        backoff: Backoff | None = None,
        cron: str | None = None,
    ) -> F | Callable[[F], F]:
        """Register an async handler ``(payload: Model[, ctx: JobContext]) -> Result``.

        The task name defaults to the function's name. Raises ``ConfigurationError``
        for a handler of the wrong shape or a name registered twice. With ``cron``
        (e.g. ``"*/5 * * * *"``, UTC) the task is also enqueued periodically, with the
        payload model's defaults; see :meth:`schedule` for payloads that need values.
        """

        def decorate(fn: F) -> F:
            task_name = name or fn.__name__
            if task_name in self.tasks:
                raise ConfigurationError(f"task {task_name!r} is registered twice")
            if max_attempts < 1:
                raise ConfigurationError(f"task {task_name!r}: max_attempts must be >= 1")
            if max_run_seconds is not None and max_run_seconds <= 0:
                raise ConfigurationError(f"task {task_name!r}: max_run_seconds must be > 0")
            queue_problem = queue_name_problem(queue)
            if queue_problem:
                raise ConfigurationError(f"task {task_name!r}: {queue_problem}")
            model, takes_ctx, result_type = _inspect_handler(fn, task_name)
            if cron is not None:
                validate_cron(cron, f"task {task_name!r}")
                try:
                    default_payload = model().model_dump(mode="json")
                except ValidationError:
                    raise ConfigurationError(
                        f"task {task_name!r}: cron= enqueues the payload model's defaults, but "
                        f"{model.__name__} has required fields; use app.schedule({task_name!r}, cron, payload=...)"
                    ) from None
            spec = TaskSpec(
                name=task_name,
                func=fn,
                payload_model=model,
                takes_context=takes_ctx,
                result_type=result_type,
                queue=queue,
                priority=priority,
                max_attempts=max_attempts,
                max_run_seconds=max_run_seconds,
                timeout_strategy=TimeoutStrategy(timeout_strategy),
                backoff=backoff or Backoff(),
                metrics=self.metrics,
                max_payload_bytes=self.settings.max_payload_bytes,
                max_meta_bytes=self.settings.max_meta_bytes,
                max_result_bytes=self.settings.max_result_bytes,
            )
            self.tasks[task_name] = spec
            _BY_MODEL.setdefault(spec.payload_model, weakref.WeakSet()).add(self)
            if cron is not None:
                self.schedules[task_name] = Schedule(task_name, task_name, cron, default_payload)
            return fn

        return decorate(func) if func is not None else decorate

    def schedule(
        self,
        task: str | Handler,
        cron: str,
        *,
        payload: BaseModel | dict[str, Any] | None = None,
        name: str | None = None,
    ) -> Schedule:
        """Enqueue ``task`` (a registered name or handler) with ``payload`` at each ``cron`` slot (UTC).

        The payload is validated now. ``name`` (default: the task's name) must be unique
        among this app's schedules. The maintenance leader enqueues each slot once.
        """
        task_name = (
            task
            if isinstance(task, str)
            else next((n for n, spec in self.tasks.items() if spec.func is task), getattr(task, "__name__", repr(task)))
        )
        spec = self.get(task_name)
        key = name or task_name
        if key in self.schedules:
            raise ConfigurationError(f"schedule {key!r} exists already; pass name= to schedule {task_name!r} again")
        validate_cron(cron, f"schedule {key!r}")
        try:
            data = payload.model_dump() if isinstance(payload, BaseModel) else (payload or {})
            body = spec.payload_model.model_validate(data).model_dump(mode="json")
        except ValidationError as exc:
            raise ConfigurationError(
                f"schedule {key!r}: payload does not fit {spec.payload_model.__name__}: {exc}"
            ) from exc
        self.schedules[key] = Schedule(key, task_name, cron, body)
        return self.schedules[key]

    def get(self, task: str) -> TaskSpec:
        """The spec registered under ``task``; ``UnknownTaskError`` when there is none."""
        try:
            return self.tasks[task]
        except KeyError:
            raise UnknownTaskError(f"unknown task {task!r}; registered: {sorted(self.tasks)}") from None


def resolve_task(tasks: dict[str, TaskSpec], payload: BaseModel | dict[str, Any], task: str | None) -> TaskSpec:
    """The task named ``task``, or else the one task in ``tasks`` whose model is the payload's type."""
    if task is not None:
        try:
            return tasks[task]
        except KeyError:
            raise UnknownTaskError(f"unknown task {task!r}; registered: {sorted(tasks)}") from None
    if isinstance(payload, dict):
        raise UnknownTaskError("a dict payload needs task= to name its task")
    matches = [s for s in tasks.values() if s.payload_model is type(payload)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UnknownTaskError(f"no registered task takes {type(payload).__name__}; registered: {sorted(tasks)}")
    raise UnknownTaskError(
        f"{len(matches)} tasks take {type(payload).__name__} ({sorted(s.name for s in matches)}); "
        "pass task= to choose one"
    )


def _ambiguous(apps: int, specs: list[TaskSpec], what: str) -> UnknownTaskError:
    names = sorted({s.name for s in specs})
    return UnknownTaskError(
        f"{what} is registered by {apps} apps in this process (tasks {names}); pass app= to choose one"
    )


def task_of(payload: BaseModel | dict[str, Any], task: str | None, app: Polyqueue | None) -> TaskSpec:
    """The task that takes ``payload``: among ``app``'s tasks when given; else found by the
    payload's model (named ``task`` among those, when given), or by the name ``task`` alone.
    ``UnknownTaskError`` when none matches, or when several apps could be meant."""
    if app is not None:
        return resolve_task(app.tasks, payload, task)
    if isinstance(payload, dict):
        if task is None:
            raise UnknownTaskError("a dict payload needs task= to name its task")
        return find_task(task)
    model = type(payload)
    apps = [
        a
        for a in list(_BY_MODEL.get(model, ()))
        if any(s.payload_model is model and (task is None or s.name == task) for s in a.tasks.values())
    ]
    if len(apps) == 1:  # that app says which task (or that several of its tasks take the model)
        return resolve_task(apps[0].tasks, payload, task)
    if not apps:
        if task is not None:
            return find_task(task)  # registered for another model: validating the payload says so
        raise UnknownTaskError(f"no registered task takes {model.__name__}")
    specs = [s for a in apps for s in a.tasks.values() if s.payload_model is model and task in (None, s.name)]
    raise _ambiguous(len(apps), specs, model.__name__ + (f" as task {task!r}" if task else ""))


def find_task(name: str, app: Polyqueue | None = None) -> TaskSpec:
    """The spec of task ``name``: ``app``'s, or that of the one app in this process that has it."""
    if app is not None:
        return app.get(name)
    specs = [a.tasks[name] for a in list(_APPS) if name in a.tasks]
    if len(specs) == 1:
        return specs[0]
    if not specs:
        raise UnknownTaskError(f"unknown task {name!r}: no app in this process registers it")
    raise _ambiguous(len(specs), specs, f"task {name!r}")
