"""Netback RX: frames from the vif copied into the buffers the frontend posted (path), by an RX
mechanism (modes/)."""
