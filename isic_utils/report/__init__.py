"""The report: figures, tables and the index's text, papermill orchestration, the zip to hand over."""
