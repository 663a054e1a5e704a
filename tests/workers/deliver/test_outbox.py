"""Delivery outbox against a real DCMTK storescp: success, dead peer, backoff, dead-letter, isolation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
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


@pytest.mark.parametrize(
    ("peer_option", "arrives_as"), [("+xd", "1.2.840.10008.1.2.1.99"), ("+xi", "1.2.840.10008.1.2")]
)
def test_a_deflated_seg_reaches_a_peer_that_takes_deflate_and_one_that_does_not(
    runtime: Runtime, tmp_path: Path, peer_option: str, arrives_as: str
) -> None:
    """The SEG is stored deflated (LUSAI_SEG_ENCODING=binary-deflated); a PACS that accepts only
    Implicit VR Little Endian gets the same dataset re-encoded, the masks bit for bit."""
    from tests.conftest import run_storescp
    from tests.factories import make_analysis, make_source
    from workers.write_dicom.build import SEG_ENCODINGS, OutputOptions, build_outputs

    source = make_source(64, 80, 4, jpeg=False)
    seg = build_outputs(
        source, make_analysis(source), options=OutputOptions(seg=SEG_ENCODINGS["binary-deflated"], sr=False)
    )[0].dataset
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    received = tmp_path / "received"
    received.mkdir()
    with run_storescp(received, "PACS", peer_option) as port:
        did, uid = stored_delivery(runtime, tmp_path, f"PACS@127.0.0.1:{port}", file=path)
        assert send_delivery(did, runtime=runtime) == ("delivered", None)
    (got,) = [pydicom.dcmread(p) for p in received.iterdir()]
    assert got.SOPInstanceUID == uid and got.file_meta.TransferSyntaxUID == arrives_as
    assert got.PixelData == pydicom.dcmread(path).PixelData


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


def test_after_an_outage_a_study_s_outputs_go_in_order_and_at_once(runtime: Runtime, tmp_path: Path) -> None:
    """Regression (bench/chaos/faults.py pacs_down): each delivery went when its own retry came due
    (up to an hour after the PACS returned) and most outputs overtook an older one of their study.
    Now those behind a failing one wait without spending attempts, and the first object the PACS
    takes releases the next of its study and wakes the other studies' retries."""
    from tests.conftest import run_storescp

    port = free_port()
    pacs = f"PACS@127.0.0.1:{port}"
    line = [stored_delivery(runtime, tmp_path, pacs, seed=s, study_uid="1.2.3.4")[0] for s in (10, 11, 12)]
    other, _ = stored_delivery(runtime, tmp_path, pacs, seed=13, study_uid="1.2.3.5")
    queue = runtime.settings.broker_dir / "queue"

    def sent() -> set[str]:  # the deliver messages on the embedded queue since the last call
        nonlocal seen
        now = set(queue.iterdir()) if queue.exists() else set()
        new, seen = now - seen, now
        return {p.read_text() for p in new}

    seen: set[Path] = set()
    # the PACS is down
    assert send_delivery(line[0], runtime=runtime)[0] == "retrying"
    assert send_delivery(line[1], runtime=runtime) == ("waiting", None)
    assert send_delivery(line[2], runtime=runtime) == ("waiting", None)
    assert send_delivery(other, runtime=runtime)[0] == "retrying"
    assert [get_row(runtime, Delivery, d).attempts for d in line] == [1, 0, 0]
    sent()
    with run_storescp(tmp_path / "received", "PACS", "+xa", port=port):
        _due(runtime, line[0])  # the first retry comes due; the other study's is an hour off
        with runtime.db.session() as s:
            d = s.get(Delivery, other)
            assert d is not None
            d.next_attempt_at = datetime.now(UTC) + timedelta(hours=1)
        assert send_delivery(line[0], runtime=runtime) == ("delivered", None)
        follow = sent()  # released the next of its study, woke the other study's retry
        assert any(f"[{line[1]}]" in m for m in follow) and any(f"[{other}]" in m for m in follow)
        assert len(follow) == 2
        assert send_delivery(other, runtime=runtime)[0] == "delivered"
        assert send_delivery(line[2], runtime=runtime) == ("skipped", None)  # a stray message
        assert get_row(runtime, Delivery, line[2]).state == DeliveryState.WAITING  # still behind
        assert send_delivery(line[1], runtime=runtime)[0] == "delivered"
        assert any(f"[{line[2]}]" in m for m in sent())
        assert send_delivery(line[2], runtime=runtime)[0] == "delivered"
    rows = [get_row(runtime, Delivery, d) for d in line]
    assert [d.state for d in rows] == [DeliveryState.DELIVERED] * 3
    assert [d.attempts for d in rows] == [2, 1, 1]
    assert [r.delivered_at for r in rows] == sorted(r.delivered_at for r in rows)  # type: ignore[type-var]


def test_the_sweep_s_probe_wakes_the_retries_of_a_destination_that_answers_again(
    runtime: Runtime, storescp: tuple[int, Path], tmp_path: Path
) -> None:
    """Without new traffic, a PACS back from an outage got each delivery only when its backoff ran
    out (up to an hour); the recovery sweep's C-ECHO finds it back within one sweep interval."""
    from workers.deliver import probe_destinations

    port, _ = storescp
    back, _ = stored_delivery(
        runtime, tmp_path, f"PACS@127.0.0.1:{port}", seed=20, state=DeliveryState.RETRYING
    )
    down, _ = stored_delivery(
        runtime, tmp_path, f"NOBODY@127.0.0.1:{free_port()}", seed=21, state=DeliveryState.RETRYING
    )
    later = datetime.now(UTC) + timedelta(minutes=50)
    for d_id in (back, down):
        with runtime.db.session() as s:
            d = s.get(Delivery, d_id)
            assert d is not None
            d.next_attempt_at = later
    queue = runtime.settings.broker_dir / "queue"
    assert probe_destinations(runtime) == 1
    messages = [p.read_text() for p in queue.iterdir()]
    assert len(messages) == 1 and f"[{back}]" in messages[0]
    assert get_row(runtime, Delivery, back).next_attempt_at.replace(tzinfo=UTC) <= datetime.now(UTC)  # type: ignore[union-attr]
    assert get_row(runtime, Delivery, down).next_attempt_at.replace(tzinfo=UTC) == later  # type: ignore[union-attr]
    assert send_delivery(back, runtime=runtime)[0] == "delivered"
    assert probe_destinations(runtime) == 0  # nothing sleeps at the live one any more


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
