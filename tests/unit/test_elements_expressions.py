"""The (?) expression language: literals, names, comparisons, boolean logic, errors."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.elements.expressions import ExpressionError, evaluate

NAMES: dict[str, Any] = {
    "debug": True,
    "quiet": False,
    "flavour": "fancy",
    "arch": "x86_64",
    "features": ["gtk", "x11"],
    "none_set": [],
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("debug", True),
        ("quiet", False),
        ("not quiet", True),
        ("not not debug", True),
        ("flavour == 'fancy'", True),
        ('flavour == "fancy"', True),
        ("flavour != 'fancy'", False),
        ("'gtk' in features", True),
        ("'qt' in features", False),
        ("'qt' not in features", True),
        ("not 'qt' in features", True),
        ("flavour in ['plain', 'fancy']", True),
        ("flavour in ('plain',)", False),
        ("flavour in ()", False),
        ("'an' in flavour", True),  # a string on the right: substring, as in Python
        ("features == ['gtk', 'x11']", True),
        ("none_set", False),  # an empty flags value is false
        ("debug and quiet", False),
        ("debug or quiet", True),
        ("quiet or flavour == 'plain'", False),
        ("quiet and nosuch", False),  # short-circuit: the unknown name is never read
        ("debug or nosuch", True),
        ("(debug or quiet) and flavour == 'fancy'", True),
        ("debug and (quiet or arch == 'x86_64')", True),
        ("not debug or quiet", False),  # not binds tighter than or
        ("debug == true", True),
        ("debug == True", True),
        ("debug == 'true'", False),  # a bool option is a boolean, not a string
        ("quiet == false", True),
        ("1 < 2 <= 2", True),
        ("2 > 3", False),
        ("'a' == 'a' == 'a'", True),
        ("'it\\'s' == \"it's\"", True),
        ("[]", False),
        ("none", False),
    ],
)
def test_expressions_evaluate_as_jinja2_would(text: str, expected: bool) -> None:
    # Given options as BuildStream types them, when the expression is evaluated
    # Then the result is its truth value
    assert evaluate(text, NAMES) is expected


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("nosuch", "'nosuch' is undefined"),
        ("flavour == nosuch", "'nosuch' is undefined"),
        ("flavour ==", "unexpected the end of the expression"),
        ("flavour = 'x'", "unexpected '='"),
        ("(debug", "expected ')'"),
        ("[debug, ]]", "unexpected ']'"),
        ("debug quiet", "unexpected 'quiet'"),
        ("and debug", "unexpected 'and'"),
        ("'unterminated", 'unexpected "\'"'),
        ("flavour < 1", "cannot compare a string with a number using '<'"),
        ("debug is defined", "'is ...'"),
        ("", "unexpected the end of the expression"),
    ],
)
def test_bad_expressions_say_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(ExpressionError) as info:
        evaluate(text, NAMES)
    assert words in str(info.value)
