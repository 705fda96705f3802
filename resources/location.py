"""The code location's environment, read once per process, and what follows from it at
import time.

The GPU steps' Kubernetes op tags are arguments of the asset and job decorators: they are
fixed when the asset modules import, before definitions.py runs its body. So the read is
here, in the module those asset modules import, and definitions.py builds the resources
from the same `ENVIRONMENT`. Nothing below reads the environment again."""

from kaapana_assets.environment import Environment
from kaapana_assets.training.k8s import gpu_op_tags

ENVIRONMENT = Environment.read()
GPU_OP_TAGS = gpu_op_tags(ENVIRONMENT)
