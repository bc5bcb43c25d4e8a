"""isic_utils: the thin package the report's notebooks call; docs/layout.md lists its modules, bottom to top."""
