"""Switch every callback on or off from one config: ``IntrospectionConfig`` and ``introspection_callbacks``.

Each callback has one section, a dataclass generated from the callback's own keyword arguments (one
source of truth for names, types and defaults), plus ``enabled``. Sections can be given as
dataclasses, dicts, or a YAML file (read with ``yaml.safe_load``)::

    common:                 # shared settings (COMMON_OPTIONS), for every callback that takes them
      class_names: [zero, one, two, three, four, five, six, seven, eight, nine]
    per_class_metrics:
      num_classes: 10
    attributions:
      enabled: false

A ``common`` setting goes to every callback that has that argument, unless the callback's own section
names it (the section wins); callbacks without the argument never see it.

Example:
    >>> cfg = IntrospectionConfig.from_dict({})
    >>> isinstance(introspection_callbacks(cfg), list)
    True

Every callback is also usable on its own from LightningCLI YAML
(``trainer.callbacks: [{class_path: lightning_introspect.WeightHistograms, init_args: {...}}]``).

Code never comes from a config by default: an option that names code to import
(``feature_visualization.prior: "package.module:attribute"``, see :data:`IMPORT_OPTIONS`) is refused
unless the caller opts in from Python with ``introspection_callbacks(config, allow_imports=True)``
(or passes the object itself, e.g. ``{"feature_visualization": {"prior": my_decoder}}``). A config
file is data: reading it must not import modules or call functions of the file's choosing.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import inspect
import os
from collections.abc import Mapping
from typing import Any

# section name -> "module:Class" (fixed here, never read from a config)
CALLBACKS: dict[str, str] = {
    "per_class_metrics": "lightning_introspect.callbacks.per_class_metrics:PerClassMetrics",
    "misclassifications": "lightning_introspect.callbacks.misclassifications:Misclassifications",
    "weight_histograms": "lightning_introspect.callbacks.weight_histograms:WeightHistograms",
    "linear_probes": "lightning_introspect.callbacks.linear_probes:LinearProbes",
    "attributions": "lightning_introspect.callbacks.attributions:Attributions",
    "feature_visualization": "lightning_introspect.callbacks.feature_visualization:FeatureVisualization",
    "sanity_checks": "lightning_introspect.callbacks.sanity_checks:SanityChecks",
}

#: the share of a fit's own time the default set may add (``introspection_callbacks(budget=...)``). Chosen
#: by measuring the 10-epoch digits demo fit (benchmarks/bench_whole_fit.py, docs/performance.md): a smaller
#: budget saves nothing more there, since what remains is the fit-end results every budget keeps (the last
#: run of each analysis at its smallest size, the final figures).
DEFAULT_BUDGET = 0.25

#: the settings the ``common:`` section may hold: the data's description, shared by every callback that
#: takes the argument (a section that names one overrides it for its callback).
COMMON_OPTIONS: tuple[str, ...] = ("class_names", "mean", "std", "value_range")
#: the top-level keys of a config besides the callback sections
TOP_LEVEL_KEYS: tuple[str, ...] = ("budget", "common")

#: section -> the options whose string value is an import path (a callback imports it and may call it).
IMPORT_OPTIONS: dict[str, tuple[str, ...]] = {
    "feature_visualization": ("prior",),
}


def callback_class(section: str) -> type:
    """The callback class of a config section."""
    if section not in CALLBACKS:
        raise ValueError(f"Unknown config section {section!r}; valid sections: {', '.join(sorted(CALLBACKS))}.")
    module, name = CALLBACKS[section].split(":")
    return getattr(importlib.import_module(module), name)


@functools.cache  # one options class per section (generating it is the slow part of reading a config)
def _section_dataclass(section: str) -> type:
    cls = callback_class(section)
    fields: list[tuple[str, Any, Any]] = []
    for param in inspect.signature(cls).parameters.values():
        if param.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        default = param.default
        if isinstance(default, (list, dict, set)):
            fields.append((param.name, Any, dataclasses.field(default_factory=functools.partial(copy.copy, default))))
        else:
            fields.append((param.name, Any, dataclasses.field(default=default)))
    if "enabled" not in {f[0] for f in fields}:
        fields.insert(0, ("enabled", bool, dataclasses.field(default=True)))
    return dataclasses.make_dataclass(f"{cls.__name__}Config", fields)


@dataclasses.dataclass
class IntrospectionConfig:
    """All sections. ``sections`` maps a section name (see ``CALLBACKS``) to its options dataclass;
    ``budget`` (the top-level ``budget:`` key) is the share of the fit's own time the callbacks may add
    (see :class:`~lightning_introspect.callbacks.budget.IntrospectionBudget`): ``None`` for
    :data:`DEFAULT_BUDGET`, ``False`` for none; ``common`` (the ``common:`` section) holds settings of
    :data:`COMMON_OPTIONS` for every callback that takes them, unless its own section names them."""

    sections: dict[str, Any] = dataclasses.field(default_factory=dict)
    budget: float | bool | None = None
    common: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.common = _check_common(self.common)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> IntrospectionConfig:
        """Build from ``{section: {option: value}}`` (plus the top-level ``budget`` and ``common`` keys);
        unknown sections or options raise ``ValueError``."""
        data = dict(data or {})
        budget = data.pop("budget", None)
        common = data.pop("common", None)
        unknown = sorted(set(data) - set(CALLBACKS))
        if unknown:
            shared = sorted(set(unknown) & set(COMMON_OPTIONS))
            hint = f" Shared settings ({', '.join(shared)}) go under `common:`." if shared else ""
            raise ValueError(
                f"Unknown config section(s) {unknown}; valid sections: {', '.join(sorted(CALLBACKS))} "
                f"(and the top-level keys {', '.join(TOP_LEVEL_KEYS)}).{hint}"
            )
        sections = {}
        for section in CALLBACKS:
            options = data.get(section)
            if options is None:
                options = {}
            if isinstance(options, bool):
                options = {"enabled": options}
            if not isinstance(options, Mapping):
                raise ValueError(f"Expected the config section {section!r} to be a mapping of options, but got {options!r}.")
            klass = _section_dataclass(section)
            valid = {f.name for f in dataclasses.fields(klass)}
            bad = sorted(set(options) - valid)
            if bad:
                raise ValueError(f"Unknown option(s) {bad} in config section {section!r}; valid options: {', '.join(sorted(valid))}.")
            sections[section] = klass(**dict(options))
            # the options the config names: only these are passed on, so a callback can tell the sizes a
            # user fixed (kept under a budget) from its defaults, and a section's own setting from `common`
            sections[section]._given_options = frozenset(options)
        return cls(sections=sections, budget=budget, common=common)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> IntrospectionConfig:
        """Read a YAML file with ``yaml.safe_load`` (never the unsafe loader)."""
        import yaml

        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"Expected the YAML file {os.fspath(path)!r} to hold a mapping of sections, but got {type(data).__name__}.")
        return cls.from_dict(data.get("introspection", data))


def _check_common(common: Any) -> dict[str, Any]:
    """The ``common`` section as a dict, refusing anything but a mapping of :data:`COMMON_OPTIONS`."""
    if common is None:
        return {}
    if not isinstance(common, Mapping):
        raise ValueError(f"Expected the config section 'common' to be a mapping of options, but got {common!r}.")
    bad = sorted(set(common) - set(COMMON_OPTIONS), key=str)
    if bad:
        raise ValueError(f"Unknown option(s) {bad} in config section 'common'; valid options: {', '.join(sorted(COMMON_OPTIONS))}.")
    return dict(common)


def _with_common(cls: type, kwargs: dict[str, Any], common: Mapping[str, Any], given: frozenset[str] | None) -> list[str]:
    """Add to ``kwargs`` the ``common`` settings ``cls`` takes and its section does not set; returns their names.

    A section read from a dict or YAML sets what it names (``given``); a dataclass built in Python sets
    what is not the callback's default (``None`` for every shared setting)."""
    params = inspect.signature(cls).parameters
    added = []
    for key, value in common.items():
        if key not in params:
            continue
        if given is not None:
            if key in given:
                continue
        elif kwargs.get(key, params[key].default) is not params[key].default:
            continue
        kwargs[key] = copy.copy(value)  # each callback its own list: one may not change another's
        added.append(key)
    return added


