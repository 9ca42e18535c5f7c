"""Bearer API keys, each mapped to a tenant. With no keys configured, only loopback callers are served."""

import hmac
from ipaddress import ip_address

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import ApiError

DEFAULT_TENANT = "default"

# Declares the Bearer scheme in the OpenAPI document on every route that depends on
# current_tenant, so /docs has an Authorize button and generated clients send the key. Errors
# stay ours: the scheme only reads the header.
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="APIKey",
    description="an API key of this deployment's API_KEYS, sent as `Authorization: Bearer <key>`",
)


def is_loopback(host: str | None) -> bool:
    if host in ("localhost", "testclient"):
        return True
    try:
        return ip_address(host or "").is_loopback
    except ValueError:
        return False


async def current_tenant(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Security(bearer)
) -> str:
    """FastAPI dependency: the tenant of the caller, or a 401/403 ApiError."""
    keys: dict[str, str] = request.app.state.settings.api_keys
    if not keys:
        # Defence in depth beside service.serve's refusal to bind a public address without keys.
        client = request.client.host if request.client else None
        if not is_loopback(client):
            raise ApiError(403, "loopback_only", "no API keys are configured: this service serves loopback only")
        return DEFAULT_TENANT
    if credentials is None or not credentials.credentials.strip():
        raise ApiError(401, "missing_api_key", "send 'Authorization: Bearer <key>'")
    token = credentials.credentials.strip()
    for key, tenant in keys.items():
        if hmac.compare_digest(key.encode(), token.encode()):
            return tenant
    raise ApiError(401, "invalid_api_key", "the API key is not valid")
