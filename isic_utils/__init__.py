"""isic_utils: the thin package the report's notebooks call; README.md's "Layout" lists its modules, bottom to top."""
