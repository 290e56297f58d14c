"""The registry side: the OCI distribution client, credentials and index assembly."""
