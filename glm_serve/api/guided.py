"""Owns reading vLLM's guided decoding fields on /v1 (clients written for vLLM send them in `extra_body`):
`guided_json`, `guided_regex`, `guided_choice`, or the newer `structured_outputs` object with `json`, `regex`,
`choice` or `json_object`. The answer is then held to it by a grammar (constrain.ConstraintFactory.guided).

A form this server cannot enforce (`guided_grammar`, `structured_outputs.grammar` or `.structural_tag`) is a 400,
never dropped: a client relying on it must not get free text. The fields that only tune how vLLM's backends build
the grammar (`guided_decoding_backend`, `guided_whitespace_pattern`, `structured_outputs.disable_*`, ...) are
accepted and ignored."""

from __future__ import annotations

import json
from dataclasses import dataclass

from glm_serve.api.errors import APIError, invalid_value

_KINDS = (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"))
_STRUCTURED_KINDS = {"json": "json", "regex": "regex", "choice": "choice", "json_object": "json"}
_UNSUPPORTED = ("grammar", "structural_tag")
MAX_CHOICES = 1024  # a classification label set; each option is a branch of one grammar


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
    found: list[Guided] = []
    if response_format is not None and response_format[0] != "text":
        kind, schema = response_format
        found.append(Guided("json", schema if kind == "json_schema" else {"type": "object"}, "response_format"))
    for name, kind in _KINDS:
        value = getattr(req, name, None)
        if value is not None:
            found.append(Guided(kind, value, name))
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
            if key in _STRUCTURED_KINDS and value not in (None, False):
                found.append(Guided(_STRUCTURED_KINDS[key], {"type": "object"} if key == "json_object" else value,
                                    f"structured_outputs.{key}"))
    if len(found) > 1:
        raise APIError("1215", f"{found[0].field} and {found[1].field} are mutually exclusive", found[1].field)
    return _checked(found[0]) if found else None


def _checked(g: Guided) -> Guided:
    if g.kind == "json":
        spec = g.spec
        if isinstance(spec, str):  # vLLM takes the schema as JSON text too
            try:
                spec = json.loads(spec)
            except ValueError as e:
                raise invalid_value(g.field, f"is not a JSON schema: {e}") from None
        if not isinstance(spec, dict):
            raise invalid_value(g.field, "must be a JSON schema object")
        return Guided("json", spec, g.field)
    if g.kind == "regex":
        if not isinstance(g.spec, str) or not g.spec:
            raise invalid_value(g.field, "must be a non-empty regular expression")
        return g
    options = g.spec
    if not isinstance(options, list) or not options or len(options) > MAX_CHOICES:
        raise invalid_value(g.field, f"must be a list of 1 to {MAX_CHOICES} strings")
    if not all(isinstance(o, str) and o for o in options):
        raise invalid_value(g.field, "must hold non-empty strings only")
    return Guided("choice", list(dict.fromkeys(options)), g.field)
