"""The Stable Diffusion model of this worker process: loaded by the first job that needs it, then
shared by every later job (load_sd caches it per process)."""

from service.settings import Settings
from workers.context import JobFailed


def stable_diffusion():
    # Imported here, not at module level, so the Celery main process never loads torch: only the
    # pool child that runs a diffusion job does.
    from models.diffusion.loading import ModelUnavailable, load_sd

    settings = Settings.from_env()
    try:
        return load_sd(settings.sd_model_dir, settings.device)
    except ModelUnavailable as exc:
        raise JobFailed(f"this worker cannot load Stable Diffusion from SD_MODEL_DIR: {exc}") from None
