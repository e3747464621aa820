"""Option values from remex.toml's ``[projects.NAME.options]`` and ``-o``
(:func:`pipeline.api.plan`): the command line wins over the configuration,
and a wrong value is reported at its remex.toml line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pipeline.api import plan
from pipeline.cas import LocalCas
from pipeline.config import RemexConfig, load_config
from pipeline.elements.errors import LoadError
from pipeline.errors import ConfigError

CONF = """\
name: opts
element-path: elements
options:
  debug:
    type: bool
    description: debugging
    default: false
    variable: debug_var
  flavour:
    type: enum
    description: flavour
    values: [plain, fancy]
    default: plain
    variable: flavour_var
  features:
    type: flags
    description: features
    values: [qt, gtk]
    default: []
    variable: features_var
"""


def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "elements").mkdir(parents=True)
    (root / "project.conf").write_text(CONF)
    (root / "elements" / "a.bst").write_text("kind: stack\n")
    return root


def config_with(tmp_path: Path, toml: str) -> RemexConfig:
    path = tmp_path / "config" / "remex" / "remex.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(toml))
    return load_config(
        None, {"XDG_CONFIG_HOME": str(tmp_path / "config"), "REMEX_STACK_DIR": str(tmp_path / "n")}
    )


def option_vars(
    tmp_path: Path, config: RemexConfig | None, options: dict[str, str] | None = None
) -> dict[str, str]:
    [element] = plan(
        project(tmp_path), ["a.bst"], cas=LocalCas(tmp_path / "cas"), options=options, config=config
    )
    variables = element.variables.as_dict()
    return {k: variables[k] for k in ("debug_var", "flavour_var", "features_var")}


def test_configured_values_are_used_and_the_command_line_wins(tmp_path: Path) -> None:
    # Given a user configuration setting all three options of project "opts"
    config = config_with(
        tmp_path,
        """\
        [projects.other.options]
        debug = false

        [projects.opts.options]
        debug = true
        flavour = "fancy"
        features = ["qt", "gtk"]
        """,
    )
    # Then the project is loaded with them
    assert option_vars(tmp_path / "a", config) == {
        "debug_var": "1", "flavour_var": "fancy", "features_var": "gtk,qt",
    }  # fmt: skip
    # And -o wins over them, option by option
    assert option_vars(tmp_path / "b", config, {"flavour": "plain"}) == {
        "debug_var": "1", "flavour_var": "plain", "features_var": "gtk,qt",
    }  # fmt: skip
    # And without a configuration the defaults hold
    assert option_vars(tmp_path / "c", None) == {
        "debug_var": "0", "flavour_var": "plain", "features_var": "",
    }  # fmt: skip


def test_options_change_the_cache_key(tmp_path: Path) -> None:
    config = config_with(tmp_path, '[projects.opts.options]\nflavour = "fancy"\n')
    root = project(tmp_path)
    (root / "elements" / "a.bst").write_text(
        "kind: manual\nconfig:\n  build-commands: ['echo %{flavour_var}']\n"
    )
    cas = LocalCas(tmp_path / "cas")
    [plain] = plan(root, ["a.bst"], cas=cas)
    [fancy] = plan(root, ["a.bst"], cas=cas, config=config)
    [fancy_cli] = plan(root, ["a.bst"], cas=cas, options={"flavour": "fancy"})
    assert plain.cache_key != fancy.cache_key == fancy_cli.cache_key


@pytest.mark.parametrize(
    ("toml", "line", "field", "words"),
    [
        ('[projects.opts.options]\nflavour = "sweet"\n', 2, "projects.opts.options.flavour",
         "'sweet'"),
        ("# c\n\n[projects.opts.options]\ndebug = false\nnosuch = 1\n", 5,
         "projects.opts.options.nosuch", "unknown option 'nosuch'"),
        ("[projects.opts]\noptions = { debug = 3 }\n", 2, "projects.opts.options.debug",
         "'3'"),
        ('[projects.opts.options]\nfeatures = "qt"\n', 2, "projects.opts.options.features",
         "takes a list"),
    ],
)  # fmt: skip
def test_a_wrong_configured_value_names_the_file_line_and_field(
    tmp_path: Path, toml: str, line: int, field: str, words: str
) -> None:
    config = config_with(tmp_path, toml)
    with pytest.raises(LoadError) as info:
        option_vars(tmp_path, config)
    error = info.value
    assert (error.file, error.line, error.field) == (
        str(tmp_path / "config" / "remex" / "remex.toml"), line, field,
    )  # fmt: skip
    assert words in error.reason


def test_a_projects_table_with_other_keys_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key projects\.opts\.variables"):
        config_with(tmp_path, "[projects.opts.variables]\nx = 1\n")
