"""The one registry idiom (fundus_lab.registry)."""

import pytest

from fundus_lab.registry import Registry, UnknownNameError


class Refused(ValueError):
    pass


def test_register_get_and_order():
    reg = Registry("protocol")
    reg.register("zero_shot", 1)

    @reg.register("few_shot")
    def few_shot():
        return 2

    assert reg.get("zero_shot") == 1 and reg.get("few_shot") is few_shot
    assert reg.names() == ["zero_shot", "few_shot"] and list(reg) == reg.names()
    assert "few_shot" in reg and "linear_probe" not in reg and len(reg) == 2
    assert reg.items()[0] == ("zero_shot", 1) and reg.values()[1] is few_shot


def test_unknown_name_lists_the_known_and_suggests_the_close():
    reg = Registry("protocol")
    for name in ("zero_shot", "few_shot", "fine_tune"):
        reg.register(name, name)
    with pytest.raises(UnknownNameError) as err:
        reg.get("few_shots")
    assert str(err.value).startswith("unknown protocol 'few_shots'; did you mean 'few_shot'")
    assert str(err.value).endswith("; known: zero_shot, few_shot, fine_tune")
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)
    with pytest.raises(UnknownNameError, match="unknown protocol 'xyz'; known: zero_shot"):
        reg.get("xyz")
    with pytest.raises(UnknownNameError, match="unknown protocol None"):
        reg.get(None)


def test_error_class_is_the_callers_and_duplicates_are_refused():
    reg = Registry("method", error=Refused)
    reg.register("clip", object())
    with pytest.raises(Refused, match="unknown method 'clp'; did you mean 'clip'"):
        reg.get("clp")
    with pytest.raises(ValueError, match="method 'clip' is registered twice"):
        reg.register("clip", object())
    with pytest.raises(ValueError, match="non-empty string"):
        reg.register("", object())
