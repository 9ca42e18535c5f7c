"""Turning a job request into a queued job: every check happens before anything is written."""

import secrets
from collections.abc import Callable

from pydantic import ValidationError

from models.methods.registry import METHODS
from service.errors import ApiError, describe_validation_errors
from service.queue import enqueue_job
from service.records import now
from service.schemas import JobCreate

ExemplarLookup = Callable[[str], dict | None]


def _exemplars(ids: list[str], lookup: ExemplarLookup, kind: str, field: str) -> list[dict]:
    found = []
    for exemplar_id in ids:
        record = lookup(exemplar_id)
        if record is None:
            raise ApiError(422, "unknown_exemplar", f"{field}: no exemplar with id {exemplar_id!r}")
        if record["kind"] != kind:
            raise ApiError(
                422, "wrong_exemplar_kind", f"{field}: exemplar {exemplar_id!r} is a {record['kind']} image, not {kind}"
            )
        found.append(record)
    return found


def build_job(settings, tenant: str, body: JobCreate, lookup: ExemplarLookup, get_job) -> dict:
    """Validate `body` against the method, the tenant's exemplars and the limits; return the record."""
    if body.kind == "evaluate":
        raise ApiError(422, "unsupported_kind", "evaluate jobs need the metrics worker, which is not deployed yet")
    if not body.method:
        raise ApiError(422, "invalid_request", f"a {body.kind} job needs a `method`")
    method = METHODS.get(body.method)
    if method is None:
        raise ApiError(422, "unknown_method", f"unknown method {body.method!r}; known: {', '.join(sorted(METHODS))}")
    if body.kind not in method.kinds:
        raise ApiError(
            422, "unsupported_kind", f"{method.name} runs {' and '.join(method.kinds)} jobs, not {body.kind}"
        )
    reason = method.unavailable_reason(settings.sd_model_dir)
    if reason:
        raise ApiError(409, "method_unavailable", f"{method.name} is not available here: {reason}")
    try:
        params = method.params_model.model_validate(body.params)
    except ValidationError as exc:
        raise ApiError(422, "invalid_params", describe_validation_errors(exc.errors())) from None
    if body.count > settings.max_count:
        raise ApiError(422, "count_too_large", f"count {body.count} is over the limit of {settings.max_count}")

    exemplars = _exemplars(body.exemplars, lookup, "anomaly", "exemplars")
    normals = _exemplars(body.normals, lookup, "normal", "normals")
    if body.kind == "generate" and not normals:
        raise ApiError(422, "normals_required", "a generate job needs at least one normal image in `normals`")
    if body.kind == "finetune" and not exemplars:
        raise ApiError(422, "exemplars_required", "a fine-tune job needs at least one exemplar in `exemplars`")

    masks = body.masks.model_copy(update={"source": body.masks.source or method.default_mask_source})
    if masks.source not in method.mask_sources:
        raise ApiError(
            422,
            "unsupported_mask_source",
            f"{method.name} takes mask sources {', '.join(method.mask_sources)}, not {masks.source!r}",
        )
    if masks.source == "exemplar" and not exemplars:
        raise ApiError(422, "exemplars_required", "mask source 'exemplar' needs anomaly exemplars in `exemplars`")
    _exemplars(masks.masks, lookup, "anomaly", "masks.masks")

    if method.family == "fine-tune" and body.kind == "generate":
        adapter = get_job(body.adapter) if body.adapter else None
        if adapter is None or adapter["kind"] != "finetune" or adapter["method"] != method.name:
            raise ApiError(
                422, "adapter_required", f"{method.name} generate jobs need `adapter`: a {method.name} fine-tune job id"
            )
        if adapter["status"] != "succeeded":
            raise ApiError(
                409, "adapter_not_ready", f"fine-tune job {body.adapter} is {adapter['status']}, not succeeded"
            )
    elif body.adapter:
        raise ApiError(422, "invalid_request", f"{method.name} {body.kind} jobs take no `adapter`")

    named = exemplars or normals
    total = params.train_steps if body.kind == "finetune" else body.count
    job_id = secrets.token_hex(16)
    return {
        "id": job_id,
        "tenant": tenant,
        "kind": body.kind,
        "method": method.name,
        "product": body.product or (named[0]["product"] if named else None),
        "defect": body.defect or (exemplars[0]["defect"] if exemplars else "anomaly"),
        "exemplars": body.exemplars,
        "normals": body.normals,
        "adapter": body.adapter,
        "count": body.count,
        "seed": body.seed if body.seed is not None else secrets.randbelow(2**32),
        "masks": masks.model_dump(mode="json"),
        "params": params.model_dump(mode="json"),
        "status": "queued",
        "progress": {"fraction": 0.0, "stage": "queued", "done": 0, "total": total},
        "created_at": now(),
        "started_at": None,
        "finished_at": None,
        "result": None,
        "error": None,
        "cancel_requested": False,
        "attempts": 0,
    }


def submit(records, producer, job: dict) -> None:
    records.create_job(job)
    try:
        enqueue_job(producer, job["id"], job["kind"])
    except Exception as exc:
        records.delete_job(job)
        raise ApiError(503, "queue_unavailable", f"the job queue is unreachable, nothing was created: {exc}") from None
