"""The training site the benchmarks and the test suite build alike: annotated synthetic
studies on the grid that tiny nnU-Net trainings use, and the liver-train cohort over them.
Here, not in tests/, because bench/ imports nothing from the test suite (as with orthanc.py,
the suite imports from bench/)."""

TRAIN_GRID = {"slices": 16, "matrix": 48}

# As a site's cohorts folder holds it (cohorts/liver-train.yaml).
TRAIN_COHORT = """name: liver-train
purpose: train
required_labels: [liver]
filter:
  modality: CT
  has_reference_segmentation: true
harmonization:
  min_size: 4
"""
