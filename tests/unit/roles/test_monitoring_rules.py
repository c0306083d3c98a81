"""The monitoring role's Prometheus rules and Grafana dashboard, checked without a fleet.

The rules are a template (roles/monitoring/templates/pi_agent.rules.yml.j2) whose Ansible variables
are written ``[% x %]`` (Prometheus's own ``{{ $labels.x }}`` stays as it is); these tests render it
with the role's defaults as the role's template task does, then run Debian's ``promtool`` on it:
``check rules`` and ``test rules`` with the cases in roles/monitoring/files/tests/.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
ROLE = ROOT / "roles" / "monitoring"
TEMPLATE = ROLE / "templates" / "pi_agent.rules.yml.j2"
CASES = ROLE / "files" / "tests"
DASHBOARD = ROLE / "files" / "grafana" / "pi-fleet.json"
METRICS_PY = ROOT / "pi_agent" / "metrics.py"
RULES_NAME = "pi_agent.rules.yml"  # the name the test files' rule_files give

# Series that Prometheus itself makes for every scrape target.
PROMETHEUS_SERIES = {"up"}
# PromQL words that read like metric names: operators, modifiers, and the label lists after them.
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NUMBER = re.compile(r"\b\d[\w.]*")  # 0.75, 1e3, 5m (the e, the m are not names)
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def promtool() -> str:
    """The promtool on PATH; a missing one fails the test (it comes from Debian's prometheus)."""
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool is missing: `make apt` installs Debian's prometheus package, which has it"
        )
    return found


def role_defaults() -> dict[str, Any]:
    """The role's defaults/main.yml, as the template sees them when nothing overrides them."""
    return yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())


def render_rules(dest: Path, **overrides: Any) -> Path:
    """Render the rules template into ``dest`` (a folder) as the role's template task does."""
    env = jinja2.Environment(
        variable_start_string="[%",
        variable_end_string="%]",
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    text = env.from_string(TEMPLATE.read_text()).render(role_defaults() | overrides)
    out = dest / RULES_NAME
    out.write_text(text)
    return out


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, check=False)


def rule_test_files(dest: Path) -> list[Path]:
    """The promtool test cases, copied beside a rendered rules file in ``dest``."""
    files = sorted(CASES.glob("*.test.yml"))
    assert files, f"no promtool test cases in {CASES}"
    return [Path(shutil.copy(case, dest)) for case in files]


def alerts_of(rules: dict[str, Any]) -> list[str]:
    return [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]


def records_of(rules: dict[str, Any]) -> list[str]:
    return [r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r]


def exported_metrics() -> set[str]:
    """Every ``pi_agent_*`` name written in pi_agent/metrics.py.

    The names are string literals: the first argument of ``gauge(``, ``counter(`` and
    ``Family(`` calls, or rows of the tables (``MEMINFO_METRICS``, ``ZRAM_METRICS``) that feed
    them. Taking every such literal reads both without knowing the collectors' code; llama-server's
    relabelled ``pi_agent_llamacpp_*`` families are built at run time and are not in the set.
    """
    tree = ast.parse(METRICS_PY.read_text())
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and re.fullmatch(r"pi_agent_[a-z0-9_]+", node.value)
    }


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (simple: enough for the rules and panels here).

    Drops quoted strings, label matchers ``{...}``, ranges ``[...]``, Grafana's ``$variables``,
    label lists after by/without/on/ignoring/group_*, numbers and durations, then keeps the
    identifiers that are not a function call or a keyword.
    """
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\$\{?\w+\}?", "", expr)
    expr = _LABEL_LIST.sub("", expr)
    expr = _NUMBER.sub("", expr)
    names = set()
    for match in _IDENT.finditer(expr):
        rest = expr[match.end() :].lstrip()
        if rest.startswith("(") or match.group() in PROMQL_WORDS:
            continue
        names.add(match.group())
    return names


def panel_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, rows' nested panels included."""
    out = []
    panels = list(dashboard.get("panels", []))
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels", []))
        out.extend(
            (panel.get("title", "?"), t["expr"]) for t in panel.get("targets", []) if "expr" in t
        )
    return out


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render_rules(tmp_path_factory.mktemp("rules"))


