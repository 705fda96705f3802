"""nnU-Net inference on studies → DICOM SEG, per-label statistics, previews."""
