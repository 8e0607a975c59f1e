"""`star.json`, the sidecar of an adapter directory, as one typed dataclass parsed once: the schema is what
star writes, with the types it writes. Every field present must have its type (no coercion: "5" is not an
int, true is not 1); unknown fields are ignored (a newer star may add some)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.cols import is_sequence, list_structure_factory

from ..case import RepairCase
from .untrusted import AdapterError, read_json_object

META_NAME = "star.json"
FORMAT = "star-adapter"
FORMAT_VERSION = 1


@attrs.define
class StoredCase:
    prompt: str
    fix: str
    wrong: str | None = None


@attrs.define
class BaseModel:
    """The model a patch was made on: its architecture and the sha256 of each patched layer's weights."""

    model_type: str
    n_layers: int
    d_model: int
    d_ff: int
    weights_sha256: dict[str, str]
    name: str | None = None
    out_proj: str | None = None


@attrs.define
class Sidecar:
    format: str
    version: int
    base_model: BaseModel
    name: str | None = None
    created: str | None = None
    method: str | None = None
    config: dict[str, Any] | None = None
    cases: list[StoredCase] | None = None
    layers: list[int] | None = None
    neurons: dict[str, int] | None = None
    n_neurons: int | None = None
    encoding: dict[str, str] | None = None
    metrics: dict[str, Any] | None = None
    adapter_sha256: str | None = None

    @property
    def repair_cases(self) -> list[RepairCase]:
        return [RepairCase(prompt=c.prompt, fix=c.fix, wrong=c.wrong) for c in self.cases or []]

    def to_json(self) -> dict:
        return _CONVERTER.unstructure(self)


def _strict_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=False)

    def exactly(t):
        def structure(value, _):
            if not isinstance(value, t) or (isinstance(value, bool) and t is not bool):
                raise TypeError(f"expected {t.__name__}, got {type(value).__name__}")
            return value

        return structure

    for t in (str, int, bool):
        conv.register_structure_hook(t, exactly(t))

    def strict_list(t, converter):
        items = list_structure_factory(t, converter)

        def structure(value, _):
            if not isinstance(value, list):
                raise TypeError(f"expected a list, got {type(value).__name__}")
            return items(value, _)

        return structure

    conv.register_structure_hook_factory(is_sequence, strict_list)
    return conv


_CONVERTER = _strict_converter()


def sidecar_from_dict(data: dict) -> Sidecar:
    """The typed sidecar of a parsed star.json; AdapterError naming the first field of the wrong type."""
    if data.get("format") != FORMAT:
        raise AdapterError("star.json is not a STAR adapter description")
    try:
        sidecar = _CONVERTER.structure(data, Sidecar)
    except (cattrs.BaseValidationError, TypeError, ValueError) as e:
        problems = cattrs.transform_error(e, path="star.json") if isinstance(e, cattrs.BaseValidationError) else [str(e)]
        first = problems[0] if problems else type(e).__name__
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AdapterError(f"star.json has a field of the wrong type: {first}{more}") from None
    if sidecar.version < 1:
        raise AdapterError("star.json has no valid version")
    if sidecar.version > FORMAT_VERSION:
        raise AdapterError(f"star.json has format version {sidecar.version}; this star reads up to {FORMAT_VERSION}")
    return sidecar


def read_sidecar(directory: Path) -> Sidecar:
    """The adapter directory's star.json, checked; AdapterError with a one-line reason otherwise."""
    return sidecar_from_dict(read_json_object(directory / META_NAME, META_NAME + " (STAR metadata)"))


def read_sidecar_or_none(directory: Path) -> Sidecar | None:
    """read_sidecar for listing: None when missing or invalid (never blocks, never reads more than the cap)."""
    try:
        return read_sidecar(directory)
    except AdapterError:
        return None
