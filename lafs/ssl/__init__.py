"""LAFS self-supervised pretraining: DINO on landmark-centred views.

>>> views = MultiViewBuilder(landmark_cnn)              # frozen stage-1 landmark CNN
>>> trainer = DINOTrainer(student_backbone, teacher_backbone, views, DINOSettings(epochs, iters_per_epoch, batch_size))
>>> stats = trainer.train_step(images, global_step, epoch)

Pieces: ``DINOHead`` (head.py), ``DINOLoss`` (loss.py), ``cosine_schedule`` /
``teacher_temp_schedule`` (schedules.py), ``ema_update`` (ema.py), weight-decay groups,
per-parameter clipping and the last-layer freeze (optim.py), batched crop and colour
augmentation (augment.py), the builder's frozen landmark CNN with batch norms folded
(frozen.py), a view's crop as the gather's affine (geometry.py), colour on tokens
(token_colour.py), ``MultiViewBuilder`` (views.py), ``MultiCropModel``
(multicrop.py), ``DINOTrainer`` (step.py), original LAFS checkpoints (official.py).
"""

from .ema import ema_update
from .head import DINOHead, WeightNormLinear
from .loss import DINOLoss
from .multicrop import MultiCropModel
from .official import OfficialDINOLoad, load_official_pretraining, official_head_state
from .optim import cancel_last_layer_gradients, clip_gradients_per_parameter, param_groups_for_weight_decay
from .schedules import cosine_schedule, teacher_temp_schedule
from .step import DINOSettings, DINOTrainer
from .views import MultiViewBuilder, ViewGroup

__all__ = [
    "DINOHead",
    "DINOLoss",
    "DINOSettings",
    "DINOTrainer",
    "MultiCropModel",
    "MultiViewBuilder",
    "OfficialDINOLoad",
    "ViewGroup",
    "WeightNormLinear",
    "cancel_last_layer_gradients",
    "clip_gradients_per_parameter",
    "cosine_schedule",
    "ema_update",
    "load_official_pretraining",
    "official_head_state",
    "param_groups_for_weight_decay",
    "teacher_temp_schedule",
]
