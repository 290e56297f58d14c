"""Shared test helpers: deadline polling and the real services integration tests run against."""
