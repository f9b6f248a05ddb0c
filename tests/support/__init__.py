"""Helpers shared by the test modules (real loopback servers, no network)."""
