"""DICOM → archive + Delta index. Plain modules; `assets.py` is the only Dagster part."""
