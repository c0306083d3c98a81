"""molecule's podman connection with pipelining: one ``podman exec -i`` per task, not four.

The collection's plugin (containers.podman.podman) runs ``podman exec`` without ``-i``, so a
module cannot arrive on stdin and pipelining stays off: every task pays for a temp folder, a
copy, a chmod, the run and a cleanup, about 0.3 s of podman each. The stand-ins are systemd
containers run as root, where passing the module on stdin works as over ssh.
"""

from __future__ import annotations

import shlex

from ansible.module_utils.common.text.converters import to_native
from ansible.plugins.connection import ensure_connect
from ansible_collections.containers.podman.plugins.connection.podman import (
    DOCUMENTATION as _PODMAN_DOCUMENTATION,
)
from ansible_collections.containers.podman.plugins.connection.podman import (
    Connection as PodmanConnection,
)

DOCUMENTATION = _PODMAN_DOCUMENTATION.replace("name: podman", "name: podman_pipelined", 1).replace(
    "short_description: Interact with an existing podman container",
    "short_description: The podman connection with pipelining (podman exec -i)",
    1,
)


class Connection(PodmanConnection):
    """``containers.podman.podman`` whose module runs read the module from stdin."""

    transport = "podman_pipelined"
    has_pipelining = True

    @ensure_connect
    def exec_command(
        self, cmd: str, in_data: bytes | None = None, sudoable: bool = False
    ) -> tuple[int, bytes, bytes]:
        """Run ``cmd`` in the container; with ``in_data``, attach stdin (``-i``) to pass it."""
        if in_data is None:
            return super().exec_command(cmd, in_data=None, sudoable=sudoable)
        # The parent's ConnectionBase bookkeeping, then our own exec with -i.
        super(PodmanConnection, self).exec_command(cmd, in_data=in_data, sudoable=sudoable)
        args = ["exec", "-i"] + (["--user", self.user] if self.user else [])
        argv = shlex.split(to_native(cmd, errors="surrogate_or_strict"))
        return self._podman(args, argv, in_data)
