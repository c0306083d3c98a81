"""The fleet screen: inventory groups and hosts, each host's agent polled in the background.

The inventory is read by ansible (``tui.inventory``) in a worker thread; a broken file opens the
error screen and leaves the screen empty but alive. Agents are polled every ``--refresh``
seconds by a thread pool; a host whose agent does not answer shows why in its row. Selected
hosts (space, or enter on a group) become the run screen's ``--limit`` (``l``). With a host in
the inventory's ``gateway`` group, each poll also reads every board's state at the gateway
(``tui.gateway``: UP, DOWN, DRAIN, MAINT) into the Gateway column.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static, Tree

from tui.agent import AgentClient, AgentError, AgentStatus
from tui.gateway import find_gateway
from tui.inventory import Fleet, InventoryError, load_inventory
from tui.messages import AgentPolled, HostUpdate

if TYPE_CHECKING:
    from tui.app import FleetApp

COLUMNS = (
    ("", "selected"),
    ("Host", "host"),
    ("Groups", "groups"),
    ("Ready", "ready"),
    ("Model", "model"),
    ("Version", "version"),
    ("tg tok/s", "tg"),
    ("Temp", "temp"),
    ("Throttling", "throttling"),
    ("zram", "zram"),
    ("Agent", "agent"),
    ("Gateway", "gateway"),
)
GATEWAY_STYLES = {"UP": "green", "DRAIN": "yellow", "MAINT": "yellow", "DOWN": "bold red"}


def gateway_cell(states: dict[str, str] | None, host: str, error: str = "") -> Text:
    """A host's state at the fleet's gateway: HAProxy's word for it, "-" where there is no
    gateway or the host is not behind it, "?" when the gateway did not say."""
    if error:
        return Text("?", style="red")
    if states is None or host not in states:
        return Text("-", style="dim")
    state = states[host]
    return Text(state, style=GATEWAY_STYLES.get(state.split()[0], ""))


def _ready(status: AgentStatus | None, error: str) -> Text:
    if error:
        return Text("down", style="bold red")
    if status is None:
        return Text("…", style="dim")
    return {
        True: Text("ready", style="green"),
        False: Text("not ready", style="yellow"),
        None: Text("?", style="dim"),
    }[status.ready]


def host_cells(status: AgentStatus | None, error: str, gateway: Text) -> dict[str, Any]:
    """The agent columns of a host's row, and its state at the gateway (``gateway_cell``)."""
    if status is None:
        dash = Text("-", style="dim")
        return {
            "ready": _ready(None, error),
            "model": dash,
            "version": dash,
            "tg": dash,
            "temp": dash,
            "throttling": dash,
            "zram": dash,
            "agent": Text(error or "polling", style="red" if error else "dim"),
            "gateway": gateway,
        }
    temp = status.temperature_c
    throttling = status.throttling
    return {
        "ready": _ready(status, error),
        "model": status.model_name or "-",
        "version": status.model_version or "-",
        "tg": f"{status.tg_tok_s:.1f}" if status.tg_tok_s is not None else "-",
        "temp": Text(
            f"{temp:.0f}°C" if temp is not None else "-",
            style="bold red" if temp is not None and temp >= 80 else "",
        ),
        "throttling": Text(throttling, style="bold red" if status.throttled_now else ""),
        "zram": status.zram or "-",
        "agent": Text(error, style="red") if error else Text("ok", style="green"),
        "gateway": gateway,
    }


