"""Bearer API keys, each mapped to a tenant. With no keys configured, only loopback callers are served."""

import hmac
from ipaddress import ip_address

from fastapi import Request

from service.errors import ApiError

DEFAULT_TENANT = "default"


def is_loopback(host: str | None) -> bool:
    if host in ("localhost", "testclient"):
        return True
    try:
        return ip_address(host or "").is_loopback
    except ValueError:
        return False


async def current_tenant(request: Request) -> str:
    """FastAPI dependency: the tenant of the caller, or a 401/403 ApiError."""
    keys: dict[str, str] = request.app.state.settings.api_keys
    if not keys:
        # Defence in depth beside service.serve's refusal to bind a public address without keys.
        client = request.client.host if request.client else None
        if not is_loopback(client):
            raise ApiError(403, "loopback_only", "no API keys are configured: this service serves loopback only")
        return DEFAULT_TENANT
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing_api_key", "send 'Authorization: Bearer <key>'")
    token = token.strip()
    for key, tenant in keys.items():
        if hmac.compare_digest(key.encode(), token.encode()):
            return tenant
    raise ApiError(401, "invalid_api_key", "the API key is not valid")
