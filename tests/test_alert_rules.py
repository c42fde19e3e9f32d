"""The Prometheus alert rules: valid, unit-tested, documented, and on the catalog's metrics.

`promtool check rules` and `promtool test rules` run on collector/prometheus/; the rest reads
the two files (a small reader for the block-style YAML they are written in, cross-checked
against promtool's rule count) and checks what promtool cannot: every alert has its
annotations and a runbook section, a firing and a silent test case, and names only metrics
and labels that the catalog defines.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sage_otel.telemetry.catalog import BY_PROMETHEUS_NAME, OTHER, Instrument, Kind
from tests.e2e import services as e2e_services
from tests.e2e.promql import RUNBOOK_URL, runbook_anchors
from tools.queries import BY_QUERY_KEY

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / "collector" / "prometheus"
RULES = PROMETHEUS_DIR / "alerts" / "sage-alerts.yml"
RULE_TESTS = PROMETHEUS_DIR / "tests" / "sage-alerts.test.yml"

# The monitoring plan's §5.1: name -> (for, severity, threshold as written in the plan).
PLAN_ALERTS = {
    "HighSessionFailureRate": ("5m", "critical", "> 0.1"),
    "HandshakeFailures": ("2m", "warning", "> 10"),
    "HighEncryptionLatency": ("5m", "warning", "> 0.010"),
    "ReplayAttacksDetected": ("1m", "critical", "> 0"),
}
# Alerts whose value is a panel of the dashboards: the same PromQL (tools/queries.py).
SAME_AS_QUERY = {
    "HighSessionFailureRate": "session_failure_rate",
    "HighEncryptionLatency": "encrypt_p95",
    "NonceInvalidRatio": "nonce_failure_rate",
}
# Alerts whose value is a constant (up == 0, absent() = 1): their description has no $value.
CONSTANT_VALUE = {"SageAgentDown", "CollectorDown", "SageMetricsMissing"}
PROMETHEUS_LABELS = {"job", "instance"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# --- a reader for the block-style YAML subset the rule files use ----------------------------


class _Reader:
    """Block mappings and sequences, plain/quoted scalars, block scalars, ``[]`` and ``{}``.

    Anything else (anchors, flow collections with content, tags) raises ValueError rather
    than being misread. Scalars stay strings.
    """

    _KEY = re.compile(r"^([A-Za-z_][\w.-]*):(?:[ \t]+(.*))?$")
    _BLOCK = ("|", "|-", ">", ">-")

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.i = 0

    def read(self) -> Any:
        line = self._peek()
        if line is None:
            return None
        value = self._node(line[0])
        if self._peek() is not None:
            raise self._error("content after the document")
        return value

    def _error(self, message: str) -> ValueError:
        return ValueError(f"line {self.i + 1}: {message}")

    def _peek(self) -> tuple[int, str] | None:
        while self.i < len(self.lines):
            raw = self.lines[self.i]
            content = raw.strip()
            if content and not content.startswith("#"):
                if "\t" in raw[: len(raw) - len(raw.lstrip())]:
                    raise self._error("tab in indentation")
                return len(raw) - len(raw.lstrip(" ")), content
            self.i += 1
        return None

    def _node(self, indent: int) -> Any:
        line = self._peek()
        assert line is not None
        if line[1] == "-" or line[1].startswith("- "):
            return self._sequence(indent)
        return self._mapping(indent)

    def _sequence(self, indent: int) -> list[Any]:
        items: list[Any] = []
        while (line := self._peek()) is not None and line[0] == indent:
            content = line[1]
            if not (content == "-" or content.startswith("- ")):
                break
            rest = content[1:].lstrip(" ")
            if not rest:
                self.i += 1
                child = self._peek()
                if child is None or child[0] <= indent:
                    raise self._error("empty sequence item")
                items.append(self._node(child[0]))
            elif self._KEY.match(rest):
                # "- key: value" opens a mapping indented where "key" starts.
                inner = indent + len(content) - len(rest)
                self.lines[self.i] = " " * inner + rest
                items.append(self._mapping(inner))
            else:
                self.i += 1
                items.append(self._scalar(rest))
        if line is not None and line[0] > indent:
            raise self._error("unexpected indentation")
        return items

    def _mapping(self, indent: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        while (line := self._peek()) is not None and line[0] == indent:
            content = line[1]
            if content == "-" or content.startswith("- "):
                break
            match = self._KEY.match(content)
            if not match:
                raise self._error(f"not a 'key: value' line: {content!r}")
            key, rest = match.group(1), (match.group(2) or "").strip()
            if key in result:
                raise self._error(f"duplicate key {key!r}")
            self.i += 1
            if rest.startswith("#"):
                rest = ""
            if not rest:
                child = self._peek()
                nested = child is not None and (
                    child[0] > indent
                    or (child[0] == indent and (child[1] == "-" or child[1].startswith("- ")))
                )
                result[key] = self._node(child[0]) if nested and child else None
            elif rest in self._BLOCK:
                result[key] = self._block_scalar(indent, rest)
            else:
                result[key] = self._scalar(rest)
        if line is not None and line[0] > indent:
            raise self._error("unexpected indentation")
        return result

    def _block_scalar(self, parent: int, style: str) -> str:
        body: list[str] = []
        block_indent = None
        while self.i < len(self.lines):
            raw = self.lines[self.i]
            if raw.strip():
                indent = len(raw) - len(raw.lstrip(" "))
                if indent <= parent:
                    break
                block_indent = indent if block_indent is None else block_indent
                if indent < block_indent:
                    raise self._error("block scalar line indented less than its first line")
                body.append(raw[block_indent:])
            else:
                body.append("")
            self.i += 1
        while body and not body[-1]:
            body.pop()
        if style.startswith(">"):
            text = re.sub(r"(?<!\n)\n(?!\n)", " ", "\n".join(body))
        else:
            text = "\n".join(body)
        return text if style.endswith("-") else text + "\n"

    def _scalar(self, text: str) -> Any:
        if text in ("[]", "{}"):
            return [] if text == "[]" else {}
        if text[0] == "'":
            if len(text) < 2 or text[-1] != "'":
                raise self._error(f"unterminated single-quoted scalar: {text!r}")
            return text[1:-1].replace("''", "'")
        if text[0] == '"':
            return json.loads(text)
        if text[0] in "[{&*!|>%@`":
            raise self._error(f"unsupported YAML construct: {text!r}")
        return re.split(r"\s+#", text, maxsplit=1)[0].rstrip()


def load_yaml(path: Path) -> Any:
    return _Reader(path.read_text(encoding="utf-8")).read()


def test_reader_handles_the_constructs_used() -> None:
    text = (
        "# comment\n"
        "a:\n"
        "  - name: x  # trailing comment\n"
        "    expr: |\n"
        "      sum(x)\n"
        "        > 1\n"
        "    q: 'it''s {{ $value }}'\n"
        '    d: "a\\"b"\n'
        "    empty: []\n"
        "  - plain #1\n"
        "b: >-\n"
        "  one\n"
        "  two\n"
        "c: https://example.org/x.md#anchor\n"
    )
    assert _Reader(text).read() == {
        "a": [
            {
                "name": "x",
                "expr": "sum(x)\n  > 1\n",
                "q": "it's {{ $value }}",
                "d": 'a"b',
                "empty": [],
            },
            "plain",
        ],
        "b": "one two",
        "c": "https://example.org/x.md#anchor",
    }
    with pytest.raises(ValueError, match="unsupported"):
        _Reader("a: [1, 2]\n").read()


# --- promtool ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["promtool", "promtool-2"])
def promtool(request: pytest.FixtureRequest) -> str:
    """Prometheus 3's promtool (what the tests and the compose stack run) and Debian's 2.42
    (the rules must stay loadable by a Prometheus 2 behind the remote-write overlay)."""
    return e2e_services.binary(request.param)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, check=False, cwd=REPO)


def test_promtool_check_rules(promtool: str) -> None:
    result = run(promtool, "check", "rules", str(RULES))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    found = re.search(r"SUCCESS: (\d+) rules found", output)
    assert found, output
    # The reader below sees exactly the rules promtool sees.
    assert int(found.group(1)) == len(list(rules())), output


def test_promtool_test_rules(promtool: str) -> None:
    result = run(promtool, "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_every_rule_file_has_unit_tests() -> None:
    tested = set()
    for test_file in (PROMETHEUS_DIR / "tests").glob("*.yml"):
        for rule_file in load_yaml(test_file)["rule_files"]:
            tested.add((test_file.parent / rule_file).resolve())
    rule_files = {path.resolve() for path in (PROMETHEUS_DIR / "alerts").glob("*.yml")}
    assert rule_files, "no rule files"
    assert rule_files <= tested, sorted(map(str, rule_files - tested))


def test_no_test_file_where_prometheus_loads_rules() -> None:
    """prometheus.yml loads alerts/*.yml: a promtool test file there breaks rule loading."""
    for path in (PROMETHEUS_DIR / "alerts").iterdir():
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^(tests|rule_files):", text, re.M), f"{path.name} is a test file"


# --- the rules -----------------------------------------------------------------------------


def groups() -> list[dict[str, Any]]:
    return load_yaml(RULES)["groups"]


def rules() -> Iterator[dict[str, Any]]:
    for group in groups():
        yield from group["rules"]


def alerts() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for rule in rules():
        assert "alert" in rule, f"not an alerting rule: {rule}"
        assert rule["alert"] not in found, f"duplicate alert {rule['alert']}"
        found[rule["alert"]] = rule
    return found


ALERT_NAMES = sorted(alerts())


def seconds(duration: str) -> float:
    """A Prometheus duration (``1h30m``, ``15s``) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w|y)", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a duration: {duration!r}")
    return sum(int(n) * units[u] for n, u in parts)


def test_the_plans_alerts_exist_with_its_for_severity_and_threshold() -> None:
    critical = next(group for group in groups() if group["name"] == "sage_critical")
    assert critical.get("interval") == "30s"
    by_name = {rule["alert"]: rule for rule in critical["rules"]}
    for name, (for_, severity, threshold) in PLAN_ALERTS.items():
        assert name in by_name, f"{name} missing from sage_critical"
        rule = by_name[name]
        assert rule["for"] == for_, name
        assert rule["labels"]["severity"] == severity, name
        assert " ".join(rule["expr"].split()).endswith(threshold), name
    assert {group["name"] for group in groups()} == {"sage_critical", "sage_operations"}


@pytest.mark.parametrize("name", ALERT_NAMES)
def test_alert_is_annotated_and_in_the_runbook(name: str) -> None:
    rule = alerts()[name]
    seconds(rule["for"])
    assert rule["labels"]["severity"] in ("critical", "warning")
    annotations = rule["annotations"]
    assert set(annotations) >= {"summary", "description", "runbook_url"}
    assert annotations["summary"].strip() and annotations["description"].strip()
    assert ("{{ $value" in annotations["description"]) != (name in CONSTANT_VALUE)
    anchor = name.lower()
    assert annotations["runbook_url"] == RUNBOOK_URL + anchor
    assert anchor in runbook_anchors(), f"docs/runbook.md has no section #{anchor}"


@pytest.mark.parametrize(("name", "query"), sorted(SAME_AS_QUERY.items()))
def test_alert_computes_its_dashboard_panel(name: str, query: str) -> None:
    expr = " ".join(alerts()[name]["expr"].split())
    assert expr.startswith(BY_QUERY_KEY[query].expr + " >"), expr


# --- metric names and labels ---------------------------------------------------------------

_SELECTOR = re.compile(r"\b(sage_[a-z0-9_]+)(?:\{([^}]*)\})?")
_MATCHER = re.compile(r'\s*([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def instrument_of(series_name: str) -> tuple[Instrument, bool]:
    """The catalog instrument of an exposed series name, and whether it is a bucket series."""
    if series_name in BY_PROMETHEUS_NAME:
        instrument = BY_PROMETHEUS_NAME[series_name]
        assert instrument.kind is not Kind.HISTOGRAM, f"{series_name}: use _bucket/_sum/_count"
        return instrument, False
    for suffix in HISTOGRAM_SUFFIXES:
        base = series_name.removesuffix(suffix)
        if base != series_name and base in BY_PROMETHEUS_NAME:
            instrument = BY_PROMETHEUS_NAME[base]
            assert instrument.kind is Kind.HISTOGRAM, f"{series_name}: {base} is no histogram"
            return instrument, suffix == "_bucket"
    raise AssertionError(f"{series_name} is not an exposed name of the catalog")


def check_matchers(series_name: str, matchers: str, *, exact: bool) -> None:
    instrument, bucket = instrument_of(series_name)
    allowed = {label.key: (*label.values, OTHER) for label in instrument.labels}
    seen = {}
    position = 0
    while position < len(matchers.strip()):
        match = _MATCHER.match(matchers, position)
        assert match, f"cannot read the matchers of {series_name}{{{matchers}}}"
        key, op, value = match.groups()
        position = match.end()
        seen[key] = value
        if key in PROMETHEUS_LABELS or (key == "le" and bucket):
            continue
        assert key in allowed, f"{series_name} has no label {key!r}"
        if op in ("=", "!="):
            assert value in allowed[key], f"{series_name}: {key}={value!r} is never exposed"
    if exact:
        expected = set(allowed) | PROMETHEUS_LABELS | ({"le"} if bucket else set())
        assert set(seen) == expected, f"{series_name}{{{matchers}}}: labels {sorted(expected)}"


@pytest.mark.parametrize("name", ALERT_NAMES)
def test_alert_uses_only_catalog_metrics_and_labels(name: str) -> None:
    for series_name, matchers in _SELECTOR.findall(alerts()[name]["expr"]):
        check_matchers(series_name, matchers, exact=False)


def test_unit_test_series_carry_the_exposed_names_and_label_sets() -> None:
    checked = 0
    for case in load_yaml(RULE_TESTS)["tests"]:
        for series in case.get("input_series") or []:
            match = re.fullmatch(r"(\w+)(?:\{(.*)\})?", series["series"])
            assert match, series["series"]
            if match.group(1).startswith("sage_"):
                check_matchers(match.group(1), match.group(2) or "", exact=True)
                checked += 1
    assert checked


# --- the unit tests cover every alert ------------------------------------------------------


def expanded_length(values: str) -> int:
    """How many samples a promtool ``values`` string holds."""
    count = 0
    for token in values.split():
        repeat = re.fullmatch(r"(?:[-+]?[\d.e]+|_|stale)(?:[-+][\d.e]+)?x(\d+)", token)
        count += int(repeat.group(1)) + 1 if repeat else 1
    return count


def cases() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for case in load_yaml(RULE_TESTS)["tests"]:
        for check in case.get("alert_rule_test") or []:
            yield case, check


def test_unit_tests_name_only_existing_alerts() -> None:
    """promtool passes `exp_alerts: []` for an alert name that does not exist."""
    named = {check["alertname"] for _case, check in cases()}
    assert named <= set(ALERT_NAMES), sorted(named - set(ALERT_NAMES))


@pytest.mark.parametrize("name", ALERT_NAMES)
def test_alert_has_a_firing_and_a_silent_test_case(name: str) -> None:
    rule = alerts()[name]
    firing, silent = [], []
    for case, check in cases():
        if check["alertname"] != name:
            continue
        if check.get("exp_alerts"):
            firing.append(check)
        else:
            silent.append((case, check))
    assert firing, f"no test case makes {name} fire"
    for check in firing:
        for expected in check["exp_alerts"]:
            assert expected["exp_labels"]["severity"] == rule["labels"]["severity"]
            assert expected["exp_annotations"]["summary"] == rule["annotations"]["summary"]
        assert seconds(check["eval_time"]) >= seconds(rule["for"])
    # Silent where it counts: after `for` plus a 5m window, with the series still running.
    meaningful = [
        check
        for case, check in silent
        if seconds(check["eval_time"]) > seconds(rule["for"]) + 300
        and all(
            (expanded_length(series["values"]) - 1) * seconds(case.get("interval", "1m"))
            >= seconds(check["eval_time"])
            for series in case["input_series"]
        )
    ]
    assert meaningful, f"no test case keeps {name} silent on healthy series past its `for`"
