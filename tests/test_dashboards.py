"""The Grafana dashboards are generated from the metric catalog and committed as JSON."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

if sys.version_info < (3, 11):  # grafana-foundation-sdk needs Python 3.11
    pytest.skip("grafana-foundation-sdk requires Python >= 3.11", allow_module_level=True)

import yaml

from e2e.services import binary
from sage_otel.telemetry.catalog import INSTRUMENTS, Kind
from tools import dashboards
from tools.queries import m

DASHBOARD_DIR = Path(__file__).resolve().parents[1] / "collector" / "grafana" / "dashboards"
EXPECTED_FILES = {
    "sage-overview.json",
    "sage-sessions.json",
    "sage-handshakes.json",
    "sage-crypto.json",
    "sage-did.json",
    "sage-messages.json",
    "sage-debugging.json",
}
SLO_FILE = "sage-slos.json"
# The monitoring plan's dashboard (§4.1).
PLAN_PANEL_TITLES = (
    "Active Sessions",
    "Session Creation Rate",
    "Handshake Success Rate",
    "Encryption Latency (p95)",
)
LATENCY_HISTOGRAMS = (
    "handshake_duration",
    "message_processing_duration",
    "session_duration",
    "did_resolution_duration",
)
METRIC_NAME = re.compile(r"sage_[a-z_]+")
SCOPE = '{job=~"$job", instance=~"$instance"'
CATALOG_NAMES = {instrument.prometheus_name for instrument in INSTRUMENTS}


@pytest.fixture(scope="module")
def everything() -> dict[str, dict[str, Any]]:
    return dashboards.all_dashboards()


@pytest.fixture(scope="module")
def generated(everything: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The dashboards on SAGE metrics (the SLO dashboard reads recording rules)."""
    return {file: d for file, d in everything.items() if file != SLO_FILE}


@pytest.fixture(scope="module")
def slo_dashboard(everything: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return everything[SLO_FILE]


def metric_names(expr: str) -> set[str]:
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in METRIC_NAME.findall(expr)}


