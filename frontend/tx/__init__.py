"""Netfront TX: frames read from the guest's TAP into header slots and payload pages (queue,
pages), onto the ring, and flow control with slot release (flow)."""
