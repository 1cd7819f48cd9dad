"""Netfront RX: the ring kept stocked with granted pages and received frames written to the TAP
(queue; stock order, batched: stock)."""
