"""The DICOM archive and its index: where instances are put (layout) and how they become rows
in the lake (service). Every write path — ingest, segmentation's SEGs — stores through it."""
