"""Request and response bodies of the REST API (docs/api.md is the contract they serve)."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from models.methods.params import MaskSpec

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

# Ids are 32 hex digits; anything much longer is not one of ours, and is not echoed back.
Id = Annotated[StrictStr, Field(min_length=1, max_length=64)]
JobKind = Literal["finetune", "generate", "evaluate"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class ErrorDetail(BaseModel):
    code: str = Field(examples=["mask_size_mismatch"])
    message: str = Field(examples=["mask is 64x64 but its image is 128x128"])


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Exemplar(BaseModel):
    id: str
    product: str
    defect: str | None
    kind: Literal["anomaly", "normal"]
    width: int
    height: int
    mode: Literal["L", "RGB"]
    created_at: float


NextCursor = Annotated[str | None, Field(description="pass as `cursor` for the next page; null on the last page")]


class ExemplarList(BaseModel):
    items: list[Exemplar]
    next_cursor: NextCursor = None


class JobCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "kind": "generate",
                    "method": "draem",
                    "exemplars": ["3f2c...e1"],
                    "normals": ["9a41...07", "b7d0...5c"],
                    "count": 20,
                    "seed": 7,
                    "masks": {"source": "exemplar"},
                    "params": {"opacity": [0.5, 1.0]},
                }
            ]
        },
    )

    kind: JobKind
    method: StrictStr | None = Field(
        default=None, max_length=64,
        description="see GET /v1/methods; generate and fine-tune jobs need one, evaluate jobs take none",
    )
    product: str | None = Field(default=None, pattern=NAME_PATTERN, description="default: the exemplars' product")
    defect: str | None = Field(
        default=None, pattern=NAME_PATTERN, description="output folder name; default: the exemplars' defect"
    )
    exemplars: list[Id] = Field(default_factory=list, max_length=64, description="anomaly exemplar ids")
    normals: list[Id] = Field(default_factory=list, max_length=10_000, description="normal image ids")
    adapter: Id | None = Field(default=None, description="id of a succeeded fine-tune job of the same method")
    count: StrictInt = Field(default=10, ge=1, description="pairs to generate")
    seed: StrictInt | None = Field(default=None, ge=0, lt=2**32, description="default: drawn at submit and recorded")
    masks: MaskSpec = Field(default_factory=MaskSpec)
    params: dict[str, Any] = Field(default_factory=dict, description="method parameters: see params_schema")
    dataset: Id | None = Field(default=None, description="evaluate: dataset id")
    generated: list[Id] = Field(default_factory=list, max_length=64, description="evaluate: generate job ids")
    callback_url: str | None = Field(
        default=None,
        max_length=2048,
        description="POSTed the job's JSON when it ends (signed, retried); its host must be in WEBHOOK_ALLOWED_HOSTS",
        examples=["http://mes.plant.example.com/hooks/synth"],
    )


class Progress(BaseModel):
    fraction: float
    stage: str
    done: int
    total: int


class Callback(BaseModel):
    """The delivery state of a job's webhook."""

    url: str
    status: Literal["pending", "delivered", "failed"]
    delivery_id: str = Field(description="sent as X-Synth-Delivery, the same on every attempt")
    attempts: int
    last_status: int | None = Field(description="HTTP status of the last attempt; null if it got no answer")
    last_error: str | None
    last_attempt_at: float | None
    next_attempt_at: float | None
    delivered_at: float | None


class Job(BaseModel):
    id: str
    kind: JobKind
    method: str | None
    status: JobStatus
    progress: Progress
    created_at: float
    started_at: float | None
    finished_at: float | None
    result: dict | None
    error: ErrorDetail | None
    product: str | None = None
    defect: str | None = None
    defects: list[str] = Field(default=[], description="fine-tune: the defect types of its exemplars")
    count: int | None = None
    seed: int | None = None
    exemplars: list[str] = []
    normals: list[str] = []
    adapter: str | None = None
    masks: dict | None = None
    params: dict = {}
    dataset: str | None = None
    generated: list[str] = []
    callback: Callback | None = None


class JobAccepted(BaseModel):
    id: str
    status: JobStatus


class JobDeleted(JobAccepted):
    purged: bool = Field(description="the record and every object of the job are gone (DELETE ...?purge=true)")


class JobList(BaseModel):
    items: list[Job]
    next_cursor: NextCursor = None


class Artifact(BaseModel):
    key: str
    url: str
    size: int


class ArtifactList(BaseModel):
    items: list[Artifact]
    next_cursor: NextCursor = None


class MethodComponent(BaseModel):
    name: str = Field(examples=["controlnet"])
    summary: str
    acts_in: Literal["generate", "finetune"] = Field(
        description="generate: a generate job can drop it (and a fine-tune job, for every generate job of its "
        "adapter); finetune: it acts only in training, so only a fine-tune job can drop it")


class MethodDescription(BaseModel):
    name: str
    family: Literal["model-free", "fine-tune", "training-free"]
    kinds: list[JobKind]
    available: bool
    reason: str | None
    default_mask_source: str
    mask_sources: list[str]
    summary: str
    weights: list[str] = Field(description="settings naming the local weight directories it needs")
    components: list[MethodComponent] = Field(
        description="the parts its paper ablates: `params.ablate` names those a job runs without")
    params_schema: dict


class MethodList(BaseModel):
    items: list[MethodDescription]


class Dataset(BaseModel):
    id: str
    product: str
    counts: dict[str, int] = Field(examples=[{"train/good": 700, "test/good": 100, "test/crack": 57}])
    size: int
    created_at: float


class DatasetList(BaseModel):
    items: list[Dataset]
    next_cursor: NextCursor = None
