"""Shared settings: ``class_names``, ``mean``, ``std`` and ``value_range`` given once in a config's ``common:``
section reach every callback that takes the argument; a section that names one keeps its own; callbacks
without the argument are built exactly as without ``common``; unknown keys are refused naming the valid ones."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from lightning_introspect.config import (
    CALLBACKS,
    COMMON_OPTIONS,
    IntrospectionConfig,
    _section_dataclass,
    callback_class,
    introspection_callbacks,
)

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _takes(section: str, option: str) -> bool:
    return option in inspect.signature(callback_class(section)).parameters


def _by_section(callbacks: list[Any]) -> dict[str, Any]:
    classes = {callback_class(s): s for s in CALLBACKS}
    return {classes[type(cb)]: cb for cb in callbacks}


def test_common_class_names_reach_every_callback_that_takes_them_and_a_section_overrides(tmp_path: Any) -> None:
    path = tmp_path / "introspection.yaml"
    path.write_text(
        "common:\n"
        f"  class_names: [{', '.join(NAMES)}]\n"
        "  mean: [0.5]\n"
        "  std: [0.25]\n"
        "attributions:\n"
        "  class_names: [a, b, c, d, e, f, g, h, i, j]\n"
        "feature_visualization:\n"
        "  std: [2.0]\n"
    )
    built = _by_section(introspection_callbacks(str(path), budget=False))
    assert set(built) == set(CALLBACKS)
    with_names = [s for s in CALLBACKS if _takes(s, "class_names")]
    assert {"per_class_metrics", "misclassifications", "attributions"} <= set(with_names)
    for section in with_names:
        expected = list("abcdefghij") if section == "attributions" else NAMES
        assert list(built[section].class_names) == expected, section
    for section in (s for s in CALLBACKS if _takes(s, "mean")):
        assert list(built[section].mean) == [0.5], section
        assert list(built[section].std) == ([2.0] if section == "feature_visualization" else [0.25]), section
    # a callback without the argument is built exactly as without `common` (the arguments it was given)
    plain = _by_section(introspection_callbacks({}, budget=False))
    for section in CALLBACKS:
        if not any(_takes(section, k) for k in COMMON_OPTIONS):
            assert built[section]._given == plain[section]._given == {}, section
            assert not hasattr(built[section], "class_names"), section


def test_each_callback_gets_its_own_copy_of_a_shared_list() -> None:
    built = _by_section(introspection_callbacks({"common": {"class_names": list(NAMES)}}, budget=False))
    per_class, wrong = built["per_class_metrics"], built["misclassifications"]
    assert per_class._given["class_names"] is not wrong._given["class_names"]


def test_common_in_a_python_config_and_a_section_dataclass_override() -> None:
    sections = {"attributions": _section_dataclass("attributions")(class_names=list("abcdefghij"))}
    config = IntrospectionConfig(sections=sections, common={"class_names": NAMES})
    (attributions,) = introspection_callbacks(config, budget=False)
    assert list(attributions.class_names) == list("abcdefghij")
    sections = {"misclassifications": _section_dataclass("misclassifications")()}
    (wrong,) = introspection_callbacks(IntrospectionConfig(sections=sections, common={"class_names": NAMES}), budget=False)
    assert list(wrong.class_names) == NAMES


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"common": {"num_classes": 10}}, r"Unknown option\(s\) \['num_classes'\] in config section 'common'; valid options: class_names, mean, std, value_range\."),
        ({"common": ["class_names"]}, r"Expected the config section 'common' to be a mapping of options"),
        ({"class_names": NAMES}, r"Unknown config section\(s\) \['class_names'\].*Shared settings \(class_names\) go under `common:`"),
    ],
)
def test_unknown_shared_settings_are_refused_naming_the_valid_ones(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        introspection_callbacks(data, budget=False)


def test_a_shared_value_a_callback_refuses_names_the_section_and_the_common_key() -> None:
    with pytest.raises(ValueError, match=r"`value_range`.*config section 'feature_visualization'; shared settings from `common.value_range`"):
        introspection_callbacks({"common": {"value_range": [1.0, 0.0]}}, budget=False)
    # a section that is switched off is not built, so its refusal never comes
    assert introspection_callbacks({"common": {"value_range": [1.0, 0.0]}, "feature_visualization": False}, budget=False)
