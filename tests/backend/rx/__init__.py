"""Tests of netback RX (backend/rx/)."""
