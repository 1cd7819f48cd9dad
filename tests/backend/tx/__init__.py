"""Tests of netback TX (backend/tx/)."""
