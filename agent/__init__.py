"""The polyarch agent: keeps a stream to the coordinator and builds with a real builder."""
