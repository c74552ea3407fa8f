"""YAML text read safely (no repeated keys, no self-referring aliases, one error type) and nested mappings as
dotted keys. No schema and no torch here: `tunelab runs` and the sweep read configs with these alone."""

from __future__ import annotations

import yaml


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML whose mappings refuse a repeated key: a second `train:` block would silently replace the first."""

    def construct_mapping(self, node, deep=False):
        if not isinstance(node, yaml.MappingNode):  # `!!map [1]`: PyYAML's own error
            return super().construct_mapping(node, deep)
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
                seen[key] = first or key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: yaml's own error follows
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first set on line {first})", key_node.start_mark
                )
        return super().construct_mapping(node, deep)


def read_yaml(text: str):
    """Parse YAML text safely, refusing repeated keys. Every failure is a yaml.YAMLError: PyYAML's value
    constructors raise plain Python errors for `2024-13-45`, `!!int x`, a 5000-digit number, deep nesting."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        raise
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as exc:
        raise yaml.YAMLError(
            f"cannot read a value ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        ) from None
    if _refers_to_itself(data):
        raise yaml.YAMLError("an alias refers to a mapping or list that contains it")
    return data


def _refers_to_itself(root) -> bool:
    """Whether a YAML alias made a container hold itself (`a: &x {b: *x}`): no config means that, and every
    recursive walk of it would never end. Depth-first with its own stack; shared aliases are visited once."""
    done, on_path, stack = set(), set(), [(root, False)]
    while stack:
        node, leaving = stack.pop()
        if leaving:
            on_path.discard(id(node))
            done.add(id(node))
            continue
        if not isinstance(node, (dict, list)) or id(node) in done:
            continue
        if id(node) in on_path:
            return True
        on_path.add(id(node))
        stack.append((node, True))
        stack += [(child, False) for child in (node.values() if isinstance(node, dict) else node)]
    return False


def set_dotted(data: dict, key: str, value) -> None:
    """data['a']['b'] = value for key 'a.b', creating (or replacing non-mapping) parents."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def flatten_dotted(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}: nested mappings as dotted keys (set_dotted's inverse)."""
    out = {}
    for key, value in (d or {}).items():
        if isinstance(value, dict):
            out.update(flatten_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
