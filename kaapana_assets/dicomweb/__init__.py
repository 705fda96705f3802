"""A DICOMweb service (PS3.18) over the archive and its Delta index, and the OHIF viewer on it.

QIDO-RS answers from the index, WADO-RS streams from the archive, STOW-RS stores through the
C-STORE receiver's intake. `create_app` composes them into one ASGI app."""
