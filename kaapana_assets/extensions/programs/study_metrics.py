"""An external per-study processor, run through Dagster Pipes.

It knows nothing of kaapana_assets: it gets the study's DICOM file paths as Pipes
extras, reads them with pydicom, and reports metrics back as the asset's metadata.
Any program in any image can do the same with `dagster-pipes` (Python) or by speaking
the Pipes protocol. Run locally by PipesSubprocessClient, on Kubernetes by PipesK8sClient.
"""

from __future__ import annotations

import numpy as np
import pydicom
from dagster_pipes import open_dagster_pipes


def main() -> None:
    with open_dagster_pipes() as pipes:
        files = pipes.get_extra("files")
        study_uid = pipes.get_extra("study_uid")
        pipes.log.info(f"study {study_uid}: {len(files)} file(s)")
        modalities: dict[str, int] = {}
        thickness, values = [], []
        for index, path in enumerate(files):
            ds = pydicom.dcmread(path)
            modalities[ds.Modality] = modalities.get(ds.Modality, 0) + 1
            if ds.Modality == "CT" and "PixelData" in ds:
                hu = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(
                    ds.get("RescaleIntercept", 0))
                values.append(hu[::4, ::4].ravel())  # a sparse sample is enough for summary statistics
                thickness.append(float(ds.get("SliceThickness", 0) or 0))
            if index and index % 50 == 0:
                pipes.log.info(f"{index}/{len(files)} read")
        sample = np.concatenate(values) if values else np.zeros(1, np.float32)
        body = sample[sample > -500]  # above air: roughly the patient
        pipes.report_asset_materialization(
            metadata={
                "files": len(files),
                "modalities": {"raw_value": modalities, "type": "json"},
                "ct_slices": modalities.get("CT", 0),
                "slice_thickness_mm": float(np.median(thickness)) if thickness else 0.0,
                "hu_mean_body": float(body.mean()) if body.size else 0.0,
                "hu_p99": float(np.percentile(sample, 99)),
                "body_fraction": float(body.size / sample.size),
            },
            data_version=str(study_uid),
        )


if __name__ == "__main__":
    main()
