"""Repair methods, one folder each behind RepairMethod. Adding a method = a folder + one line here."""

from .base import RepairMethod, build_config, field_help
from .lora import LoraMethod
from .mint import MintMethod
from .sgd import SgdMethod
from .star import StarMethod

METHODS: dict[str, type[RepairMethod]] = {
    StarMethod.name: StarMethod,
    MintMethod.name: MintMethod,
    SgdMethod.name: SgdMethod,
    LoraMethod.name: LoraMethod,
}


def get_method(name: str, overrides: dict | None = None) -> RepairMethod:
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown repair method {name!r} (known: {', '.join(METHODS)})") from None
    return cls(build_config(cls.Config, overrides))


__all__ = ["METHODS", "RepairMethod", "build_config", "field_help", "get_method"]