def _refuse_imports(section: str, options: Mapping[str, Any]) -> None:
    for option in IMPORT_OPTIONS.get(section, ()):
        value = options.get(option)
        if isinstance(value, str):
            raise ValueError(
                f"Refusing the import path {value!r} in config option `{section}.{option}`: a config must not "
                "choose code to import and run. Pass the object itself from Python "
                f"(`{{'{section}': {{'{option}': obj}}}}`), or opt in from Python with "
                "`introspection_callbacks(config, allow_imports=True)` if you trust this config."
            )


def introspection_callbacks(
    config: IntrospectionConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    allow_imports: bool = False,
    budget: float | bool | None = None,
) -> list[Any]:
    """The enabled callbacks of a config (an ``IntrospectionConfig``, a dict, or a YAML path).

    Args:
        config: the sections and their options; ``None`` for every callback at its defaults.
        allow_imports: let options listed in :data:`IMPORT_OPTIONS` be import paths (strings) that the
            callbacks import and call. Off by default: only enable it for configs you trust as code.
        budget: the share of the fit's own time the callbacks together may add (e.g. ``0.25``); the
            one-off analyses size themselves to it (see :class:`~lightning_introspect.callbacks.budget.IntrospectionBudget`).
            ``None``: the config's top-level ``budget`` key, else :data:`DEFAULT_BUDGET`; ``False``: no
            budget (every analysis at its configured sizes).

    Shared settings (:data:`COMMON_OPTIONS`: ``class_names``, ``mean``, ``std``, ``value_range``) are
    given once in the ``common`` section and reach every enabled callback that takes the argument; a
    section that names the argument keeps its own value.

    Raises:
        ValueError: for unknown sections or options (``common`` included), for an import path while
            ``allow_imports`` is ``False``, and for a value a callback refuses (a shared one names
            the section and the ``common`` key it came from).

    Example:
        >>> introspection_callbacks({})  # doctest: +SKIP
        [PerClassMetrics(...), WeightHistograms(...), ...]
    """
    if not isinstance(allow_imports, bool):
        raise ValueError(f"Expected `allow_imports` to be True or False, but got {allow_imports!r}.")
    if config is None or isinstance(config, Mapping):
        config = IntrospectionConfig.from_dict(config)
    elif isinstance(config, (str, os.PathLike)):
        config = IntrospectionConfig.from_yaml(config)
    common = _check_common(config.common)
    callbacks = []
    for section, options in config.sections.items():
        # shallow: `dataclasses.asdict` would deep-copy objects passed in Python (a decoder, a DataLoader)
        kwargs = (
            {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
            if dataclasses.is_dataclass(options)
            else dict(options)
        )
        if not kwargs.get("enabled", True):
            continue
        given = getattr(options, "_given_options", None)
        if given is not None:  # read from a dict / YAML: pass what the config names, the rest stays default
            kwargs = {k: v for k, v in kwargs.items() if k in given}
        if not allow_imports:
            _refuse_imports(section, kwargs)
        cls = callback_class(section)
        if "enabled" not in inspect.signature(cls).parameters:
            kwargs.pop("enabled", None)
        shared = _with_common(cls, kwargs, common, given)
        try:
            callbacks.append(cls(**kwargs))
        except ValueError as err:
            if not shared:
                raise
            # the value came from `common`: say which section refused it, so the user knows where to override
            keys = ", ".join(f"`common.{k}`" for k in shared)
            raise ValueError(f"{err} (config section {section!r}; shared settings from {keys})") from err
    budget = config.budget if budget is None else budget
    budget = DEFAULT_BUDGET if budget is None else budget
    if budget is not False:
        from lightning_introspect.callbacks.budget import IntrospectionBudget

        IntrospectionBudget(budget).attach(callbacks)
    return callbacks