class FleetScreen(Screen[None]):
    """Groups on the left, hosts with their agents' status on the right."""

    AUTO_FOCUS = "#hosts"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("space", "toggle_host", "Select"),
        Binding("a", "select_all", "All/none"),
        Binding("l", "limit_run", "Run on selected"),
        Binding("ctrl+r", "refresh", "Poll agents"),
        Binding("i", "reload_inventory", "Reload inventory"),
    ]

    def __init__(self) -> None:
        super().__init__(id="fleet")
        self.fleet: Fleet | None = None
        self.selected: set[str] = set()
        self.statuses: dict[str, HostUpdate] = {}
        self.gateway: dict[str, str] | None = None
        self.gateway_error = ""
        self.polls = 0

    @property
    def fleet_app(self) -> FleetApp:
        """The app, typed."""
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="fleet-body"):
            yield Tree("inventory", id="groups")
            yield DataTable(id="hosts", cursor_type="row", zebra_stripes=True)
        yield Static("reading the inventory…", id="fleet-status", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#hosts", DataTable)
        for label, key in COLUMNS:
            table.add_column(label, key=key)
        self.load()
        settings = self.fleet_app.settings
        if settings.poll_agents and settings.refresh_s > 0:
            self.set_interval(settings.refresh_s, self.poll)

    # inventory

    @work(thread=True, exclusive=True, group="inventory")
    def load(self) -> None:
        """Read the inventory in a thread; the result comes back through ``call_from_thread``."""
        settings = self.fleet_app.settings
        try:
            fleet = load_inventory(list(settings.default_inventory()), cwd=settings.project_dir)
        except InventoryError as err:
            self.app.call_from_thread(self._inventory_failed, err)
            return
        self.app.call_from_thread(self._show_fleet, fleet)

    def _inventory_failed(self, err: InventoryError) -> None:
        self.fleet = None
        self._status(f"inventory: {err}")
        self.fleet_app.show_error("Cannot read the inventory", str(err), err.detail)

    def _show_fleet(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.selected &= set(fleet.hosts)  # a reload may have dropped some
        tree = self.query_one("#groups", Tree)
        tree.clear()
        tree.root.expand()
        for group, members in fleet.groups.items():
            node = tree.root.add(f"{group} ({len(members)})", data=group, expand=True)
            for host in members:
                node.add_leaf(host, data=host)
        table = self.query_one("#hosts", DataTable)
        table.clear()
        for name, host in fleet.hosts.items():
            update = self.statuses.get(name)
            cells = host_cells(update.status if update else None, update.error if update else "",
                               gateway_cell(self.gateway, name, self.gateway_error))  # fmt: skip
            table.add_row(
                self._mark(name),
                name,
                ", ".join(host.groups),
                *[cells[key] for _, key in COLUMNS[3:]],
                key=name,
            )
        sources = ", ".join(p.name for p in fleet.sources)
        self._status(f"{len(fleet.hosts)} hosts in {len(fleet.groups)} groups from {sources}")
        if self.fleet_app.settings.poll_agents:
            self.poll()

    # agents

    def poll(self) -> None:
        """Poll every host's agent (in a worker thread)."""
        if self.fleet is not None and self.fleet.hosts:
            self._poll(self.fleet)

    @work(thread=True, exclusive=True, group="poll")
    def _poll(self, fleet: Fleet) -> None:
        tokens = self.fleet_app.settings.tokens
        ca_file = self.fleet_app.settings.agent_ca()

        def ask(name: str) -> HostUpdate:
            try:
                token = tokens.for_host(name)
                status = AgentClient(fleet.hosts[name].agent_url, token, ca_file=ca_file).fetch()
            except AgentError as err:
                return HostUpdate(name, None, str(err))
            return HostUpdate(name, status)

        def ask_gateway() -> tuple[dict[str, str] | None, str]:
            gateway = find_gateway(fleet, self.fleet_app.settings.project_dir, ca_file)
            if gateway is None:
                return None, ""
            try:
                return gateway.states(), ""
            except AgentError as err:
                return None, f"{gateway.host}: {err}"

        with ThreadPoolExecutor(max_workers=min(8, len(fleet.hosts) + 1)) as pool:
            at_gateway = pool.submit(ask_gateway)
            updates = list(pool.map(ask, fleet.hosts))
            states, gateway_error = at_gateway.result()
        self.post_message(AgentPolled(updates, states, gateway_error))

    def on_agent_polled(self, message: AgentPolled) -> None:
        table = self.query_one("#hosts", DataTable)
        rows = {str(key.value) for key in table.rows}
        self.gateway, self.gateway_error = message.gateway, message.gateway_error
        for update in message.updates:
            self.statuses[update.host] = update
            if update.host not in rows:
                continue
            at_gateway = gateway_cell(self.gateway, update.host, self.gateway_error)
            cells = host_cells(update.status, update.error, at_gateway)
            for key, value in cells.items():
                table.update_cell(update.host, key, value)
        self.polls += 1
        down = sum(1 for u in message.updates if u.error)
        text = (
            f"{len(message.updates)} agents polled: {len(message.updates) - down} up, "
            f"{down} down (poll {self.polls}, every {self.fleet_app.settings.refresh_s:g}s)"
        )
        if self.gateway is not None:
            behind = sum(1 for state in self.gateway.values() if state == "UP")
            text += f"; gateway: {behind} of {len(self.gateway)} boards UP"
        elif self.gateway_error:
            text += f"; gateway: {self.gateway_error}"
        self._status(text)

    # selection

    def _mark(self, host: str) -> Text:
        return Text("●", style="bold green") if host in self.selected else Text("○", style="dim")

    def _set_selected(self, hosts: set[str]) -> None:
        table = self.query_one("#hosts", DataTable)
        changed = self.selected ^ hosts
        self.selected = hosts
        for host in changed:
            table.update_cell(host, "selected", self._mark(host))
        self.sub_title = f"{len(hosts)} selected" if hosts else ""

    def action_toggle_host(self) -> None:
        table = self.query_one("#hosts", DataTable)
        if self.fleet is None or table.row_count == 0:
            return
        host = str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        self._set_selected(self.selected ^ {host})

    def action_select_all(self) -> None:
        if self.fleet is None:
            return
        everyone = set(self.fleet.hosts)
        self._set_selected(set() if self.selected == everyone else everyone)

    def on_tree_node_selected(self, event: Tree.NodeSelected[str]) -> None:
        """Enter on a group toggles all its hosts; on a host, that host."""
        if self.fleet is None or event.node.data is None:
            return
        name = event.node.data
        hosts = set(self.fleet.groups.get(name, [name] if name in self.fleet.hosts else []))
        if not hosts:
            return
        self._set_selected(
            self.selected - hosts if hosts <= self.selected else self.selected | hosts
        )

    def action_limit_run(self) -> None:
        if not self.selected:
            self.notify("select hosts first (space, or enter on a group)", severity="warning")
            return
        order = list(self.fleet.hosts) if self.fleet else sorted(self.selected)
        self.fleet_app.open_run(limit=",".join(h for h in order if h in self.selected))

    def action_refresh(self) -> None:
        self.poll()

    def action_reload_inventory(self) -> None:
        self.load()

    def _status(self, text: str) -> None:
        self.query_one("#fleet-status", Static).update(text)
