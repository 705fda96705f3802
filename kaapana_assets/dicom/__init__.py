"""The DICOM data model the platform relies on: UIDs, the header columns of `instances`,
and the segments of a DICOM SEG. Below the lake, the archive and ingest."""
