"""nnU-Net training from a cohort: dataset export, plan/preprocess, training, packaging."""
