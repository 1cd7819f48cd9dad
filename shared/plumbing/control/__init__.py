"""The control socket every end serves and `pvnet`, the lab and the tests ask: the wire format
(protocol), the server (server; in a guest: port) and the client (client)."""
