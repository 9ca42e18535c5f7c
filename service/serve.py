"""`python -m service.serve`: run the API with uvicorn on HOST:PORT.

With no API_KEYS it refuses any address but loopback: an open service must not be reachable.
"""

import logging
import sys

import uvicorn

from service.auth import is_loopback
from service.settings import Settings, SettingsError


def settings_or_exit() -> Settings:
    """The settings, or exit with status 2 and the reason: a malformed setting, or a non-loopback
    address with no API_KEYS."""
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if not settings.auth_enabled and not is_loopback(settings.host):
        print(
            f"error: refusing to bind {settings.host}: no API_KEYS are configured, so only loopback "
            "(127.0.0.1, ::1) is allowed. Set API_KEYS=tenant:key[,tenant:key] to serve other hosts.",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return settings


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_or_exit()
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
