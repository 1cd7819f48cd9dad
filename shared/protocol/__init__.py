"""The protocol both ends speak: netif's wire formats, the shared ring, the region's layout, grants,
header slots, offloads, the xenbus handshake's states and negotiation, counters and the mechanism
registry. Of shared it imports only shared.faults and shared.text: protocol and plumbing are
independent (pyproject.toml, `shared-layers`)."""
