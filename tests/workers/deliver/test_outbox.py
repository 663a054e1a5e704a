"""Delivery outbox against a real DCMTK storescp: success, dead peer, backoff, dead-letter, isolation."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest

from service.core import lifecycle
from service.core.models import Delivery, DeliveryState
from service.core.runtime import Runtime
from tests.conftest import free_port
from tests.rows import get_row, stored_delivery
from workers.deliver.outbox import send_delivery

pytestmark = pytest.mark.network


def test_delivered_byte_for_byte_in_its_own_transfer_syntax(runtime, storescp, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port, received = storescp
    for seed in (0, 1):  # raw Explicit VR LE, then JPEG Baseline: each keeps its transfer syntax
        did, uid = stored_delivery(runtime, tmp_path, f"PACS@127.0.0.1:{port}", seed=seed)
        assert send_delivery(did, runtime=runtime) == ("delivered", None)
        d = get_row(runtime, Delivery, did)
        assert d.state == DeliveryState.DELIVERED and d.attempts == 1 and d.delivered_at is not None
        got = [pydicom.dcmread(p) for p in received.iterdir()]
        match = [g for g in got if g.SOPInstanceUID == uid]
        assert len(match) == 1
        sent = pydicom.dcmread(runtime.store.path(d.storage_key))
        assert match[0].file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        assert match[0].PixelData == sent.PixelData
    # a delivered row is not sent again
    assert send_delivery(did, runtime=runtime) == ("skipped", None)


def _due(runtime, delivery_id: int) -> None:  # type: ignore[no-untyped-def]
    """The backoff has passed: the retry is due now."""
    with runtime.db.session() as s:
        d = s.get(Delivery, delivery_id)
        assert d is not None
        d.next_attempt_at = datetime.now(UTC)


def test_dead_peer_backs_off_then_dead_letters_without_blocking_others(
    runtime, storescp, tmp_path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    port, received = storescp
    monkeypatch.setattr(lifecycle, "DELIVERY_MAX_ATTEMPTS", 3)
    dead_id, _ = stored_delivery(runtime, tmp_path, f"NOBODY@127.0.0.1:{free_port()}", seed=2)
    live_id, live_uid = stored_delivery(runtime, tmp_path, f"PACS@127.0.0.1:{port}", seed=3)

    outcome, delay = send_delivery(dead_id, runtime=runtime)
    assert outcome == "retrying" and delay == lifecycle.DELIVERY_BACKOFF.base_s
    d = get_row(runtime, Delivery, dead_id)
    assert d.state == DeliveryState.RETRYING and d.attempts == 1 and "not established" in (d.last_error or "")
    assert d.next_attempt_at is not None and d.next_attempt_at.replace(tzinfo=UTC) > datetime.now(UTC)

    # the live destination is untouched by the dead one
    assert send_delivery(live_id, runtime=runtime)[0] == "delivered"
    assert any(pydicom.dcmread(p).SOPInstanceUID == live_uid for p in received.iterdir())

    # a second message before the backoff has passed (another sweep's) spends no attempt
    assert send_delivery(dead_id, runtime=runtime) == ("skipped", None)
    assert get_row(runtime, Delivery, dead_id).attempts == 1
    _due(runtime, dead_id)
    outcome, delay2 = send_delivery(dead_id, runtime=runtime)
    assert outcome == "retrying" and delay2 == 2 * lifecycle.DELIVERY_BACKOFF.base_s  # exponential
    _due(runtime, dead_id)
    assert send_delivery(dead_id, runtime=runtime) == ("dead", None)
    d = get_row(runtime, Delivery, dead_id)
    assert d.state == DeliveryState.DEAD and d.attempts == 3
    assert send_delivery(dead_id, runtime=runtime) == ("skipped", None)


def test_resend_command_revives_dead_deliveries(runtime, storescp, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from service.cli import app

    port, _ = storescp
    did, _ = stored_delivery(runtime, tmp_path, f"PACS@127.0.0.1:{port}", seed=4)
    with runtime.db.session() as s:
        d = s.get(Delivery, did)
        assert d is not None
        d.state, d.attempts, d.last_error = DeliveryState.DEAD, 8, "peer was down"
    result = CliRunner().invoke(app, ["deliveries", "resend"])
    assert result.exit_code == 0, result.output
    assert "re-queued 1" in result.output
    d = get_row(runtime, Delivery, did)
    assert d.state == DeliveryState.PENDING and d.attempts == 0 and d.last_error is None
    # the message really is on the embedded queue, and the row now delivers
    assert list((runtime.settings.broker_dir / "queue").iterdir())
    assert send_delivery(did, runtime=runtime)[0] == "delivered"


def test_backoff_is_capped() -> None:
    assert lifecycle.DELIVERY_BACKOFF.delay(1) == lifecycle.DELIVERY_BACKOFF.base_s
    assert lifecycle.DELIVERY_BACKOFF.delay(50) == lifecycle.DELIVERY_BACKOFF.cap_s


def test_recovery_resends_deliveries_whose_message_was_lost(runtime: Runtime, tmp_path: Path) -> None:
    from datetime import timedelta

    from service.core.recovery import requeue_lost_deliveries

    stored_delivery(runtime, tmp_path, "PACS@127.0.0.1:104", seed=5)  # fresh: must be left alone
    lost, _ = stored_delivery(runtime, tmp_path, "PACS@127.0.0.1:104", seed=6)
    with runtime.db.session() as s:
        d = s.get(Delivery, lost)
        assert d is not None
        d.state = DeliveryState.RETRYING
        d.next_attempt_at = datetime.now(UTC) - timedelta(minutes=30)  # its countdown message never came
    queue = runtime.settings.broker_dir / "queue"
    before = set(queue.iterdir()) if queue.exists() else set()
    assert requeue_lost_deliveries(runtime) == 1  # the fresh pending one is left alone
    new = set(queue.iterdir()) - before
    assert len(new) == 1 and f"[{lost}]" in new.pop().read_text()
