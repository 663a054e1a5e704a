"""`lusai deliveries resend`: the same guard as the API's re-send, so a send in progress is left alone."""

from __future__ import annotations

from typer.testing import CliRunner

from service.cli import app
from service.core.models import Delivery, DeliveryState
from service.core.runtime import Runtime


def test_resend_skips_a_delivery_being_sent(runtime: Runtime) -> None:
    with runtime.db.session() as s:
        rows = [
            Delivery(destination="PACS@127.0.0.1:104", sop_class_uid="1.2", sop_instance_uid=uid,
                     storage_key="k", state=state, attempts=attempts, last_error="peer was down")
            for uid, state, attempts in [("9.1", DeliveryState.DEAD, 8), ("9.2", DeliveryState.SENDING, 3)]
        ]  # fmt: skip
        s.add_all(rows)
        s.flush()
        dead, sending = rows[0].id, rows[1].id

    result = CliRunner().invoke(app, ["deliveries", "resend", str(dead), str(sending)])

    assert result.exit_code == 0, result.output
    assert "re-queued 1 deliveries" in result.output
    assert f"skipped 1 being sent right now: {sending}" in result.output
    with runtime.db.session() as s:
        revived, busy = s.get(Delivery, dead), s.get(Delivery, sending)
        assert revived is not None and revived.state == DeliveryState.PENDING and revived.attempts == 0
        assert busy is not None and busy.state == DeliveryState.SENDING and busy.attempts == 3
