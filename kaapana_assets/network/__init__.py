"""DICOM networking: a C-STORE receiver feeding the spool, a C-STORE sender for results,
and DICOMweb (QIDO-RS/WADO-RS) retrieval from an external PACS."""
