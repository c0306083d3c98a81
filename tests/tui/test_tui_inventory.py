"""The inventory through ansible's own parser: groups, hosts, agent URLs, and broken files."""

from __future__ import annotations

from pathlib import Path

import pytest

from tui.inventory import InventoryError, load_inventory


def test_groups_and_hosts_come_from_ansible(fixtures: Path) -> None:
    fleet = load_inventory([fixtures / "fleet.yml"])
    assert fleet.groups == {"pi5": ["pi-a", "pi-b"], "pi4": ["pi-c"]}
    assert list(fleet.hosts) == ["pi-a", "pi-b", "pi-c"]
    assert fleet.hosts["pi-c"].groups == ("pi4",)
    assert fleet.hosts["pi-a"].agent_url == "https://127.0.0.1:1"


def test_agent_url_defaults_and_overrides(tmp_path: Path) -> None:
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        "all:\n  children:\n    pis:\n      children:\n        pi5:\n          hosts:\n"
        "            plain:\n            addressed: {ansible_host: 10.0.0.7}\n"
        "            explicit: {pi_agent_url: 'https://pi.example:9000/'}\n"
        "            cleartext: {ansible_host: 10.0.0.8, pi_agent_tls: false}\n"
        "  hosts:\n    loose:\n"
    )
    fleet = load_inventory([inventory])
    assert fleet.groups["pis"] == ["plain", "addressed", "explicit", "cleartext"]  # flattened
    assert fleet.groups["ungrouped"] == ["loose"]
    assert fleet.hosts["plain"].agent_url == "https://plain:8470"
    assert fleet.hosts["addressed"].agent_url == "https://10.0.0.7:8470"
    assert fleet.hosts["explicit"].agent_url == "https://pi.example:9000"
    # the plain-HTTP opt-out of the pi_agent role
    assert fleet.hosts["cleartext"].agent_url == "http://10.0.0.8:8470"


def test_a_broken_file_is_one_error_that_names_it(broken: Path) -> None:
    with pytest.raises(InventoryError) as err:
        load_inventory([broken])
    assert "broken.yml" in str(err.value)
    assert "YAML parsing failed" in str(err.value)
    assert "Failed to parse inventory" in err.value.detail


def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match=r"inventory not found: .*nowhere\.yml"):
        load_inventory([tmp_path / "nowhere.yml"])


def test_no_inventory_at_all_is_an_error() -> None:
    with pytest.raises(InventoryError, match="--inventory"):
        load_inventory([])
