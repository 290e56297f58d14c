"""The polyarch client: the CLI, context packing and the gRPC client."""