def targets(dashboard: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [
        (panel, target)
        for panel in dashboards.iter_panels(dashboard)
        for target in panel.get("targets", [])
    ]


def all_exprs(generated: dict[str, dict[str, Any]]) -> list[str]:
    exprs = [t["expr"] for d in generated.values() for _, t in targets(d)]
    exprs += [
        v["query"]
        for d in generated.values()
        for v in d["templating"]["list"]
        if v["type"] == "query"
    ]
    return exprs


def test_committed_json_is_current(everything: dict[str, dict[str, Any]]) -> None:
    hint = f"run `{dashboards.REGENERATE}`"
    assert set(everything) == EXPECTED_FILES | {SLO_FILE}
    for file, dashboard in everything.items():
        path = DASHBOARD_DIR / file
        assert path.exists(), f"{path} is missing: {hint}"
        assert path.read_text(encoding="utf-8") == dashboards.render(dashboard), (
            f"{path} is stale (the catalog, the queries or the dashboards changed): {hint}"
        )
    committed = {path.name for path in DASHBOARD_DIR.glob("*.json")}
    assert committed == set(everything), f"unexpected dashboard files: {hint}"


def test_generation_is_deterministic(everything: dict[str, dict[str, Any]]) -> None:
    again = dashboards.all_dashboards()
    assert {f: dashboards.render(d) for f, d in again.items()} == {
        f: dashboards.render(d) for f, d in everything.items()
    }
    for dashboard in everything.values():
        assert "id" not in dashboard and "version" not in dashboard
        text = dashboards.render(dashboard)
        assert text.endswith("}\n") and not text.endswith("\n\n")
        assert json.loads(text) == dashboard


def test_check_and_write_cli(tmp_path: Path) -> None:
    assert dashboards.main(["--check", "--dir", str(DASHBOARD_DIR)]) == 0
    assert dashboards.main(["--check", "--dir", str(tmp_path)]) == 1
    assert dashboards.main(["--write", "--dir", str(tmp_path)]) == 0
    assert dashboards.main(["--check", "--dir", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == EXPECTED_FILES | {SLO_FILE}


def test_uids_are_unique_and_fixed(everything: dict[str, dict[str, Any]]) -> None:
    uids = [d["uid"] for d in everything.values()]
    assert len(set(uids)) == len(uids)
    for file, dashboard in everything.items():
        assert dashboard["uid"] == Path(file).stem
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(set(ids)) == len(ids)


def test_exprs_name_only_catalog_metrics(generated: dict[str, dict[str, Any]]) -> None:
    for expr in all_exprs(generated):
        names = metric_names(expr)
        assert names, f"no SAGE metric in {expr!r}"
        assert names <= CATALOG_NAMES, f"{sorted(names - CATALOG_NAMES)} not in the catalog"


def test_every_catalog_metric_is_on_a_dashboard(generated: dict[str, dict[str, Any]]) -> None:
    shown = set().union(*(metric_names(expr) for expr in all_exprs(generated)))
    assert CATALOG_NAMES - shown == set()


def test_every_panel_has_title_unit_description_and_query(
    everything: dict[str, dict[str, Any]],
) -> None:
    for file, dashboard in everything.items():
        panels = list(dashboards.iter_panels(dashboard))
        assert panels, file
        for panel in panels:
            where = f"{file}: {panel.get('title')!r}"
            assert panel.get("title"), where
            assert panel.get("description", "").strip(), where
            assert panel["fieldConfig"]["defaults"].get("unit"), where
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            assert panel["targets"], where
            for target in panel["targets"]:
                assert target["expr"].strip(), where
                assert target["refId"], where


def test_every_sage_selector_is_scoped_by_job_and_instance(
    generated: dict[str, dict[str, Any]],
) -> None:
    for dashboard in generated.values():
        for _, target in targets(dashboard):
            for match in METRIC_NAME.finditer(target["expr"]):
                rest = target["expr"][match.end() :]
                assert rest.startswith(SCOPE), target["expr"]


def test_template_variables(generated: dict[str, dict[str, Any]]) -> None:
    for file, dashboard in generated.items():
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert set(variables) == {"datasource", "job", "instance"}, file
        datasource = variables["datasource"]
        assert datasource["type"] == "datasource"
        assert datasource["query"] == "prometheus"
        assert datasource["current"]["value"] == dashboards.DATASOURCE_UID
        for name in ("job", "instance"):
            assert variables[name]["type"] == "query"
            assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
            assert variables[name]["datasource"]["uid"] == "${datasource}"


def test_debugging_latency_targets_have_exemplars(generated: dict[str, dict[str, Any]]) -> None:
    debugging = generated["sage-debugging.json"]
    with_exemplars: set[str] = set()
    for panel, target in targets(debugging):
        names = metric_names(target["expr"])
        latency = {
            i.prometheus_name for i in INSTRUMENTS if i.kind is Kind.HISTOGRAM and i.unit == "s"
        }
        if names & latency:
            assert target.get("exemplar") is True, panel["title"]
            with_exemplars |= names
    assert {m(key) for key in LATENCY_HISTOGRAMS} <= with_exemplars
    kinds = [panel["type"] for panel in dashboards.iter_panels(debugging)]
    assert kinds.count("heatmap") == 1
    heatmap = next(p for p in dashboards.iter_panels(debugging) if p["type"] == "heatmap")
    (target,) = heatmap["targets"]
    assert target["format"] == "heatmap"
    assert m("message_processing_duration", "_bucket") in target["expr"]


def test_overview_has_the_plans_panels(generated: dict[str, dict[str, Any]]) -> None:
    titles = [p["title"] for p in dashboards.iter_panels(generated["sage-overview.json"])]
    for title in PLAN_PANEL_TITLES:
        assert title in titles
    assert len(titles) >= 9


def test_panel_queries_are_runnable(generated: dict[str, dict[str, Any]]) -> None:
    queries = dashboards.panel_queries()
    assert len(queries) == sum(len(targets(d)) for d in generated.values())
    assert {file for file, _, _ in queries} == EXPECTED_FILES
    for file, title, expr in queries:
        assert "$" not in expr, (file, title, expr)
        assert "[5m]" in expr or "[1m]" in expr or "rate(" not in expr
        assert 'job=~".*", instance=~".*"' in expr


def test_scoped_adds_filters_to_every_selector() -> None:
    bucket = m("session_duration", "_bucket")
    active = m("sessions_active")
    assert dashboards.scoped(f"sum({active})") == f"sum({active}{SCOPE}}})"
    assert dashboards.scoped(f"{active}{{}}") == f"{active}{SCOPE}}}"
    assert (
        dashboards.scoped(f'rate({bucket}{{operation="encrypt"}}[5m])')
        == f'rate({bucket}{SCOPE}, operation="encrypt"}}[5m])'
    )
    assert dashboards.scoped("up") == "up"


def test_no_metric_name_is_typed_in_the_module() -> None:
    source = Path(dashboards.__file__).read_text(encoding="utf-8")
    retyped = sorted(name for name in CATALOG_NAMES if name.removesuffix("_total") in source)
    assert not retyped, "use m()/quantile()/PLAN_QUERIES instead of metric names"


# --- the SLO dashboard ---------------------------------------------------------------------

SLO_RULES = dashboards.SLO_RULES
RECORD = re.compile(r"\b(slo:[a-z_:0-9]+|sloth_slo_info)\b")


def slo_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(SLO_RULES.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_slo_dashboard_has_a_row_per_slo_with_its_panels(slo_dashboard: dict[str, Any]) -> None:
    rows = [p["title"] for p in slo_dashboard["panels"] if p["type"] == "row"]
    objectives = {
        rule["labels"]["sloth_slo"]: rule["labels"]["sloth_objective"]
        for rule in slo_rules()
        if rule.get("record") == "sloth_slo_info"
    }
    assert len(objectives) == 3
    assert rows == [
        "All SLOs",
        *(f"{name}: objective {value}% over 30 days" for name, value in objectives.items()),
    ]
    titles = [p["title"] for p in dashboards.iter_panels(slo_dashboard)]
    for title in (
        "Error Budget Remaining",
        "Burn Rate: Page Windows",
        "Burn Rate: Ticket Windows",
        "SLI and Objective",
    ):
        assert titles.count(title) == len(objectives), title
    variables = [v["name"] for v in slo_dashboard["templating"]["list"]]
    assert variables == ["datasource"]


def test_slo_dashboard_reads_only_recorded_series(slo_dashboard: dict[str, Any]) -> None:
    recorded = {rule["record"] for rule in slo_rules() if "record" in rule}
    ids = {rule["labels"]["sloth_id"] for rule in slo_rules() if "record" in rule}
    for panel, target in targets(slo_dashboard):
        expr = target["expr"]
        assert not METRIC_NAME.search(expr), expr
        names = set(RECORD.findall(expr))
        assert names <= recorded, (panel["title"], names - recorded)
        assert names or expr.startswith("vector("), expr
        assert set(re.findall(r'sloth_id="([^"]+)"', expr)) <= ids, expr


def test_slo_burn_thresholds_are_the_alerts(slo_dashboard: dict[str, Any]) -> None:
    """The threshold lines are the factors in the generated alerts: Sloth's google-30d
    windows (2% of the budget in 1h, 5% in 6h, 10% in 1d and in 3d)."""
    expected = {"Burn Rate: Page Windows": {14.4, 6.0}, "Burn Rate: Ticket Windows": {3.0, 1.0}}
    alerts = " ".join(rule["expr"] for rule in slo_rules() if "alert" in rule)
    for panel, target in targets(slo_dashboard):
        constant = re.fullmatch(r"vector\(([\d.]+)\)", target["expr"])
        if constant:
            factor = float(constant.group(1))
            assert factor in expected[panel["title"]], panel["title"]
            assert f"({constant.group(1)} * " in alerts
    for slo in dashboards.slos():
        assert [(sev, f) for sev, f, _, _ in slo.conditions] == [
            ("page", 14.4),
            ("page", 6.0),
            ("ticket", 3.0),
            ("ticket", 1.0),
        ]


@pytest.mark.parametrize("promtool", ["promtool", "promtool-2"])
def test_slo_dashboard_queries_return_data_from_the_rules(promtool: str, tmp_path: Path) -> None:
    """Under promtool with the generated rules and an hour of traffic for every SLO, each
    SLO panel query returns data: ``count(query)`` is the number of series it shows."""
    executable = binary(promtool)
    agent = 'job="sage-agent",instance="agent-1:9090"'
    requests = m("server_requests")
    series = {
        f'{requests}{{{agent},operation="handshake",outcome="served"}}': "0+100x60",
        f'{requests}{{{agent},operation="handshake",outcome="refused"}}': "0+1x60",
        f'{requests}{{{agent},operation="handshake",outcome="failed"}}': "0+1x60",
        f'{requests}{{{agent},operation="message",outcome="served"}}': "0+100x60",
        f'{requests}{{{agent},operation="message",outcome="refused"}}': "0+1x60",
        f'{requests}{{{agent},operation="message",outcome="failed"}}': "0+1x60",
        f'{m("message_processing_duration", "_bucket")}{{{agent},le="0.04096"}}': "0+99x60",
        f'{m("message_processing_duration", "_bucket")}{{{agent},le="+Inf"}}': "0+100x60",
        f"{m('message_processing_duration', '_count')}{{{agent}}}": "0+100x60",
    }
    queries = dashboards.slo_panel_queries()
    assert {file for file, _, _ in queries} == {SLO_FILE}
    tests = [
        {
            "expr": f"count({expr})",
            "eval_time": "1h",
            "exp_samples": [{"labels": "{}", "value": 3 if "sloth_service" in expr else 1}],
        }
        for _, _, expr in queries
    ]
    unit = {
        "rule_files": [str(SLO_RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": k, "values": v} for k, v in series.items()],
                "promql_expr_test": tests,
            }
        ],
    }
    path = tmp_path / "slo-dashboard.test.yml"
    path.write_text(json.dumps(unit), encoding="utf-8")
    result = subprocess.run(
        [executable, "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
