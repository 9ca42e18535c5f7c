"""Turning a job request into a queued job: every check happens before anything is written."""

import json
import secrets
from collections import Counter
from collections.abc import Callable

from pydantic import BaseModel, ValidationError

from models.downstream.params import EvaluateParams
from models.methods.registry import METHODS
from service.errors import ApiError, describe_validation_errors, echo
from service.queue import enqueue_job
from service.records import now
from service.schemas import JobCreate
from service.webhooks import callback_refusal, new_callback

ExemplarLookup = Callable[[str], dict | None]


def _exemplars(ids: list[str], lookup: ExemplarLookup, kind: str, field: str) -> list[dict]:
    found = []
    for exemplar_id in ids:
        record = lookup(exemplar_id)
        if record is None:
            raise ApiError(422, "unknown_exemplar", f"{field}: no exemplar with id {echo(exemplar_id)}")
        if record["kind"] != kind:
            raise ApiError(
                422,
                "wrong_exemplar_kind",
                f"{field}: exemplar {echo(exemplar_id)} is a {record['kind']} image, not {kind}",
            )
        found.append(record)
    return found


def _callback(settings, body: JobCreate) -> dict | None:
    if body.callback_url is None:
        return None
    if not settings.webhook_secret:
        raise ApiError(
            409, "webhooks_unavailable", "this deployment sends no webhooks: WEBHOOK_SECRET is not set"
        )
    refusal = callback_refusal(body.callback_url, settings.webhook_allowed_hosts)
    if refusal:
        raise ApiError(422, "callback_not_allowed", refusal)
    return new_callback(body.callback_url)


def validated_params(model: type[BaseModel], raw: dict) -> BaseModel:
    """Method or evaluate params, validated strictly as the JSON they came in as: "3" is not a
    number, 1 is not true, and Infinity is no value of any knob."""
    try:
        return model.model_validate_json(json.dumps(raw), strict=True)
    except ValidationError as exc:
        raise ApiError(422, "invalid_params", describe_validation_errors(exc.errors())) from None
    except (ValueError, RecursionError):
        raise ApiError(422, "invalid_params", "params is nested too deeply to be a parameter object") from None


def reject_duplicate_ids(body: JobCreate) -> None:
    """An id listed twice is a mistake (and would repeat that image in every output and export)."""
    for field, ids in (("exemplars", body.exemplars), ("normals", body.normals), ("masks.masks", body.masks.masks),
                       ("generated", body.generated)):
        repeated = [i for i, n in Counter(ids).items() if n > 1]
        if repeated:
            shown = ", ".join(echo(i) for i in repeated[:3]) + (" and more" if len(repeated) > 3 else "")
            raise ApiError(422, "duplicate_ids", f"{field} lists the same id more than once: {shown}")


def check_boxes_fit(masks, normals: list[dict]) -> None:
    """Fixed boxes are in pixels: each must lie inside every normal image it may be drawn on."""
    for box in masks.boxes or []:
        for normal in normals:
            if box[2] > normal["width"] or box[3] > normal["height"]:
                raise ApiError(
                    422,
                    "box_outside_image",
                    f"masks.boxes: box {list(box)} reaches outside normal image {echo(normal['id'])} "
                    f"({normal['width']}x{normal['height']})",
                )


def check_one_product(method: str, images: list[dict]) -> None:
    """A method that learns all of one product's defect types in one adapter takes one product's images."""
    products = sorted({image["product"] for image in images})
    if len(products) > 1:
        raise ApiError(422, "mixed_products", f"a {method} fine-tune learns one product's defect types: the "
                       f"images show {', '.join(echo(p) for p in products)}; submit one job per product")


def learnt_defect(body: JobCreate, exemplars: list[dict], adapter: dict) -> str:
    """The defect a generate job makes with an adapter that learnt several: `defect`, else the
    exemplars', else the adapter's only one; it must be one the adapter learnt."""
    learnt = adapter.get("defects") or []
    defect = body.defect or (exemplars[0]["defect"] if exemplars else None)
    if defect is None and len(learnt) == 1:
        defect = learnt[0]
    if defect is None:
        raise ApiError(422, "defect_required", f"adapter {body.adapter} learnt defects {', '.join(learnt)}: "
                       "name one in `defect`")
    if defect not in learnt:
        raise ApiError(422, "unknown_defect", f"adapter {body.adapter} learnt no defect {echo(defect)}; it "
                       f"knows {', '.join(learnt) or 'none'}")
    return defect


def _job_record(tenant: str, body: JobCreate, **fields) -> dict:
    total = fields.pop("total")
    return {
        "id": secrets.token_hex(16),
        "tenant": tenant,
        "kind": body.kind,
        "adapter": body.adapter,
        "count": body.count,
        "seed": body.seed if body.seed is not None else secrets.randbelow(2**32),
        "status": "queued",
        "progress": {"fraction": 0.0, "stage": "queued", "done": 0, "total": total},
        "created_at": now(),
        "started_at": None,
        "finished_at": None,
        "result": None,
        "error": None,
        "cancel_requested": False,
        "attempts": 0,
        **fields,
    }


