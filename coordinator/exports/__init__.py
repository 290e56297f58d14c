"""Exports of finished builds: OCI layouts, Docker archives and root filesystems."""
