"""docs/metrics.md is generated from the metric catalog and must stay in step with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from sage_otel.telemetry.catalog import BY_KEY, INSTRUMENTS, Kind
from tools import metrics_docs as docs

METRICS_MD = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def test_metrics_md_is_current() -> None:
    assert METRICS_MD.exists(), f"docs/metrics.md is missing: run `{docs.REGENERATE}`"
    assert METRICS_MD.read_text(encoding="utf-8") == docs.render_metrics_markdown(), (
        f"docs/metrics.md is stale (the metric catalog changed): run `{docs.REGENERATE}`"
    )


def test_every_prometheus_name_is_documented() -> None:
    text = METRICS_MD.read_text(encoding="utf-8")
    missing = [i.prometheus_name for i in INSTRUMENTS if f"`{i.prometheus_name}`" not in text]
    assert not missing


def test_every_histogram_lists_its_le_values() -> None:
    text = docs.render_metrics_markdown()
    for instrument in INSTRUMENTS:
        if instrument.kind is Kind.HISTOGRAM:
            listed = ", ".join(docs.le_value(b) for b in instrument.buckets)
            assert f"* `{instrument.prometheus_name}`: {listed}" in text


def test_code_path_map_covers_exactly_the_catalog() -> None:
    assert set(docs.RECORDED_AT) == set(BY_KEY)


def test_every_instrument_has_one_section() -> None:
    sections = docs.grouped()
    assert [title for title, _about, _items in sections] == [
        "Sessions",
        "Handshakes",
        "Crypto",
        "DID",
        "Messages",
        "Requests",
    ]
    placed = [i.key for _title, _about, items in sections for i in items]
    assert sorted(placed) == sorted(BY_KEY)
    assert all(items for _title, _about, items in sections)


def test_render_refuses_a_missing_code_path(monkeypatch: pytest.MonkeyPatch) -> None:
    partial = dict(docs.RECORDED_AT)
    del partial["message_size"]
    monkeypatch.setattr(docs, "RECORDED_AT", partial)
    with pytest.raises(docs.CatalogMismatch, match="message_size"):
        docs.render_metrics_markdown()


def test_render_refuses_an_unknown_code_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(docs, "RECORDED_AT", {**docs.RECORDED_AT, "no_such_metric": "nowhere"})
    with pytest.raises(docs.CatalogMismatch, match="no_such_metric"):
        docs.render_metrics_markdown()


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("session_duration", "0.0001 \u00d7 2^0..14 (0.1 ms … 1.64 s)"),
        ("handshake_duration", "0.001 \u00d7 2^0..11 (1 ms … 2.05 s)"),
        ("message_size", "64 \u00d7 4^0..9 (64 B … 16 MiB)"),
        ("crypto_operation_duration", "1e-06 \u00d7 2^0..13 (1 µs … 8.19 ms)"),
    ],
)
def test_buckets_are_written_compactly(key: str, expected: str) -> None:
    assert docs.buckets_compact(BY_KEY[key]) == expected


def test_main_check_and_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "metrics.md"
    assert docs.main(["--check", "--path", str(target)]) == 1
    assert "--write" in capsys.readouterr().err
    assert docs.main(["--write", "--path", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == docs.render_metrics_markdown()
    assert docs.main(["--check", "--path", str(target)]) == 0
