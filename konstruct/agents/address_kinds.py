"""The kinds of non-public address a tenant's tools may be allowed to reach.

Apart from `konstruct.agents.tools.addresses` (which checks them) so that the
settings can name them without loading the tools and their HTTP client: every
command reads the settings, `konstruct status` among them.
"""

from __future__ import annotations

from typing import Literal

AddressKind = Literal["loopback", "private", "link_local", "reserved"]
ADDRESS_KINDS: tuple[AddressKind, ...] = ("loopback", "private", "link_local", "reserved")
