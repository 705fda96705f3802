"""Algorithms as extensions: an asset that runs an external program through Dagster
Pipes (locally a subprocess, on Kubernetes a pod from an image), the way Kaapana adds
algorithms as container extensions. `study_metrics` is the worked example."""
