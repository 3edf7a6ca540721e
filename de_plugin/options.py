"""Option validation shared by all pruners: pydantic models with friendly errors."""
from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class Options(BaseModel):
    """Base of every pruner's options: unknown keys are errors, values are type-checked strictly
    (``rounds="4"`` is refused rather than coerced: a string where a number belongs is usually a
    config mistake; an int is still accepted where a float belongs)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


def validate_options(model_cls: type[Options], pruner_name: str, options: "dict[str, Any] | Options",
                     what: str = "options for pruner") -> Options:
    """Build the options object or raise a ValueError that names each problem and the fix. An object of
    ``model_cls`` is already valid (validation on assignment keeps it so) and is returned as it is: an
    adapter that validated the user's options once passes that object on instead of a dump to re-check."""
    if isinstance(options, model_cls):
        return options
    if isinstance(options, Options):
        raise TypeError(f"options for pruner {pruner_name!r} must be {model_cls.__name__}, got "
                        f"{type(options).__name__}")
    known = list(model_cls.model_fields)
    noun = "key" if "config" in what else "option"
    try:
        return model_cls(**options)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(options)"
            if err["type"] == "extra_forbidden":
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                lines.append(f"unknown {noun} {key!r}{hint}")
            else:
                lines.append(f"{noun} {key!r}: {err['msg']} (got {err.get('input')!r})")
        unknown = any(err["type"] == "extra_forbidden" for err in exc.errors())
        raise ValueError(
            f"invalid {what} {pruner_name!r}: " + "; ".join(lines)
            + (f". Valid keys: {', '.join(sorted(known))}" if unknown else "")
        ) from None


def options_from(model_cls: type[Options], pruner_name: str, options: "Options | None",
                 kwargs: dict[str, Any]) -> Options:
    """A pruner's options given either as keywords (validated here) or as one ``model_cls`` object
    (validated when it was built), never both: what every constructor that takes options accepts."""
    if options is not None and kwargs:
        raise TypeError(f"{pruner_name}: give the options either as one {model_cls.__name__} object or as "
                        f"keywords ({', '.join(sorted(kwargs))}), not both")
    return validate_options(model_cls, pruner_name, kwargs if options is None else options)
