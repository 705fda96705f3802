"""Segmentation evaluation against reference annotations: SimpleITK metrics, the
`evaluations` table, summary, box plot and the promotion gate. Plain modules;
`assets.py` is the only Dagster part."""