def build_evaluate_job(settings, tenant: str, body: JobCreate, get_dataset, get_job) -> dict:
    """An evaluate job: a dataset of the tenant's, and succeeded generate jobs of the tenant's."""
    if body.method:
        raise ApiError(422, "invalid_request", "evaluate jobs take no `method`: they evaluate `generated` jobs")
    params = validated_params(EvaluateParams, body.params)
    if not body.dataset:
        raise ApiError(422, "dataset_required", "an evaluate job needs `dataset`: the id of an uploaded dataset")
    dataset = get_dataset(body.dataset)
    if dataset is None:
        raise ApiError(422, "unknown_dataset", f"dataset: no dataset with id {echo(body.dataset)}")
    for job_id in body.generated:
        job = get_job(job_id)
        if job is None or job["kind"] != "generate":
            raise ApiError(422, "unknown_job", f"generated: no generate job with id {echo(job_id)}")
        if job["status"] != "succeeded":
            raise ApiError(409, "job_not_succeeded", f"generate job {job_id} is {job['status']}, not succeeded")
    if not body.generated and not params.baselines:
        raise ApiError(422, "nothing_to_evaluate", "list generate jobs in `generated`, or keep `baselines` on")
    return _job_record(
        tenant, body, total=1, method=None, product=body.product or dataset["product"], defect=None,
        exemplars=[], normals=[], masks=None, params=params.model_dump(mode="json"),
        dataset=body.dataset, generated=body.generated, callback=_callback(settings, body),
    )


def build_job(settings, tenant: str, body: JobCreate, lookup: ExemplarLookup, get_job, get_dataset=None) -> dict:
    """Validate `body` against the method, the tenant's exemplars and the limits; return the record."""
    reject_duplicate_ids(body)
    if body.kind == "evaluate":
        return build_evaluate_job(settings, tenant, body, get_dataset or (lambda _: None), get_job)
    if body.dataset or body.generated:
        raise ApiError(422, "invalid_request", "`dataset` and `generated` belong to evaluate jobs")
    if not body.method:
        raise ApiError(422, "invalid_request", f"a {body.kind} job needs a `method`")
    method = METHODS.get(body.method)
    if method is None:
        known = ", ".join(sorted(METHODS))
        raise ApiError(422, "unknown_method", f"unknown method {echo(body.method)}; known: {known}")
    if body.kind not in method.kinds:
        raise ApiError(
            422, "unsupported_kind", f"{method.name} runs {' and '.join(method.kinds)} jobs, not {body.kind}"
        )
    reason = method.unavailable_reason(settings.weight_dirs)
    if reason:
        raise ApiError(409, "method_unavailable", f"{method.name} is not available here: {reason}")
    params = validated_params(method.params, body.params)
    ablation_problem = method.ablation_problem(getattr(params, "ablate", ()), body.kind)
    if ablation_problem:
        raise ApiError(422, "invalid_params", ablation_problem)
    if body.count > settings.max_count:
        raise ApiError(422, "count_too_large", f"count {body.count} is over the limit of {settings.max_count}")

    exemplars = _exemplars(body.exemplars, lookup, "anomaly", "exemplars")
    normals = _exemplars(body.normals, lookup, "normal", "normals")
    check_boxes_fit(body.masks, normals)
    if body.kind == "generate" and not normals:
        raise ApiError(422, "normals_required", "a generate job needs at least one normal image in `normals`")
    if body.kind == "generate" and method.generate_needs_references and not exemplars:
        raise ApiError(
            422, "references_required", f"{method.name} copies reference anomalies: list at least one in `exemplars`"
        )
    if body.kind == "finetune" and not exemplars:
        raise ApiError(422, "exemplars_required", "a fine-tune job needs at least one exemplar in `exemplars`")
    if body.kind == "finetune" and method.finetune_needs_normals and params.learns_from_normals() and not normals:
        raise ApiError(
            422, "normals_required", f"{method.name} fine-tunes on normal images too: list some in `normals`"
        )
    if body.kind == "finetune" and method.finetune_learns_defect_types:
        check_one_product(method.name, exemplars + normals)

    if body.kind == "finetune":
        params = params.for_training_set(len(exemplars), len(normals))
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
    defect = body.defect or (exemplars[0]["defect"] if exemplars else "anomaly")
    if method.family == "fine-tune" and body.kind == "generate" and method.finetune_learns_defect_types:
        defect = learnt_defect(body, exemplars, adapter)

    # A generate job makes images of its normal images' product; a fine-tune learns its exemplars'.
    named = (normals or exemplars) if body.kind == "generate" else (exemplars or normals)
    return _job_record(
        tenant, body, total=params.train_steps if body.kind == "finetune" else body.count,
        method=method.name,
        product=body.product or (named[0]["product"] if named else None),
        defect=defect, defects=sorted({e["defect"] for e in exemplars}) if body.kind == "finetune" else [],
        exemplars=body.exemplars, normals=body.normals, masks=masks.model_dump(mode="json"),
        params=params.model_dump(mode="json"), callback=_callback(settings, body),
    )


def inputs_of(job: dict) -> list[str]:
    """The records a job reads, as Records keys: they must exist when it is created."""
    exemplars = {*job.get("exemplars", ()), *job.get("normals", ()), *((job.get("masks") or {}).get("masks") or ())}
    jobs = {*job.get("generated", ()), *([job["adapter"]] if job.get("adapter") else [])}
    datasets = [job["dataset"]] if job.get("dataset") else []
    keys = [f"exemplar:{i}" for i in exemplars] + [f"job:{i}" for i in jobs] + [f"dataset:{i}" for i in datasets]
    return sorted(keys)


_GONE = {"exemplar": "unknown_exemplar", "dataset": "unknown_dataset", "job": "unknown_job"}


def submit(records, producer, job: dict) -> None:
    missing = records.create_job(job, reads=inputs_of(job))
    if missing:  # deleted after its check above: nothing was created
        kind, _, record_id = missing.partition(":")
        raise ApiError(422, _GONE[kind], f"{kind} {record_id} was deleted while the job was submitted")
    try:
        enqueue_job(producer, job["id"], job["kind"])
    except Exception as exc:
        records.delete_job(job)
        raise ApiError(503, "queue_unavailable", f"the job queue is unreachable, nothing was created: {exc}") from None
