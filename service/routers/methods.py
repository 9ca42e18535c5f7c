from fastapi import APIRouter

from models.methods.registry import METHODS
from service.deps import SettingsDep, Tenant
from service.schemas import ErrorResponse, MethodList

router = APIRouter(prefix="/v1/methods", tags=["methods"])


@router.get("", response_model=MethodList, responses={401: {"model": ErrorResponse}})
def list_methods(_: Tenant, settings: SettingsDep):
    """Every method, whether it can run with this deployment's weights, and its parameter schema."""
    weight_dirs = settings.weight_dirs
    items = []
    for method in METHODS.values():
        reason = method.unavailable_reason(weight_dirs)
        items.append(
            {
                "name": method.name,
                "family": method.family,
                "kinds": list(method.kinds),
                "available": reason is None,
                "reason": reason,
                "default_mask_source": method.default_mask_source,
                "mask_sources": list(method.mask_sources),
                "summary": method.summary,
                "weights": list(method.weights),
                "components": [vars(component) for component in method.components],
                "params_schema": method.params.model_json_schema(),
            }
        )
    return {"items": items}
