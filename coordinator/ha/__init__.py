"""High availability: electing one active coordinator through PostgreSQL."""
