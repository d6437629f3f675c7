"""Owns reading vLLM's guided decoding fields on /v1 (clients written for vLLM send them in `extra_body`):
`guided_json`, `guided_regex`, `guided_choice`, or the newer `structured_outputs` object with `json`, `regex`,
`choice` or `json_object`. The answer is then held to it by a grammar (constrain.ConstraintFactory.guided).

A form this server cannot enforce (`guided_grammar`, `structured_outputs.grammar` or `.structural_tag`) is a 400,
never dropped: a client relying on it must not get free text. The fields that only tune how vLLM's backends build
the grammar (`guided_decoding_backend`, `guided_whitespace_pattern`, `structured_outputs.disable_*`, ...) are
accepted and ignored."""

from __future__ import annotations

from dataclasses import dataclass

from glm_serve.api.errors import APIError, invalid_value
from glm_serve.schema_rules import GUIDED_KEYS, guided_spec

_FIELDS = (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"))
_UNSUPPORTED = ("grammar", "structural_tag")


@dataclass(frozen=True)
class Guided:
    """What the answer must be: kind "json" (spec: a JSON schema), "regex" (a pattern the whole answer matches) or
    "choice" (a list of strings, the answer exactly one of them); field: the request field it came from."""

    kind: str
    spec: object
    field: str


def read_guided(req, response_format: tuple[str, dict | None] | None = None) -> Guided | None:
    """The request's guided decoding, validated; None when it asks for none. 400s name the field.
    response_format: (kind, schema) of a request where it is one more spelling of the same (/v1/completions)."""
    found: list[tuple[str, object, str]] = []  # (GUIDED_KEYS key, value, field)
    if response_format is not None and response_format[0] != "text":
        kind, schema = response_format
        found.append(("json", schema, "response_format") if kind == "json_schema" else
                     ("json_object", True, "response_format"))
    for name, key in _FIELDS:
        value = getattr(req, name, None)
        if value is not None:
            found.append((key, value, name))
    if getattr(req, "guided_grammar", None) is not None:
        raise invalid_value("guided_grammar", "is not supported here; guided_json, guided_regex and guided_choice are")
    structured = getattr(req, "structured_outputs", None)
    if structured is not None:
        if not isinstance(structured, dict):
            raise invalid_value("structured_outputs", "must be an object")
        for key, value in structured.items():
            if key in _UNSUPPORTED and value is not None:
                raise invalid_value(f"structured_outputs.{key}", "is not supported here; json, regex, choice and "
                                                                 "json_object are")
            if key in GUIDED_KEYS and value not in (None, False):
                found.append((key, value, f"structured_outputs.{key}"))
    if len(found) > 1:
        raise APIError("1215", f"{found[0][2]} and {found[1][2]} are mutually exclusive", found[1][2])
    if not found:
        return None
    key, value, field = found[0]
    try:
        kind, spec = guided_spec(key, value)
    except ValueError as e:
        raise invalid_value(field, str(e)) from None
    return Guided(kind, spec, field)
