"""What a running job sees: its record, storage, progress reporting and cancellation."""

import io
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from models.methods.interface import Exemplar, NormalImages
from service.records import Records
from service.settings import Settings

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    """Raised at a step boundary once DELETE /v1/jobs/{id} asked for it."""


class JobFailed(Exception):
    """A failure whose message tells the user what to change."""


@dataclass
class JobContext:
    job: dict
    records: Records
    storage: object
    settings: Settings
    report_interval: float = 0.25
    total: int | None = field(default=None, init=False)  # of the latest progress report
    _last_report: float = field(default=0.0, init=False)

    @property
    def job_id(self) -> str:
        return self.job["id"]

    @property
    def prefix(self) -> str:
        return f"jobs/{self.job_id}/"

    def progress(self, stage: str, done: int, total: int) -> None:
        """Record progress (at most every `report_interval` s) and stop here if cancelled.
        Every long loop calls this between steps; it is the only place a job can be cancelled."""
        self.total = total
        now = time.monotonic()
        if now - self._last_report < self.report_interval and done < total:
            return
        self._last_report = now
        if self.records.get_job_field(self.job_id, "cancel_requested"):
            raise JobCancelled()
        fraction = round(done / total, 4) if total else 0.0
        self.records.update_job(
            self.job_id, progress={"fraction": fraction, "stage": stage, "done": done, "total": total}
        )

    # -- storage helpers -------------------------------------------------------------------
    def exemplar(self, exemplar_id: str) -> dict:
        record = self.records.get_record("exemplar", self.job["tenant"], exemplar_id)
        if record is None:
            raise JobFailed(f"exemplar {exemplar_id} no longer exists; upload it again and resubmit")
        return record

    def load_exemplar(self, exemplar_id: str) -> Exemplar:
        """An uploaded image of the job's tenant, decoded, with its mask if it has one."""
        record = self.exemplar(exemplar_id)
        return Exemplar(
            id=exemplar_id,
            image=self.load_image(record["image_key"]),
            mask=self.load_mask(record["mask_key"]) if record["mask_key"] else None,
            product=record["product"],
            defect=record["defect"],
        )

    def normal_images(self) -> NormalImages:
        """The job's normal images, decoded as the method asks for them, a bounded number at a time."""
        return NormalImages(self.job["normals"], lambda i: self.load_image(self.exemplar(i)["image_key"]))

    def load_image(self, key: str) -> Image.Image:
        try:
            data = self.storage.get(key)
        except KeyError:
            raise JobFailed(f"input {key} is missing from storage; upload that image again and resubmit") from None
        image = Image.open(io.BytesIO(data))
        image.load()
        return image

    def load_mask(self, key: str) -> np.ndarray:
        return np.asarray(self.load_image(key).convert("L")) >= 128

    def put_png(self, key: str, image: Image.Image) -> int:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
        self.storage.put(key, data, "image/png")
        return len(data)

    def download_prefix(self, prefix: str, folder: Path) -> None:
        """Every object under `prefix` into `folder`, keeping the relative paths."""
        for obj in self.storage.list(prefix):
            target = folder / obj.key[len(prefix) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            self.storage.get_file(obj.key, target)

    def upload_folder(self, folder: Path, prefix: str) -> list[str]:
        keys = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            keys.append(prefix + path.relative_to(folder).as_posix())
            self.storage.put_file(keys[-1], path)
        return keys


class StorageCache:
    """The method interface's Cache, in storage under `prefix` (one per tenant and method)."""

    def __init__(self, storage, prefix: str):
        self.storage, self.prefix = storage, prefix

    def load(self, key: str, path: Path) -> bool:
        if not self.storage.exists(self.prefix + key):
            return False
        self.storage.get_file(self.prefix + key, path)
        return True

    def save(self, key: str, path: Path) -> None:
        self.storage.put_file(self.prefix + key, path)


class Heartbeat:
    """While a job runs, stamps its `heartbeat_at` every `interval` seconds from a thread, so that
    orphan recovery can tell a live worker deep in a long step from a dead one."""

    def __init__(self, records: Records, job_id: str, interval: float):
        self.records, self.job_id, self.interval = records, job_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.records.heartbeat(self.job_id)
            except Exception as exc:  # a Redis blip must not take the job down; the next beat retries
                log.warning("job %s: heartbeat failed: %s", self.job_id, exc)
