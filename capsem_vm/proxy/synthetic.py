"""Per-VM synthetic addresses: allowed names get an IPv4 from a private pool so the guest never
learns (or can probe) real addresses; an egress stream to that address maps back to the name.

Bounded: at most `capacity` names; the least recently used name gives its address back.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict

DEFAULT_NETWORK = "198.18.0.0/15"  # RFC 2544 benchmarking range: never routed on the internet


class SyntheticPool:
    def __init__(self, network: str = DEFAULT_NETWORK, capacity: int = 65536):
        self.network = ipaddress.IPv4Network(network)
        # skip the network and broadcast addresses
        self.capacity = max(1, min(capacity, self.network.num_addresses - 2))
        self._by_name: OrderedDict[str, int] = OrderedDict()
        self._by_ip: dict[int, str] = {}
        self._next = 1

    def address_for(self, name: str) -> str:
        """The synthetic address of `name` (normalized), allocating one if needed."""
        idx = self._by_name.get(name)
        if idx is not None:
            self._by_name.move_to_end(name)
        else:
            if len(self._by_name) >= self.capacity:
                _, idx = self._by_name.popitem(last=False)
                del self._by_ip[idx]
            else:
                idx = self._next
                self._next += 1
            self._by_name[name] = idx
            self._by_ip[idx] = name
        return str(self.network.network_address + idx)

    def contains(self, ip: str) -> bool:
        try:
            return ipaddress.IPv4Address(ip) in self.network
        except ValueError:
            return False

    def name_for(self, ip: str) -> str | None:
        """The name `ip` was handed out for, or None (never handed out, or evicted)."""
        try:
            addr = ipaddress.IPv4Address(ip)
        except ValueError:
            return None
        if addr not in self.network:
            return None
        name = self._by_ip.get(int(addr) - int(self.network.network_address))
        if name is not None:
            self._by_name.move_to_end(name)
        return name

    def __len__(self) -> int:
        return len(self._by_name)
