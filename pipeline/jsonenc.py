"""JSON encoders made once, for hot paths.

``json.dumps`` with options, and ``JSONEncoder.encode``, build a new C
encoder on every call; for the small values remex encodes by the ten
thousand (keys' descriptions, a build's specs and infos) that is most of the
cost. :func:`encoder` builds the C encoder once and returns a function that
gives the same text as ``JSONEncoder(...).encode`` with those options.
"""

from __future__ import annotations

import json
import json.encoder
from collections.abc import Callable
from typing import Any

_MAKE_ENCODER: Any = getattr(json.encoder, "c_make_encoder", None)


def encoder(*, sort_keys: bool, ensure_ascii: bool) -> Callable[[Any], str]:
    """A compact encoder (separators ``,`` and ``:``, no cycle check: callers
    pass plain data) with these options, made once."""
    plain = json.JSONEncoder(
        sort_keys=sort_keys,
        ensure_ascii=ensure_ascii,
        separators=(",", ":"),
        check_circular=False,
    )
    if _MAKE_ENCODER is None:  # (a Python built without _json)
        return plain.encode
    make = _MAKE_ENCODER(
        None,  # markers: no cycle check
        plain.default,
        json.encoder.encode_basestring_ascii if ensure_ascii else json.encoder.encode_basestring,
        None,  # indent
        ":",
        ",",
        sort_keys,
        False,  # skipkeys
        True,  # allow_nan
    )

    def encode(value: Any) -> str:
        return "".join(make(value, 0))

    return encode