@pytest.fixture(scope="module")
def rules(rendered: Path) -> dict[str, Any]:
    return yaml.safe_load(rendered.read_text())


def test_promtool_accepts_the_rendered_rules(rendered: Path) -> None:
    done = run_promtool("check", "rules", str(rendered))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_promtool_unit_tests_pass(rendered: Path) -> None:
    cases = rule_test_files(rendered.parent)
    done = run_promtool("test", "rules", *map(str, cases))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_promtool_unit_tests_fail_when_a_threshold_moves(tmp_path: Path) -> None:
    # A temperature floor above every test sample: the "fires" cases must now fail.
    render_rules(tmp_path, monitoring_alert_temperature_celsius=200)
    done = run_promtool("test", "rules", *map(str, rule_test_files(tmp_path)))
    assert done.returncode != 0
    assert "PiAgentTemperatureHigh" in done.stdout + done.stderr


def test_every_alert_has_a_case_that_expects_it_firing(rules: dict[str, Any]) -> None:
    firing = set()
    for case in sorted(CASES.glob("*.test.yml")):
        for test in yaml.safe_load(case.read_text())["tests"]:
            for check in test.get("alert_rule_test", []):
                if check.get("exp_alerts"):
                    firing.add(check["alertname"])
    missing = set(alerts_of(rules)) - firing
    assert not missing, (
        f"alerts without a promtool case that expects them firing: {sorted(missing)}"
    )


def test_every_alert_has_a_severity_and_names_the_instance(rules: dict[str, Any]) -> None:
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
            for key in ("summary", "description"):
                assert "$labels.instance" in rule["annotations"][key], (rule["alert"], key)


def test_the_rules_read_only_metrics_the_agent_exports(rules: dict[str, Any]) -> None:
    known = exported_metrics() | set(records_of(rules)) | PROMETHEUS_SERIES
    unknown = {
        name: rule.get("alert") or rule.get("record")
        for group in rules["groups"]
        for rule in group["rules"]
        for name in metric_names(rule["expr"])
        if name not in known
    }
    assert not unknown, f"not exported by pi_agent/metrics.py nor recorded: {unknown}"


def test_the_dashboard_is_importable_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    inputs = dashboard["__inputs"]
    assert [(i["type"], i["pluginId"]) for i in inputs] == [("datasource", "prometheus")]
    assert dashboard["title"] and dashboard["uid"]
    assert panel_exprs(dashboard)


def test_the_dashboard_queries_only_exported_or_recorded_metrics(rules: dict[str, Any]) -> None:
    known = exported_metrics() | set(records_of(rules)) | PROMETHEUS_SERIES
    dashboard = json.loads(DASHBOARD.read_text())
    unknown = {
        (title, name)
        for title, expr in panel_exprs(dashboard)
        for name in metric_names(expr)
        if name not in known
    }
    assert not unknown, f"panels query metrics nobody exports: {sorted(unknown)}"


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('up{job="pi_agent"} == 0', {"up"}),
        (
            "increase(pi_agent_llama_server_restarts_total[15m]) > 0",
            {"pi_agent_llama_server_restarts_total"},
        ),
        (
            'a_x == 0 unless on (job, instance) b_y{state="stopped"} == 1',
            {"a_x", "b_y"},
        ),
        ('sum by (instance) (rate(c_total{instance=~"$instance"}[$__rate_interval]))', {"c_total"}),
        ("x_ratio < 0.75", {"x_ratio"}),
        ("pi_agent:zram_used:ratio > 1e-3", {"pi_agent:zram_used:ratio"}),
        ("rate(x_total[5m] offset 1h) > 0", {"x_total"}),
    ],
    ids=[
        "a comparison",
        "a range",
        "a join",
        "an aggregation",
        "a float",
        "an exponent",
        "an offset",
    ],
)
def test_metric_names_finds_the_series_of_an_expression(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names
