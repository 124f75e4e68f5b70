"""Run the FastAPI example end to end in one process: ``python examples/fastapi_app/run.py``.

Creates the tables, starts a worker in the background, then talks to the app through
httpx's ASGI transport (no network): ``POST /orders``, then
``GET /orders/{id}/confirmation?wait=10``, which returns the job's typed result.
In production the app runs under uvicorn (``uvicorn api:api``) and the worker in its
own process (``polyqueue worker jobs:app``), both from this folder.
"""

from __future__ import annotations

import asyncio

import httpx
from api import api, engine, sessions
from jobs import Base, Order, app

from polyqueue import run_worker
from polyqueue.migrations import upgrade


async def main() -> None:
    await upgrade(engine)  # polyqueue's tables (polyqueue db upgrade)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)

    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(app, engine=engine, stopping=stop))
    try:
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://orders.example") as client:
            created = await client.post("/orders", json={"email": "ada@example.com", "total_cents": 4200})
            created.raise_for_status()
            order = created.json()
            print("POST /orders ->", created.status_code, order)

            confirmation = await client.get(f"/orders/{order['id']}/confirmation", params={"wait": 10})
            confirmation.raise_for_status()
            print(f"GET /orders/{order['id']}/confirmation ->", confirmation.status_code, confirmation.json())
        async with sessions() as session:
            stored = await session.get(Order, order["id"])
            assert stored is not None
            print("order confirmed in the job's transaction:", stored.confirmed_at is not None)
    finally:
        stop.set()
        await worker
        await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
