"""pipeline.jsonenc: the encoders made once give json's own text."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline import jsonenc

VALUES: list[Any] = [
    {"b": 1, "a": [1, 2.5, None, True], "é": "ü\u2028\n", "z": {"y": "x", "c": []}},
    ["top", "level", 3],
    "a plain string é",
    12,
    None,
    {},
    float("inf"),
]


@pytest.mark.parametrize("sort_keys", [True, False])
@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_encoder_gives_the_same_text_as_json_dumps(sort_keys: bool, ensure_ascii: bool) -> None:
    encode = jsonenc.encoder(sort_keys=sort_keys, ensure_ascii=ensure_ascii)
    for value in VALUES:
        expected = json.dumps(
            value, sort_keys=sort_keys, ensure_ascii=ensure_ascii, separators=(",", ":")
        )
        assert encode(value) == expected


def test_key_order_decides_the_text_only_without_sort_keys() -> None:
    a, b = {"x": 1, "y": 2}, {"y": 2, "x": 1}
    canonical = jsonenc.encoder(sort_keys=True, ensure_ascii=False)
    compact = jsonenc.encoder(sort_keys=False, ensure_ascii=True)
    assert canonical(a) == canonical(b) == '{"x":1,"y":2}'
    assert compact(b) == '{"y":2,"x":1}'


def test_a_value_json_cannot_encode_is_refused() -> None:
    with pytest.raises(TypeError):
        jsonenc.encoder(sort_keys=True, ensure_ascii=False)({"a": object()})
