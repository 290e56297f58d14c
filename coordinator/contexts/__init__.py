"""Build contexts: content-addressed storage, upload bounds and garbage collection."""
