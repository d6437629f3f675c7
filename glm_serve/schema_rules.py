"""Owns which JSON schemas (and regexes) constrained decoding can hold output to: xgrammar (0.2.x) accepts some
keywords without enforcing them, and an answer held to such a schema could still break it. Those are refused
(as OpenAI's strict mode refuses what it cannot enforce) rather than trusted; length-bounded strings get a pattern
that keeps their output parseable. Also the one check of vLLM's guided-decoding entries (guided_spec), for
the API and LLM.generate alike. Pure Python: no xgrammar needed to check a schema."""

from __future__ import annotations

import json
from typing import Any

# vLLM's guided decoding spellings (structured_outputs keys, LLM.generate(guided=...)) -> ConstraintFactory.guided's
# kind; json_object is a json schema of its own.
GUIDED_KEYS = {"json": "json", "regex": "regex", "choice": "choice", "json_object": "json"}
MAX_CHOICES = 1024  # a classification label set; each option is a branch of one grammar

# Schema keywords whose value maps names to subschemas, and keywords whose value is data, not a schema.
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_DATA_KEYS = frozenset({"enum", "const", "default", "examples", "required"})


# Keywords xgrammar (0.2.x) accepts but does not enforce: output held to a schema using them could still break it,
# so such a schema is refused (as OpenAI's strict mode refuses what it cannot enforce) rather than trusted.
# _unenforced adds the cases that depend on a keyword's value or its neighbours.
_UNENFORCED = ("not", "allOf", "dependentRequired", "dependentSchemas", "if", "contains")


def has_lookaround(pattern: str) -> bool:
    """Whether a regex opens a lookahead group, `(?=` or `(?!` (xgrammar drops those silently; it refuses
    lookbehinds itself). Escaped parentheses and parentheses inside a [...] class are literals."""
    i, in_class = 0, False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch == "(" and pattern[i + 1:i + 3] in ("?=", "?!"):
            return True
        i += 1
    return False


def _unenforced(node: dict) -> str | None:
    """The first thing in one schema node that the grammar would silently ignore, or None."""
    bad = next((k for k in _UNENFORCED if k in node), None)
    if bad is None and node.get("uniqueItems") is True:
        bad = "uniqueItems"
    if bad is None and ("pattern" in node or "format" in node) and ("minLength" in node or "maxLength" in node):
        bad = "minLength/maxLength together with " + ("pattern" if "pattern" in node else "format")
    if bad is None and "multipleOf" in node:  # enforced on integers only, by a whole number
        kind, step = node.get("type"), node["multipleOf"]
        types = set(kind) if isinstance(kind, list) else {kind}
        whole = isinstance(step, int) or (isinstance(step, float) and step.is_integer())
        if "integer" not in types or "number" in types or isinstance(step, bool) or not whole:
            bad = "multipleOf other than a whole number on type integer"
    ref = node.get("$ref")
    if bad is None and isinstance(ref, str) and not ref.startswith("#"):
        bad = f"$ref to another document ({ref}; only references starting with # are resolved)"
    pattern = node.get("pattern")
    if bad is None and isinstance(pattern, str) and has_lookaround(pattern):
        bad = "lookahead (?= or (?! in pattern"
    required, props = node.get("required"), node.get("properties")
    if bad is None and isinstance(required, list):  # a required name is enforced only as a declared property
        missing = [r for r in required if not (isinstance(props, dict) and r in props)]
        if missing:
            bad = f"required {missing[0]} without a matching entry in properties"
    return bad


def check_enforceable(node: Any, where: str) -> None:
    """Raise ValueError naming the first keyword the grammar would silently ignore (see _unenforced)."""
    if isinstance(node, list):
        for i, x in enumerate(node):
            check_enforceable(x, f"{where}[{i}]")
        return
    if not isinstance(node, dict):
        return
    bad = _unenforced(node)
    if bad is not None:
        raise ValueError(f"{where}: '{bad}' cannot be enforced by constrained decoding (the output could break the "
                         "schema); leave it out or express it another way")
    for key, value in node.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                check_enforceable(sub, f"{where}.{key}.{name}")
        elif key not in _DATA_KEYS:
            check_enforceable(value, f"{where}.{key}")


def strict_string_lengths(node: Any) -> Any:
    """Copy of a schema where length-bounded strings carry an equivalent `pattern`.

    xgrammar (0.2.8) writes strings with minLength/maxLength as "any character but quote, backslash, CR, LF"
    repeated m..n times, which lets raw control characters (tab, NUL...) into the string: invalid JSON that
    `json.loads` rejects. A pattern that excludes them says the same length bound and keeps the output
    parseable. Schemas that already set a pattern or format keep theirs (xgrammar's rules for those exclude
    control characters)."""
    if isinstance(node, list):
        return [strict_string_lengths(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: strict_string_lengths(sub) for name, sub in value.items()}
        elif key in _DATA_KEYS:
            out[key] = value
        else:
            out[key] = strict_string_lengths(value)
    lo, hi = out.get("minLength", 0), out.get("maxLength")
    bounded = "minLength" in out or "maxLength" in out
    ints = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (lo, hi) if v is not None)
    if (out.get("type") == "string" and bounded and ints and (hi is None or lo <= hi)
            and not any(k in out for k in ("pattern", "format", "enum", "const"))):
        out["pattern"] = r'^[^"\\\x00-\x1f]{%d,%s}$' % (lo, "" if hi is None else hi)
    return out


def guided_spec(key: str, value: Any) -> tuple[str, Any]:
    """One guided-decoding entry (key: one of GUIDED_KEYS) -> (ConstraintFactory.guided's kind, its spec), checked
    and normalised: a schema given as JSON text is parsed, choices lose duplicates. ValueError says what is wrong
    (the caller names the field)."""
    if key == "json_object":
        return "json", {"type": "object"}
    if key == "json":
        if isinstance(value, str):  # vLLM takes the schema as JSON text too
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ValueError(f"is not a JSON schema: {e}") from None
        if not isinstance(value, dict):
            raise ValueError("must be a JSON schema object")
        return "json", value
    if key == "regex":
        if not isinstance(value, str) or not value:
            raise ValueError("must be a non-empty regular expression")
        return "regex", value
    if key == "choice":
        if not isinstance(value, list) or not value or len(value) > MAX_CHOICES:
            raise ValueError(f"must be a list of 1 to {MAX_CHOICES} strings")
        if not all(isinstance(o, str) and o for o in value):
            raise ValueError("must hold non-empty strings only")
        return "choice", list(dict.fromkeys(value))
    raise ValueError(f"must be one of {', '.join(GUIDED_KEYS)}, got {key!r}")
