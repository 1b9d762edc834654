"""walspan.ship: a store's traces sent to any OTLP/HTTP backend, at least once and in order per
session, from the durable log (`walspan ship`; docs/SHIP.md).

    from walspan.ship import ship, Shipper, ShipOptions

    result = ship("traces", "http://localhost:4318/v1/traces")   # what is there now
    assert result.ok                                             # all of it acknowledged

    shipper = Shipper("traces", ShipOptions("http://collector:4318", partial=True))
    shipper.run(follow=True, stop=stop_event)                    # as it is written

A shipper reads through walspan.read only; it never takes a writer's lock and never writes
to a log. What it has had acknowledged lives in `.walspan/ship/NAME/` in the store.
"""

from ._cursors import CursorStore, SavedCursor, shippers
from ._http import JSON, PROTOBUF
from ._shipper import ShipOptions, Shipper, ShipResult, ShipStatus, ship
from ._spans import TRACE_SPAN_NAME, trace_span_id

__all__ = [
    "JSON",
    "PROTOBUF",
    "TRACE_SPAN_NAME",
    "CursorStore",
    "SavedCursor",
    "ShipOptions",
    "ShipResult",
    "ShipStatus",
    "Shipper",
    "ship",
    "shippers",
    "trace_span_id",
]
