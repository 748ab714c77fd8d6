"""POST /v1/animations' text fields: the request's fields (``runtime/request.py``) as a
pydantic model, so FastAPI's OpenAPI schema shows each with its type, default and meaning,
and the values a job runs: an :class:`~magicanimate_rt.runtime.request.AnimationRequest`
within this server's limits.

The body itself is streamed to disk by ``uploads.read_form`` (why: that module); the model
parses the text fields it collected. Types are the model's (a form sends text: "25" is a
whole number, "on" is true), the values' rules the request's, so every surface says the
same words; a bad value is a 422 naming the field.
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from functools import lru_cache
from typing import Literal, NamedTuple, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from ..runtime.request import AnimationRequest, RequestError, default_text, settings_fields
from .errors import ServiceError
from .settings import ServeSettings

#: the file fields of POST /v1/animations
JOB_FILES = ("source", "driving")
#: what the service adds to a field's meaning
SERVICE_NOTES = {"seed": "; -1 draws one (recorded in the job's settings)"}
#: python types of the request's field annotations (``from __future__ import annotations``)
TYPES = {"int": int, "Optional[int]": Optional[int], "float": float, "Optional[float]": Optional[float],
         "str": str, "Optional[str]": Optional[str], "bool": bool}
#: what a job's driving file is (the form's ``driving_kind``; its first is the default). A form
#: field, not a request field: the request's ``driving`` is DensePose on every surface, and a
#: person video is made a DensePose clip before the request runs, with the weights of whoever
#: runs it (the CLI's and the Python API's ``densepose_weights``, this server's
#: ``--densepose-weights``), so the client says only which kind it uploads
DRIVING_KINDS = {"densepose": "a DensePose motion video",
                 "person": "an ordinary video of a person, made a DensePose clip first (a 'densepose' phase in the "
                           "progress; needs the server's --densepose-weights)"}
#: pydantic error types -> what the value should have been
EXPECTED = (("int_", "expected a whole number"), ("float_", "expected a number"), ("bool_", "expected true or false"),
            ("string_", "expected text"), ("literal_", "expected one of " + ", ".join(DRIVING_KINDS)))
DEFAULT_KIND = next(iter(DRIVING_KINDS))


@lru_cache(maxsize=1)
def job_form() -> type[BaseModel]:
    """The model of the job's text fields, made from the request's declarations (plus
    ``reference_id``). Choices are in the schema as ``enum`` and checked by the request."""
    kinds = "; ".join(f"{k}: {v}" for k, v in DRIVING_KINDS.items())
    fields = {"reference_id": (Optional[str], Field(None, description="a photo uploaded to /v1/references, "
                                                                       "instead of the source file")),
              "driving_kind": (Literal[tuple(DRIVING_KINDS)], Field(DEFAULT_KIND, description=f"what the driving "
                                                                     f"file is: {kinds} (default {DEFAULT_KIND})"))}
    for f in settings_fields():
        meta = f.metadata
        extra = {"enum": list(meta["choices"])} if meta["choices"] else None
        description = f"{meta['help']} (default {default_text(f)}){SERVICE_NOTES.get(f.name, '')}"
        fields[meta["form"] or f.name] = (TYPES[f.type], Field(f.default, description=description,
                                                               json_schema_extra=extra))
    return create_model("AnimationForm", __config__=ConfigDict(extra="forbid", frozen=True), **fields)


def form_fields() -> tuple[str, ...]:
    """The text fields POST /v1/animations takes."""
    return tuple(job_form().model_fields)


def openapi_body() -> dict:
    """POST /v1/animations' request body for the OpenAPI schema: the form model's schema and
    the two files."""
    schema = job_form().model_json_schema()
    schema["properties"] = {
        "source": {"type": "string", "format": "binary", "description": "the photo (or give reference_id)"},
        "driving": {"type": "string", "format": "binary", "description": "the DensePose motion video (or, with "
                                                                          "driving_kind person, a video of a person)"},
        **schema["properties"]}
    schema["required"] = ["driving"]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def _type_error(e: ValidationError) -> ServiceError:
    """The first of pydantic's errors as the service's 422: ``name: expected ..., got 'x'``."""
    err = e.errors()[0]
    name = str(err["loc"][0]) if err.get("loc") else None
    what = next((words for prefix, words in EXPECTED if err["type"].startswith(prefix)), err["msg"])
    return ServiceError(422, f"{name}: {what}, got {err.get('input')!r}", name)


class JobForm(NamedTuple):
    """What a job's text fields say: the request, and the two form-only fields."""

    request: AnimationRequest
    reference_id: Optional[str]
    driving_kind: str


