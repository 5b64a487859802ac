"""Airflow's BaseTrigger, BaseOperator and BaseSensorOperator on top of deferrun's.

Constructors accept Airflow's common keyword arguments. Those deferrun has a concept for are
mapped (retries, retry_delay, execution_timeout, queue, sensors' mode/poke_interval/timeout/
soft_fail); the rest are kept readable on the operator and have no effect (docs/guide/airflow.md).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, ClassVar

import structlog

from deferrun.compat._exceptions import (
    AirflowException,
    AirflowSensorTimeout,
    AirflowSkipException,
    TaskDeferralError,
)
from deferrun.core import baseoperator, basetrigger, classpaths, serialization
from deferrun.core.baseoperator import DEFAULT_QUEUE, Context
from deferrun.exceptions import SkipTask, TaskDeferred
from deferrun.sensors import BaseSensor

XCOM_RETURN_KEY = "return_value"
DEFAULT_DAG_ID = "deferrun"

#: Airflow arguments that name code or objects: accepted and readable, never stored (they
#: cannot be), so a rebuilt operator has them unset
_NOT_STORED = frozenset(
    {
        "on_execute_callback",
        "on_failure_callback",
        "on_success_callback",
        "on_retry_callback",
        "on_skipped_callback",
        "sla_miss_callback",
        "task_group",
        "executor_config",
        "resources",
        "inlets",
        "outlets",
    }
)

#: accepted, readable on the operator, no effect in deferrun (name -> default)
NO_EFFECT: dict[str, Any] = {
    "owner": "airflow",
    "email": None,
    "email_on_retry": True,
    "email_on_failure": True,
    "pool": None,
    "pool_slots": 1,
    "priority_weight": 1,
    "weight_rule": "downstream",
    "depends_on_past": False,
    "ignore_first_depends_on_past": True,
    "wait_for_past_depends_before_skipping": False,
    "wait_for_downstream": False,
    "start_date": None,
    "end_date": None,
    "retry_exponential_backoff": False,
    "max_retry_delay": None,
    "trigger_rule": "all_success",
    "do_xcom_push": True,
    "multiple_outputs": False,
    "run_as_user": None,
    "max_active_tis_per_dag": None,
    "max_active_tis_per_dagrun": None,
    "executor": None,
    "sla": None,
    "doc": None,
    "doc_md": None,
    "doc_json": None,
    "doc_yaml": None,
    "doc_rst": None,
    "task_display_name": None,
    "map_index_template": None,
    "logger_name": None,
    "allow_nested_operators": True,
    "deferrable": False,
    **{name: None for name in _NOT_STORED},
}


@dataclass
class StartTriggerArgs:
    """Airflow's start-from-trigger arguments: the trigger's classpath and kwargs, the method
    to resume with, and a timeout."""

    trigger_cls: str
    next_method: str
    trigger_kwargs: dict[str, Any] | None = None
    next_kwargs: dict[str, Any] | None = None
    timeout: timedelta | None = None


class PokeReturnValue:
    """A sensor's poke result: done or not, and the value to return (XCom ``return_value``)."""

    def __init__(self, is_done: bool, xcom_value: Any | None = None) -> None:
        self.is_done = is_done
        self.xcom_value = xcom_value

    def __bool__(self) -> bool:
        return self.is_done


class BaseOperatorLink:
    """Kept for imports: deferrun has no web UI for extra links."""

    name: ClassVar[str] = ""
    operators: ClassVar[list[type]] = []

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        raise NotImplementedError(f"{type(self).__qualname__} must implement get_link()")


@dataclass
class DagRef:
    """What ``operator.dag`` offers without a DAG object: its id and params."""

    dag_id: str
    params: dict[str, Any] = field(default_factory=dict)


