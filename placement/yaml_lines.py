"""YAML that remembers line numbers: every mapping knows its own line and each key's line, so
errors can point at `file:line`. Duplicate keys are an error (PyYAML silently keeps the last)."""

from __future__ import annotations

import yaml

from runtime.errors import HmoeError


class RulesError(HmoeError):
    """A rules file that cannot be used; the message starts with `file:line:`."""


class LineDict(dict):
    line: int = 0  # 1-based line of the mapping
    key_lines: dict

    def line_of(self, key) -> int:
        return self.key_lines.get(key, self.line)


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    out = LineDict()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            raise RulesError(f"{loader.name}:{line}: keys must be names, found {key!r}")
        if key in out:
            raise RulesError(f"{loader.name}:{line}: key '{key}' appears twice in one mapping "
                             f"(first on line {out.key_lines[key]})")
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = line
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load(text: str, source: str):
    """Parse `text`; a syntax error becomes one RulesError naming `source` and the line."""
    loader = _Loader(text)
    loader.name = source
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 0
        problem = e.problem or e.context or "invalid YAML"
        raise RulesError(f"{source}:{line}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as e:
        raise RulesError(f"{source}: YAML syntax error: {e}") from None
    finally:
        loader.dispose()
