"""The OS under both ends: sockets and descriptor passing, event channels, TAP devices, ivshmem,
VFIO, doorbells and the control socket. Imports only shared.faults and shared.text."""
