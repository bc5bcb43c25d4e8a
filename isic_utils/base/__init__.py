"""The bottom layer: files (atomic writes, locks, progress, the project's folders) and devices."""
