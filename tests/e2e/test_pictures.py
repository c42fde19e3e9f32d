"""``make pictures`` on a short run: every picture is drawn from real data.

tools.pictures runs the demo's client agents against a server agent in its own process,
with Prometheus and Jaeger, then draws the docs' pictures. These tests check what each
picture was drawn from, so that none can go blank or stale unnoticed: every overview panel
has data, the highlighted exemplar's trace is in the trace backend and crosses both agents,
the alert reached firing, and the PNGs are real images of a modest size.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tools import pictures as tool
from tools.dashboards import iter_panels, scoped, substitute_defaults
from tools.queries import BY_QUERY_KEY

from . import services

pytestmark = pytest.mark.e2e

SECONDS = 35
REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "docs" / "images"


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> tool.Pictures:
    for name in ("prometheus", "jaeger", "dot"):
        services.binary(name)  # a skip, or a failure under CI=true, when one is missing
    root = tmp_path_factory.mktemp("pictures")
    return tool.draw_all(root / "images", SECONDS, workdir=root / "run")


def test_nothing_is_missing(drawn: tool.Pictures) -> None:
    assert drawn.problems() == []


def test_every_overview_panel_is_drawn_from_its_own_query(drawn: tool.Pictures) -> None:
    dashboard = json.loads((tool.DASHBOARDS / tool.OVERVIEW).read_text())
    panels = list(iter_panels(dashboard))
    assert [panel.title for panel in drawn.overview] == [p["title"] for p in panels]
    for panel, source in zip(drawn.overview, panels):
        assert panel.exprs == [substitute_defaults(t["expr"]) for t in source["targets"]]
        finite = [v for s in panel.series for v in s.values if math.isfinite(v)]
        assert len(finite) >= 3, f"{panel.title}: {len(finite)} points"


@pytest.mark.parametrize("key", ["throughput", "replay_attacks", "active_sessions"])
def test_the_traffic_and_the_injected_failures_show(drawn: tool.Pictures, key: str) -> None:
    expr = substitute_defaults(scoped(BY_QUERY_KEY[key].expr))
    panel = next(p for p in drawn.overview if expr in p.exprs)
    assert max(v for s in panel.series for v in s.values if math.isfinite(v)) > 0


def test_the_exemplar_names_a_trace_across_both_agents(drawn: tool.Pictures) -> None:
    trace = drawn.trace
    assert trace is not None
    assert trace.exemplars >= 1 and len(trace.spans) >= 2
    assert {s["traceID"] for s in trace.spans} == {trace.trace_id}
    assert {tool.CLIENT_SERVICE, tool.SERVER_SERVICE} <= set(trace.services)
    by_id = {span["spanID"]: span for span in trace.spans}
    mine = by_id[trace.span_id]
    assert mine["operationName"] == "sage.message.process"
    # The exemplar's value was measured inside its span (Jaeger keeps microseconds).
    assert 0 < trace.exemplar_value * 1e6 <= mine["duration"] + 1
    # The server agent's spans continue the client's: parents found in the same trace.
    server = [s for s in trace.spans if s["serviceName"] == tool.SERVER_SERVICE]
    for span in server:
        parents = [r["spanID"] for r in span["references"] if r["refType"] == "CHILD_OF"]
        assert parents and parents[0] in by_id, span["operationName"]
    assert any(by_id[s["references"][0]["spanID"]]["serviceName"] != s["serviceName"]
               for s in server)  # fmt: skip


def test_the_alert_went_from_pending_to_firing(drawn: tool.Pictures) -> None:
    alert = drawn.alert
    assert alert is not None
    assert {"pending", "firing"} <= set(alert.first)
    assert alert.first["pending"] < alert.first["firing"]
    replays = {s.label: max(v for v in s.values if math.isfinite(v)) for s in alert.series}
    assert replays.get(tool.SERVER_INSTANCE, 0) > 0, replays
    states = {state for _, state in alert.states[f"{tool.ALERT} ({tool.SERVER_INSTANCE})"]}
    assert states == {"pending", "firing"}


@pytest.mark.parametrize("name", ["overview", "exemplar-trace", "alert", "architecture"])
def test_each_png_is_a_real_picture(drawn: tool.Pictures, name: str) -> None:
    path = drawn.files[name]
    assert path.name == f"{name}.png"
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16) or []
    assert width >= 600 and height >= 250, image.size
    assert len(colours) >= 16, f"{name}: {len(colours)} colours, a blank picture?"
    assert 8_000 < path.stat().st_size < 250_000


def test_scaled_rules_change_only_the_durations(tmp_path: Path) -> None:
    divisor = tool.ALERT_TIME_DIVISOR
    for source in sorted(tool.ALERT_RULES.glob("*.yml")):
        scaled = yaml.safe_load(tool.scaled_rules(source, tmp_path / source.name).read_text())
        original = yaml.safe_load(source.read_text())
        for group, new in zip(original["groups"], scaled["groups"]):
            if "interval" in group:
                assert tool._duration_seconds(new.pop("interval")) == max(
                    1,
                    round(tool._duration_seconds(group.pop("interval")) / divisor),
                )
            for rule, scaled_rule in zip(group["rules"], new["rules"]):
                if "for" in rule:
                    seconds = tool._duration_seconds(rule.pop("for"))
                    assert scaled_rule.pop("for") == f"{max(1, round(seconds / divisor))}s"
            assert group == new


def test_the_committed_pictures_are_in_the_docs() -> None:
    """Every committed picture is shown somewhere, and together they stay small."""
    pngs = sorted(IMAGES.glob("*.png"))
    assert {p.name for p in pngs} == {
        "overview.png",
        "exemplar-trace.png",
        "alert.png",
        "architecture.png",
    }
    assert sum(p.stat().st_size for p in pngs) < 400_000
    shown = set()
    for doc in (REPO / "README.md", REPO / "docs" / "stack.md", REPO / "docs" / "tracing.md"):
        shown |= set(re.findall(r"images/([\w-]+\.png)", doc.read_text()))
    assert shown == {p.name for p in pngs}
    assert (IMAGES / "architecture.dot").exists()