class BaseTrigger(basetrigger.BaseTrigger):
    """Airflow's BaseTrigger: ``__init__(**kwargs)`` and ``hash``, deferrun's runtime."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.task_instance: Any = None
        self.triggerer_job_id: Any = None

    @staticmethod
    def hash(classpath: str, kwargs: dict[str, Any]) -> int:
        """A stable (per process) hash of a serialized trigger."""
        return hash((classpath, serialization.dumps(kwargs, "trigger kwargs")))


def _check_trigger(operator: Any, trigger: Any, method_name: str, signal: TaskDeferred) -> None:
    """Everything the worker will check when it stores the deferral, done now: an operator
    learns at its ``defer()`` call, not after its side effects, that the wait cannot happen."""
    from deferrun.core.deferral import prepare_deferral

    what = f"{type(operator).__qualname__} cannot defer"
    if not isinstance(method_name, str) or not method_name:
        raise TaskDeferralError(f"{what}: method_name must be a method's name, got {method_name!r}")
    if not callable(getattr(operator, method_name, None)) or method_name.startswith("_"):
        raise TaskDeferralError(f"{what}: it has no method {method_name!r} to resume with")
    _check_resume_kwargs(what, method_name, signal.kwargs)
    try:
        prepare_deferral(signal)
    except Exception as exc:
        raise TaskDeferralError(
            f"{what} on {type(trigger).__qualname__}: {exc}; fix the trigger's serialize() "
            "(its classpath and kwargs must rebuild it in the triggerer)"
        ) from exc


def _check_resume_kwargs(what: str, method_name: str, kwargs: Any) -> None:
    """The method resumes as ``method(context, event=..., **kwargs)``: kwargs that cannot be
    passed that way would fail only after the wait, and the retry would run execute again.
    An ``event`` key is allowed: the trigger's event replaces it, as in Airflow."""
    if not isinstance(kwargs, Mapping):
        raise TaskDeferralError(
            f"{what}: kwargs must be a dict of keyword arguments for {method_name}(), "
            f"got {type(kwargs).__name__}"
        )
    for key in kwargs:
        if not isinstance(key, str) or not key.isidentifier():
            raise TaskDeferralError(
                f"{what}: kwargs keys must be argument names for {method_name}(), got {key!r}"
            )
        if key == "context":
            raise TaskDeferralError(
                f"{what}: kwargs cannot hold 'context': {method_name}() gets the task's "
                "context as its first argument; pass the value under another name"
            )


class BaseOperator(baseoperator.BaseOperator):
    """Airflow's BaseOperator signature on deferrun's operator."""

    template_fields: Sequence[str] = ()
    template_ext: Sequence[str] = ()
    template_fields_renderers: ClassVar[dict[str, str]] = {}
    ui_color: str = "#fff"
    ui_fgcolor: str = "#000"
    operator_extra_links: Sequence[BaseOperatorLink] = ()
    start_trigger_args: StartTriggerArgs | None = None

    def __init__(
        self,
        *,
        task_id: str | None = None,
        retries: int | None = None,
        retry_delay: timedelta | float = timedelta(seconds=300),
        execution_timeout: timedelta | float | None = None,
        queue: str = DEFAULT_QUEUE,
        dag: Any = None,
        default_args: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - set(NO_EFFECT))
        if unknown:
            raise AirflowException(
                f"Invalid arguments were passed to {type(self).__name__} (task_id: {task_id}): "
                f"{', '.join(unknown)}; see docs/guide/airflow.md for the accepted ones"
            )
        given = getattr(self, "_init_kwargs", {})
        defaults = dict(default_args or {})
        core = {
            "task_id": task_id,
            "retries": retries,
            "retry_delay": retry_delay,
            "execution_timeout": execution_timeout,
            "queue": queue,
        }
        for name in core:  # default_args fill what the call did not give (Airflow's rule)
            if name in defaults and name not in given:
                core[name] = defaults[name]
        if core["retries"] is None:
            core["retries"] = 0
        self._init_core(**core)
        for name, default in NO_EFFECT.items():
            value = kwargs[name] if name in kwargs else defaults.get(name, default)
            setattr(self, name, value)
        self.dag_id = _dag_id(dag if dag is not None else defaults.get("dag"))
        self.params = dict(params or defaults.get("params") or {})
        self.default_args = {k: v for k, v in defaults.items() if k not in _NOT_STORED}

    def _init_core(self, **core: Any) -> None:
        baseoperator.BaseOperator.__init__(self, **core)

    @property
    def dag(self) -> DagRef:
        return DagRef(self.dag_id, self.params)

    def has_dag(self) -> bool:
        return True

    @property
    def operator_name(self) -> str:
        return type(self).__name__

    def defer(
        self,
        *,
        trigger: basetrigger.BaseTrigger,
        method_name: str = "execute_complete",
        kwargs: dict[str, Any] | None = None,
        timeout: timedelta | float | None = None,
    ) -> None:
        """Free the worker slot and wait on ``trigger``; TaskDeferralError (failed, no retry)
        at once if the trigger could not be stored or rebuilt."""
        if not isinstance(trigger, basetrigger.BaseTrigger):
            raise TaskDeferralError(f"defer(trigger=...) needs a BaseTrigger, got {trigger!r}")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise TaskDeferralError(
                f"defer(kwargs=...) must be a dict of keyword arguments, got {kwargs!r}"
            )
        signal = TaskDeferred(
            trigger=trigger, method_name=method_name, kwargs=kwargs, timeout=timeout
        )
        _check_trigger(self, trigger, method_name, signal)
        raise signal

    def start_trigger(self) -> basetrigger.BaseTrigger | None:
        args = self.start_trigger_args
        if not self.start_from_trigger or args is None:
            return None
        cls = classpaths.load_class(args.trigger_cls, basetrigger.BaseTrigger)
        return cls(**(args.trigger_kwargs or {}))

    def resume_execution(
        self, next_method: str, next_kwargs: dict[str, Any] | None, context: Context
    ) -> Any:
        return getattr(self, next_method)(context, **(next_kwargs or {}))

    def on_kill(self) -> None:
        """Called when a user cancels the task while it runs (not on timeouts or shutdown)."""

    def render_template_fields(self, context: Context, jinja_env: Any = None) -> None:
        """No templating in deferrun: fields keep the values they were given."""

    def serialize(self) -> tuple[str, dict[str, Any]]:
        classpath, kwargs = super().serialize()
        for name in _NOT_STORED:
            kwargs.pop(name, None)
        if "dag" in kwargs:
            kwargs["dag"] = self.dag_id
        if isinstance(kwargs.get("default_args"), Mapping):
            kwargs["default_args"] = {
                k: (self.dag_id if k == "dag" else v)
                for k, v in kwargs["default_args"].items()
                if k not in _NOT_STORED
            }
        return classpath, kwargs


