from collections.abc import AsyncIterator

import pytest
import trio

from taskd.store import Store


@pytest.fixture
async def store(aio_loop: object, database_url: str, nursery: trio.Nursery) -> AsyncIterator[Store]:
    """A Store on a fresh database, with its batching loops running."""
    store = await Store.open(database_url, pool_size=4, process_id="test-a")
    await nursery.start(store.inserts.run)
    await nursery.start(store.finishes.run)
    try:
        yield store
    finally:
        store.inserts.close()
        store.finishes.close()
        await store.close()
