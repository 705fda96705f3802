"""The nnU-Net v2 adapter: nnU-Net through its Python APIs, in-process (a process start costs
6–7 s of imports), for training, segmentation, federated training and evaluation.

  paths     the folders of one nnU-Net root, and the one place nnU-Net's environment is set
  dataset   the raw dataset convention: ids, names, cases, patient splits
  plan      fingerprint, plan and preprocess; plans at another network width
  device    the devices (cpu, cuda, auto) and their torch device
  trainer   schedules, our trainer (with FedProx's proximal term), initial weights
  package   predictor-ready model folders
  prediction  loading a predictor, predicting a volume
  metrics   Dice, and a predictor's mean Dice on raw cases
  registry  the model registry's one lookup (imported on its own: not re-exported here)

Two traps shape it (see shared FIELD_NOTES):
- On CPU-only torch, nnU-Net's lookup of a trainer class *by name* walks into modules that
  import torchvision and crash. So our trainer is instantiated directly, and packaged
  checkpoints say `trainer_name='nnUNetTrainer'` so predictors never look ours up.
- Tiny budgets need AdamW (SGD at lr 1e-2 leaves the organ at Dice 0 after 40 iterations).

torch and nnunetv2 are imported inside the functions that need them: importing this package
(as the code location does) loads neither."""

from kaapana_assets.nnunet.dataset import (
    Case,
    TooFewPatients,
    dataset_id_for,
    dataset_name,
    patient_split,
    require_patients,
    write_raw_dataset,
)
from kaapana_assets.nnunet.device import Device, device_for
from kaapana_assets.nnunet.metrics import dice, evaluate
from kaapana_assets.nnunet.package import model_folder_from_weights, package_model
from kaapana_assets.nnunet.paths import CONFIGURATION, FOLD, PLANS, NnunetPaths, nnunet_environment
from kaapana_assets.nnunet.plan import plan_and_preprocess, with_width
from kaapana_assets.nnunet.prediction import load_predictor, predict
from kaapana_assets.nnunet.trainer import (
    EpochCallback,
    Schedule,
    SchedulePreset,
    TrainingResult,
    initial_network_weights,
    seed_generators,
    train,
)

__all__ = [
    "CONFIGURATION", "FOLD", "PLANS", "Case", "Device", "EpochCallback", "NnunetPaths", "Schedule", "SchedulePreset",
    "TooFewPatients", "TrainingResult", "dataset_id_for", "dataset_name", "device_for", "dice", "evaluate",
    "initial_network_weights", "load_predictor", "model_folder_from_weights", "nnunet_environment", "package_model",
    "patient_split", "plan_and_preprocess", "predict", "require_patients", "seed_generators", "train", "with_width",
    "write_raw_dataset",
]
