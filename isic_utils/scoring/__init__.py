"""Scores of masks: confusion counts and metrics at model and original size; confidence and calibration."""
