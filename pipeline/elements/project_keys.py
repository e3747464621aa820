"""project.conf keys remex accepts without using, and keys it refuses with a reason.

BuildStream 2.8 project.conf keys that do not change what is built or how
(``bst shell``'s settings, cache servers, ``bst``'s default targets, where
refs are stored when they are inline anyway, source provenance attribute
names) are accepted, with their shape checked loosely so that a typo is
still an error; remex uses ``defaults: targets:`` and
``source-provenance-attributes`` and ignores the rest. Keys that would make
remex build something else than bst, silently, are refused, each with why.
"""

from __future__ import annotations

from pipeline.elements.nodes import MappingNode, ScalarNode, SequenceNode

__all__ = [
    "IGNORED_PROJECT_KEYS",
    "REFUSED_PROJECT_KEYS",
    "check_project_keys",
    "default_targets",
    "refuse_project_keys",
]

#: Accepted and checked; only ``defaults`` (and ``source-provenance-attributes``,
#: read with the sources) is used.
IGNORED_PROJECT_KEYS = (
    "shell",
    "artifacts",
    "source-caches",
    "defaults",
    "ref-storage",
    "source-provenance-attributes",
)

#: Refused, with why: each would change where sources come from or which
#: settings apply, and remex cannot honour it yet.
REFUSED_PROJECT_KEYS: dict[str, str] = {
    "default-mirror": (
        "not a BuildStream 2 project.conf key (bst reads it from the user configuration "
        "or --default-mirror); remex reads it from [fetch] default-mirror in remex.toml, "
        "REMEX_FETCH_DEFAULT_MIRROR or --default-mirror"
    ),
    "remote-execution": (
        "not a BuildStream 2 project.conf key (bst reads it from the user configuration); "
        "remex's execution service is set in remex.toml or REMEX_* variables"
    ),
}

_SHELL_KEYS = ("command", "environment", "host-files")
_HOST_FILE_KEYS = ("path", "host_path", "optional")
_REF_STORAGE = ("inline", "project.refs")


def refuse_project_keys(node: MappingNode) -> None:
    """Refuse :data:`REFUSED_PROJECT_KEYS`, each with its reason.

    Raises:
        LoadError: at the first such key.
    """
    for key in node.entries:
        reason = REFUSED_PROJECT_KEYS.get(key)
        if reason is not None:
            raise node.key_error(key, reason)


def check_project_keys(node: MappingNode) -> None:
    """Refuse :data:`REFUSED_PROJECT_KEYS`; check the shape of the ignored keys.

    ``node`` is project.conf with its includes and conditionals resolved.

    Raises:
        LoadError: at the offending key or value (file, line and field).
    """
    refuse_project_keys(node)
    shell = node.get_mapping("shell")
    if shell is not None:
        _check_shell(shell)
    for key in ("artifacts", "source-caches"):
        _check_remotes(node, key)
    default_targets(node)
    ref_storage = node.get_scalar("ref-storage")
    if ref_storage is not None:
        value = ref_storage.as_str()
        if value not in _REF_STORAGE:
            raise ref_storage.error(
                f"invalid ref-storage {value!r} (expected one of: {', '.join(_REF_STORAGE)})"
            )
        if value == "project.refs":
            raise ref_storage.error(
                "ref-storage 'project.refs' is not supported by remex: write each source's "
                "ref in its element (ref-storage: inline, the default)"
            )
    node.get_str_mapping("source-provenance-attributes")


def default_targets(node: MappingNode) -> list[str]:
    """project.conf ``defaults: targets:`` (empty when not given).

    Raises:
        LoadError: ``defaults`` has another key, or ``targets`` is not a list of strings.
    """
    defaults = node.get_mapping("defaults")
    if defaults is None:
        return []
    defaults.validate_keys(("targets",))
    return [target.as_str() for target in defaults.get_str_list("targets") or []]


def _check_shell(shell: MappingNode) -> None:
    shell.validate_keys(_SHELL_KEYS)
    shell.get_str_list("command")
    shell.get_str_mapping("environment")
    host_files = shell.get_sequence("host-files")
    for item in host_files.items if host_files is not None else ():
        if isinstance(item, ScalarNode):
            item.as_str()
        elif isinstance(item, MappingNode):
            item.validate_keys(_HOST_FILE_KEYS)
            item.require_str("path")
        else:
            raise item.error("expected a path or a mapping with 'path'")


def _check_remotes(node: MappingNode, key: str) -> None:
    # bst 2.8 reads a list of remote specs here; remex uses its own servers.
    remotes = node.get(key)
    if remotes is None or (isinstance(remotes, ScalarNode) and remotes.value is None):
        return
    if not isinstance(remotes, SequenceNode):
        raise remotes.error(f"expected a list of remotes, got {remotes.describe()}")
    for item in remotes.items:
        if not isinstance(item, MappingNode):
            raise item.error(f"expected a mapping with 'url', got {item.describe()}")
        item.require_str("url")
