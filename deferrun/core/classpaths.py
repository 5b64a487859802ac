"""Stored classpaths: which modules a row may name, and loading the class it names.

Only trusted modules are imported (checked before importing, so a forged row cannot run
another module's import-time code); what is loaded must be a subclass of the expected base,
and kwargs are checked against its constructor before it is built. A path under a module of
the flat layout before the rooms is loaded from where that module lives now.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, TypeVar

from deferrun.exceptions import ClassLoadError, ConfigError, SerializationError

_CLASSPATH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")

T = TypeVar("T")


def classpath_of(cls: type) -> str:
    """The importable dotted path of ``cls``, refusing classes no other process could import."""
    module = cls.__module__
    qualname = cls.__qualname__
    if "<locals>" in qualname:
        raise SerializationError(
            f"{qualname} is defined inside a function; define it at module level so that "
            "workers and the triggerer can import it"
        )
    if module == "__main__":
        raise SerializationError(
            f"{qualname} is defined in __main__; move it into an importable module (on "
            "PYTHONPATH of the workers and the triggerer) so other processes can load it"
        )
    return f"{module}.{qualname}"


@functools.lru_cache(maxsize=4096)
def _signature(cls: type) -> inspect.Signature | None:
    try:
        return inspect.signature(cls)
    except (TypeError, ValueError):
        return None


class ClassNotFound(ClassLoadError):
    """No module or attribute of that name: a path that moved may be found elsewhere."""


class NotASubclass(ClassLoadError):
    """The classpath names an object that is not a subclass of the expected base."""


# Root packages whose modules a stored classpath may name; None means every module (no
# --import given). Kept as roots so "pkg" also trusts "pkg.sub.mod".
ALWAYS_TRUSTED = ("deferrun", "triggers")
_trusted: tuple[str, ...] | None = None


def set_trusted_modules(packages: Sequence[str] | None) -> None:
    """Restrict loading to ``packages`` (plus deferrun and triggers); None allows every module."""
    global _trusted
    _trusted = None if packages is None else tuple(dict.fromkeys([*ALWAYS_TRUSTED, *packages]))
    _load_class_cached.cache_clear()


def trusted_modules() -> tuple[str, ...] | None:
    return _trusted


def is_trusted_module(module_name: str) -> bool:
    """Whether loading may import ``module_name`` (never a ``__main__``: it runs a program)."""
    if "__main__" in module_name.split("."):
        return False
    if _trusted is None:
        return True
    return any(module_name == root or module_name.startswith(root + ".") for root in _trusted)


def import_trusted(packages: Sequence[str]) -> None:
    """Import each ``--import`` package at start; ConfigError names the first that fails."""
    for name in packages:
        if not _CLASSPATH_RE.match(name + ".x"):
            raise ConfigError(f"--import {name!r} is not a dotted package name like 'mypkg.ops'")
        if "__main__" in name.split("."):  # importing it would run that program
            raise ConfigError(
                f"--import {name}: a __main__ module runs its program when imported; name "
                "the package that holds your operators and triggers"
            )
        try:
            importlib.import_module(name)
        except BaseException as exc:
            raise ConfigError(
                f"--import {name}: importing it failed: {type(exc).__name__}: {exc}; is it "
                "installed, or on PYTHONPATH of this process?"
            ) from None


#: modules of the flat layout before the rooms (0.1 rows name them): a stored classpath under
#: one of them that does not load as written is loaded from where that module lives now
MOVED_MODULES: dict[str, str] = {
    "deferrun.actions": "deferrun.cli.actions",
    "deferrun.attempt": "deferrun.worker.attempt",
    "deferrun.attempt_threads": "deferrun.worker.attempt_threads",
    "deferrun.baseoperator": "deferrun.core.baseoperator",
    "deferrun.basetrigger": "deferrun.core.basetrigger",
    "deferrun.cli": "deferrun.cli.commands",
    "deferrun.config": "deferrun.core.config",
    "deferrun.connections": "deferrun.connections.uri",
    "deferrun.containment": "deferrun.process.containment",
    "deferrun.context": "deferrun.worker.context",
    "deferrun.deferral": "deferrun.core.deferral",
    "deferrun.event_writer": "deferrun.triggerer.event_writer",
    "deferrun.gc_freeze": "deferrun.triggerer.gc_freeze",
    "deferrun.liveness": "deferrun.process.liveness",
    "deferrun.log": "deferrun.process.log",
    "deferrun.loops": "deferrun.process.loops",
    "deferrun.metrics": "deferrun.process.metrics",
    "deferrun.models": "deferrun.core.models",
    "deferrun.outcome_log": "deferrun.triggerer.outcomes",
    "deferrun.reconcile": "deferrun.triggerer.reconcile",
    "deferrun.recording": "deferrun.worker.recording",
    "deferrun.retention": "deferrun.cli.clean",
    "deferrun.serialization": "deferrun.core.serialization",
    "deferrun.shared_clients": "deferrun.connections.clients",
    "deferrun.shared_polls": "deferrun.triggerer.shared_polls",
    "deferrun.shared_runs": "deferrun.triggerer.shared_runs",
    "deferrun.sharing": "deferrun.core.trigger_keys",
    "deferrun.startup": "deferrun.process.startup",
    "deferrun.store.local_notify": "deferrun.store.sqlite.notify",
    "deferrun.store.postgres": "deferrun.store.postgres.connector",
    "deferrun.store.sqlite": "deferrun.store.sqlite.connector",
    "deferrun.store.sqlite_file": "deferrun.store.sqlite.file",
    "deferrun.tasklogs": "deferrun.process.tasklogs",
    "deferrun.timer_heap": "deferrun.triggerer.timers",
    "deferrun.trigger_hooks": "deferrun.triggerer.hooks",
    "deferrun.trigger_run": "deferrun.triggerer.trigger_run",
    "deferrun.triggerer": "deferrun.triggerer.triggerer",
    "deferrun.views": "deferrun.cli.views",
    "deferrun.watchdog": "deferrun.process.watchdog",
    "deferrun.worker": "deferrun.worker.worker",
}


def _moved(classpath: str) -> str | None:
    """``classpath`` rewritten from a module that moved, or None when none did."""
    module = classpath.rpartition(".")[0]
    while module:
        new = MOVED_MODULES.get(module)
        if new is not None:
            return new + classpath[len(module) :]
        module = module.rpartition(".")[0]
    return None


@functools.lru_cache(maxsize=4096)
def _load_class_cached(classpath: str, base: type) -> type:
    try:
        return _load_class(classpath, base)
    except ClassNotFound as first:  # only a lookup that found nothing tries the new place
        moved = _moved(classpath) if isinstance(classpath, str) else None
        if moved is None:
            raise
        try:
            return _load_class(moved, base)
        except ClassNotFound:
            raise ClassNotFound(f"{first}; nor as {moved!r}, where that module moved") from None


def load_class(classpath: str, base: type[T]) -> type[T]:
    """Import the class named by ``classpath`` and check it is a subclass of ``base``.

    Successful loads are cached (a triggerer loads the same few classes 100,000 times);
    failures are not, so a module deployed later is found then.
    """
    return _load_class_cached(classpath, base)


#: root packages of the code Airflow users port: a hard-coded classpath there means "this class"
UPSTREAM_ROOTS = frozenset({"airflow", "astronomer"})


def stored_classpath(classpath: str, obj: object, base: type[T]) -> tuple[type[T], str]:
    """The class a hard-coded ``serialize()`` path names, and the path to store for it.

    Airflow-style triggers return a fixed path ('airflow.providers.x.MyTrigger') or an alias
    re-exported elsewhere; storing the class's real module + qualname lets an ``--import``
    triggerer load it. A path under an upstream package (``airflow``, ``astronomer``) names
    the code the user ported, never what to run: ``obj``'s own class is used without importing
    anything. When any other fixed path cannot be loaded here, ``obj``'s own class is used too.
    """
    if classpath.split(".", 1)[0] in UPSTREAM_ROOTS:
        if not isinstance(obj, base):
            raise ClassLoadError(
                f"{classpath!r} names upstream code and {obj!r} is not a {base.__name__}"
            )
        return type(obj), classpath_of(type(obj))
    try:
        cls = load_class(classpath, base)
    except NotASubclass:
        raise  # it names something else (a function, a module): a bug or a forgery
    except ClassLoadError:
        if not isinstance(obj, base):
            raise
        cls = type(obj)
    return cls, classpath_of(cls)


def _import(module_name: str, classpath: str) -> ModuleType | None:
    """Import a module for ``classpath``; None when it does not exist (try a shorter prefix)."""
    if "__main__" in module_name.split("."):
        raise ClassLoadError(
            f"refusing to load {classpath!r}: {module_name!r} is a program's __main__ module, "
            "which runs that program when imported (module not trusted by this process)"
        )
    if not is_trusted_module(module_name):
        allowed = ", ".join(_trusted or ())
        top = module_name.partition(".")[0]
        above = f" (or its package: --import {top})" if top != module_name else ""
        raise ClassLoadError(
            f"refusing to load {classpath!r}: module {module_name!r} is not trusted by this "
            f"process (trusted: {allowed}); start the worker and triggerer with --import "
            f"{module_name}{above}, or DEFERRUN_IMPORTS={module_name}"
        )
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            return None
        raise ClassLoadError(f"importing {module_name!r} for {classpath!r} failed: {exc}") from exc
    except BaseException as exc:
        raise ClassLoadError(
            f"importing {module_name!r} for {classpath!r} failed: {type(exc).__name__}: {exc!r}"
        ) from exc


def _load_class(classpath: str, base: type[T]) -> type[T]:
    """Import the class named by ``classpath`` and check it is a subclass of ``base``.

    Only trusted modules are imported (checked before importing, so a forged row cannot run
    another module's import-time code); the attribute is looked up, never called, and anything
    that is not a ``base`` subclass is refused before it can run.
    """
    if not isinstance(classpath, str) or not _CLASSPATH_RE.match(classpath):
        raise ClassLoadError(f"{classpath!r} is not a dotted classpath like 'package.module.Class'")
    parts = classpath.split(".")
    module: ModuleType | None = None
    attrs: list[str] = []
    # Longest importable module prefix wins, so nested classes (module.Outer.Inner) work.
    for cut in range(len(parts) - 1, 0, -1):
        module = _import(".".join(parts[:cut]), classpath)
        if module is not None:
            attrs = parts[cut:]
            break
    if module is None:
        raise ClassNotFound(
            f"cannot import {classpath!r}: no module {'.'.join(parts[:-1])!r}. Is the module "
            "installed, or on PYTHONPATH of this process?"
        )
    obj: Any = module
    for attr in attrs:
        obj = inspect.getattr_static(obj, attr, None)
        if obj is None:
            raise ClassNotFound(f"{classpath!r}: module {module.__name__!r} has no {attr!r}")
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise NotASubclass(f"{classpath!r} is not a {base.__name__} subclass; refusing to load it")
    return obj


@functools.lru_cache(maxsize=4096)
def _keyword_shape(cls: type) -> tuple[frozenset[str], frozenset[str], bool] | None:
    """The names ``cls(...)`` takes by keyword, those it requires, and whether it takes
    ``**kwargs``; None when a positional-only parameter needs the full check."""
    sig = _signature(cls)
    if sig is None:
        return None
    names: set[str] = set()
    required: set[str] = set()
    var_kw = False
    for p in sig.parameters.values():
        if p.kind is p.POSITIONAL_ONLY:
            return None
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind is not p.VAR_POSITIONAL:
            names.add(p.name)
            if p.default is p.empty:
                required.add(p.name)
    return frozenset(names), frozenset(required), var_kw


def check_kwargs_fit(cls: type, kwargs: dict[str, Any], what: str) -> None:
    """Fail with a readable message when ``kwargs`` cannot be passed to ``cls(...)``."""
    shape = _keyword_shape(cls)
    if shape is not None:  # the common case, without Signature.bind's cost on every attempt
        names, required, var_kw = shape
        if required.issubset(kwargs) and (var_kw or names.issuperset(kwargs)):
            return
    sig = _signature(cls)
    if sig is None:
        return
    try:
        sig.bind(**kwargs)
    except TypeError as exc:
        raise SerializationError(
            f"stored kwargs do not fit {what} {classpath_or_name(cls)}{sig}: {exc}"
        ) from exc


def classpath_or_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def instantiate(classpath: str, kwargs: Any, base: type[T], what: str) -> T:
    """Load ``classpath`` (a ``base`` subclass) and build it from stored ``kwargs``."""
    cls = load_class(classpath, base)
    if not isinstance(kwargs, dict):
        raise SerializationError(
            f"stored kwargs of {classpath} are a {type(kwargs).__name__}, not an object"
        )
    check_kwargs_fit(cls, kwargs, what)
    factory: Callable[..., T] = cls
    return factory(**kwargs)