def job_request(fields: dict[str, str], s: ServeSettings) -> JobForm:
    """The job's request (its inputs not yet given) from the form's text fields, checked as
    every surface checks it plus this server's limits, its reference_id and driving_kind;
    ServiceError 422 naming the field (400 for a person video on a server without
    --densepose-weights). A seed of -1 is drawn here."""
    Form = job_form()
    try:
        values = Form.model_validate({k: v for k, v in fields.items() if v != ""}).model_dump(exclude_unset=True)
    except ValidationError as e:
        raise _type_error(e) from None
    reference = values.pop("reference_id", None)
    kind = values.pop("driving_kind", DEFAULT_KIND)
    if kind == "person" and s.densepose_weights is None:
        raise ServiceError(400, "driving_kind person: this server takes DensePose motion videos only (it was started "
                                "without --densepose-weights FILE); send a DensePose clip with driving_kind "
                                "densepose, or ask for a server started with --densepose-weights", "driving_kind")
    try:
        request = AnimationRequest.from_settings(values)
    except RequestError as e:
        names = {f.name: f.metadata["form"] or f.name for f in settings_fields()}
        raise ServiceError(422, str(e), names.get(e.field, e.field) or "size") from None
    if "size" in values and ("width" in values or "height" in values):
        raise ServiceError(422, "give size or width and height, not both", "size")
    _check_limits(request, "width" in values, s)
    if request.seed == -1:
        request = replace(request, seed=secrets.randbelow(2**32))
    elif not 0 <= request.seed < 2**63:
        raise ServiceError(422, f"seed must be in 0 .. 2^63-1 (or -1 to draw one), got {request.seed}", "seed")
    return JobForm(request, reference, kind)


def _check_limits(request: AnimationRequest, by_width: bool, s: ServeSettings) -> None:
    """This server's --max-side, --max-steps and --max-frames (422 naming the field)."""
    width, height = request.shape
    if max(width, height) > s.max_side:
        raise ServiceError(422, f"{'width and height' if by_width else 'size'} {width}x{height}: larger than this "
                                f"server's limit of {s.max_side} px a side (--max-side)",
                           "size" if not by_width else ("width" if width > s.max_side else "height"))
    if request.num_steps > s.max_steps:
        raise ServiceError(422, f"steps {request.num_steps}: more than this server's limit of {s.max_steps} "
                                "(--max-steps)", "steps")
    if request.max_frames is not None and request.max_frames > s.max_frames:
        raise ServiceError(422, f"max_frames {request.max_frames}: more than this server's limit of "
                                f"{s.max_frames} (--max-frames)", "max_frames")


def presets(s: ServeSettings) -> dict:
    """What the page offers: each preset's steps and what it is and costs, the driving kinds
    (and whether this server takes each), and the defaults."""
    from ..runtime.modes import PRESETS
    from ..runtime.request import DEFAULT_STEPS, DEFAULTS, PRESET_NOTES

    return {"presets": [{"name": name, "steps": mode.request_steps(None), "description": PRESET_NOTES[name]}
                        for name, mode in PRESETS.items()],
            "driving_kinds": [{"name": k, "description": v, "enabled": k != "person" or s.densepose_weights is not None}
                              for k, v in DRIVING_KINDS.items()],
            "defaults": {**{(f.metadata["form"] or f.name): DEFAULTS[f.name] for f in settings_fields()},
                         "steps": DEFAULT_STEPS, "driving_kind": DEFAULT_KIND}}
