"""Typed dependencies of the routes: `tenant: Tenant`, `records: RecordsDep`, ...

The providers are `async` and only read `app.state`: a sync provider would cost every request a
hop to the thread pool before its route even starts.
"""

from typing import Annotated

from celery import Celery
from fastapi import Depends, Request

from service.auth import current_tenant
from service.records import Records
from service.settings import Settings
from service.storage import Storage


async def _records(request: Request) -> Records:
    return request.app.state.records


async def _storage(request: Request) -> Storage:
    return request.app.state.storage


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _producer(request: Request) -> Celery:
    return request.app.state.producer


Tenant = Annotated[str, Depends(current_tenant)]
RecordsDep = Annotated[Records, Depends(_records)]
StorageDep = Annotated[Storage, Depends(_storage)]
SettingsDep = Annotated[Settings, Depends(_settings)]
ProducerDep = Annotated[Celery, Depends(_producer)]
