"""Netback TX, one concern: requests read and checked off the ring (requests), the packet built
(path: the ring pass; pull: its headers), rate limit (credit), filter, the TX mechanisms (modes/),
slots answered when the packet is freed (release). The one-TX-packet path is README "Start here"."""
