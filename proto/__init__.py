"""The polyarch wire contract: generated gRPC code and the helpers that belong to it."""