def _dag_id(dag: Any) -> str:
    if dag is None:
        return DEFAULT_DAG_ID
    if isinstance(dag, str):
        return dag
    dag_id = getattr(dag, "dag_id", None)
    if not isinstance(dag_id, str):
        raise AirflowException(f"dag= must be a dag id (str) or have a dag_id, got {dag!r}")
    return dag_id


class BaseSensorOperator(BaseOperator, BaseSensor):
    """Airflow's sensor: ``poke(context) -> bool | PokeReturnValue`` in ``poke`` or
    ``reschedule`` mode; deferrable sensors call ``self.defer`` from ``execute`` themselves."""

    def __init__(
        self,
        *,
        poke_interval: timedelta | float = 60.0,
        timeout: timedelta | float = 7 * 24 * 3600.0,
        soft_fail: bool = False,
        mode: str = "poke",
        exponential_backoff: bool = False,
        max_wait: timedelta | float | None = None,
        silent_fail: bool = False,
        never_fail: bool = False,
        **kwargs: Any,
    ) -> None:
        self._sensor = {
            "poke_interval": poke_interval,
            "timeout": timeout,
            "soft_fail": soft_fail,
            "mode": mode,
        }
        super().__init__(**kwargs)
        self.exponential_backoff = exponential_backoff  # no effect: poke_interval is fixed
        self.max_wait = max_wait  # no effect
        self.silent_fail = silent_fail
        self.never_fail = never_fail

    def _init_core(self, **core: Any) -> None:
        BaseSensor.__init__(self, **self._sensor, **core)  # type: ignore[arg-type]

    def poke(self, context: Context) -> bool | PokeReturnValue:
        raise NotImplementedError(f"{type(self).__qualname__} must implement poke(context)")

    def _timed_out(self, elapsed: float) -> None:
        message = f"Sensor has timed out; run duration of {elapsed:.1f} seconds exceeds the "
        message += f"specified timeout of {self.timeout:g}."
        if self.soft_fail or self.never_fail:
            raise AirflowSkipException(message)
        raise AirflowSensorTimeout(message)

    def execute(self, context: Context) -> Any:
        user_poke = self.poke

        def checked_poke(ctx: Context) -> Any:
            try:
                return user_poke(ctx)
            except (AirflowException, SkipTask):
                raise
            except Exception as exc:
                if self.never_fail:
                    raise AirflowSkipException(f"poke failed and never_fail is set: {exc}") from exc
                if not self.silent_fail:
                    raise
                structlog.get_logger("deferrun.compat").warning(
                    "poke failed; silent_fail is set, so it counts as not done", error=repr(exc)
                )
                return False

        self.__dict__["poke"] = checked_poke
        try:
            result = BaseSensor.execute(self, context)
        finally:
            self.__dict__.pop("poke", None)
        return result.xcom_value if isinstance(result, PokeReturnValue) else None


def determine_kwargs(
    func: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]
) -> Mapping[str, Any]:
    """The part of ``kwargs`` that ``func`` accepts (all of it if it takes ``**kwargs``),
    leaving out names its first ``len(args)`` positional parameters already take."""
    sig = inspect.signature(func)
    params = list(sig.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(kwargs)
    positional = [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ][: len(args)]
    return {k: v for k, v in kwargs.items() if k in sig.parameters and k not in positional}
