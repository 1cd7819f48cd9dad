"""What an end runs on top of the protocol (its connection's life, shutdown, queue workers) and
what `pvnet` reads from a running end (capture, the stats view). Below the CLI and the lab."""
