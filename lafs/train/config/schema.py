"""Every option of every stage, declared once: key, default, type, bounds and help.

A stage's schema is a list of :class:`Option`; ``SCHEMAS`` maps each stage to
its list. The checks of single values (:func:`check_value`) read these fields;
``lafs.train.config.resolve`` applies them to a recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .errors import ConfigError

STAGES = ("supervised", "pretrain", "finetune")


@dataclass(frozen=True)
class Option:
    key: str
    default: Any
    help: str
    kind: type = str  # int, float, bool, str, list or dict
    choices: Optional[tuple] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    nullable: bool = False
    # (alias, value) pairs: an alias (compared by identity, so True is not 1) stands for the value,
    # e.g. YAML 1.1 reads a bare ``off`` as False.
    aliases: tuple = ()


# Seeds reach torch.manual_seed as seed + rank, which takes at most 2**64 - 1; int64 keeps them clear of it.
MAX_SEED = 2**63 - 1


def _opt(key, default, help, kind=None, **kw) -> Option:
    if kind is None:
        kind = type(default) if default is not None else str
    return Option(key, default, help, kind, **kw)


COMMON = [
    _opt(
        "seed",
        0,
        "Seed of everything random: initialisation, data order, augmentation, dropout.",
        minimum=0,
        maximum=MAX_SEED,
    ),
    _opt(
        "data.source",
        "synthetic",
        "Training images: 'synthetic' (built-in SyntheticFaces, no files needed), "
        "'rec' (insightface train.rec/train.idx under data.root) or 'folder' (data.root/<identity>/<image>).",
        choices=("synthetic", "rec", "folder"),
    ),
    _opt(
        "data.root",
        None,
        "Folder of the .rec set or the image folder (not used for synthetic data).",
        str,
        nullable=True,
    ),
    _opt(
        "data.color",
        "rgb",
        "Channel order the .rec images were packed in: rgb (WebFace4M) or bgr (MS1MV3).",
        choices=("rgb", "bgr"),
    ),
    _opt("data.synthetic.identities", 64, "Training identities of the synthetic set.", minimum=2),
    _opt("data.synthetic.images_per_identity", 24, "Images per synthetic training identity.", minimum=1),
    _opt(
        "data.synthetic.difficulty",
        1.0,
        "Strength of the per-image nuisances (pose, lighting, blur, noise) of the "
        "synthetic set; 0 renders every image of an identity alike.",
        float,
        minimum=0.0,
    ),
    _opt(
        "data.synthetic.colours",
        "per_image",
        "Skin tone and hair colour of the synthetic faces: drawn for every "
        "image ('per_image': colour never identifies anybody) or once per identity ('per_identity', as real "
        "people keep theirs; small per-image variation). Backgrounds are per image in both.",
        choices=("per_image", "per_identity"),
    ),
    _opt(
        "data.synthetic.pose_difficulty",
        None,
        "Strength of the pose nuisances alone (in-plane rotation, scale, "
        "shift, yaw) of the synthetic set, training and held-out; null: data.synthetic.difficulty. A wide pose "
        "range with mild lighting, blur and noise gives the landmark CNN poses to follow.",
        float,
        nullable=True,
        minimum=0.0,
        maximum=3.0,
    ),
    _opt(
        "data.synthetic.difficulty_warmup_epochs",
        0.0,
        "Curriculum: the training images' nuisances ramp "
        "linearly from none to data.synthetic.difficulty over this many epochs (each image keeps its own random "
        "draw, scaled); held-out pairs always use the full difficulty. 0: full difficulty from the start.",
        float,
        minimum=0.0,
    ),
    _opt(
        "data.few_shot.images_per_identity",
        None,
        "Keep only this many images per identity (few-shot subset); null keeps all.",
        int,
        nullable=True,
        minimum=1,
    ),
    _opt(
        "data.few_shot.identity_fraction",
        1.0,
        "Fraction of identities kept in the few-shot subset.",
        float,
        minimum=0.0,
        maximum=1.0,
    ),
    _opt(
        "data.num_workers",
        0,
        "DataLoader worker processes per training process (0: load in the main process).",
        minimum=0,
    ),
    _opt(
        "val.every_steps",
        0,
        "Verify on held-out pairs every this many optimizer steps (0: only at the end).",
        minimum=0,
    ),
    _opt(
        "val.synthetic_identities",
        40,
        "Held-out synthetic identities (never trained on) for verification pairs.",
        minimum=2,
    ),
    _opt("val.synthetic_images_per_identity", 6, "Images per held-out synthetic identity.", minimum=2),
    _opt(
        "val.pairs", 600, "Verification pairs drawn from the held-out synthetic identities (half genuine).", minimum=20
    ),
    _opt(
        "val.bins",
        [],
        "Verification .bin files (lfw.bin, cfp_fp.bin, ...) to evaluate on instead of synthetic "
        "pairs; the best checkpoint follows the mean accuracy.",
        list,
    ),
    _opt(
        "val.landmark_faces",
        400,
        "Held-out synthetic faces (seed 777, identities from 5000) on which the end of a "
        "supervised or fine-tuning run measures the landmark tracking score (lafs.eval.landmark_tracking); 0 skips "
        "it. Synthetic data only.",
        minimum=0,
    ),
    _opt("val.batch_size", 128, "Images per forward pass during verification.", minimum=1),
    _opt(
        "model.name",
        "part_fvit_tiny",
        "Model preset of lafs.models.create_model (part_fvit_b is the paper's "
        "Part fViT-B; part_fvit_tiny runs on a CPU).",
    ),
    _opt("model.overrides", {}, "Preset fields to change, e.g. {depth: 4, drop_path: 0.1}.", dict),
    _opt(
        "optim.batch_size",
        64,
        "Images per process per forward pass (global batch = this x accum_steps x processes).",
        minimum=1,
    ),
    _opt("optim.accum_steps", 1, "Forward/backward passes accumulated per optimizer step.", minimum=1),
    _opt("optim.epochs", 10.0, "Passes over the training set (fractions allowed).", float, minimum=0.0),
    _opt("optim.warmup_epochs", 1.0, "Linear learning-rate warmup from 0, in epochs.", float, minimum=0.0),
    _opt(
        "optim.lr",
        1e-3,
        "Peak learning rate at the global batch size (pretrain: per 256 images, scaled by the "
        "global batch as DINO does).",
        float,
        minimum=0.0,
    ),
    _opt("optim.min_lr", 1e-6, "Learning rate at the end of the cosine decay.", float, minimum=0.0),
    _opt(
        "optim.weight_decay",
        0.05,
        "AdamW weight decay of weight matrices (none on biases, norms, tokens).",
        float,
        minimum=0.0,
    ),
    _opt("optim.landmark_weight_decay", 0.05, "AdamW weight decay of the landmark CNN's weights.", float, minimum=0.0),
    _opt(
        "optim.landmark_lr_scale",
        1.0,
        "Learning-rate multiplier of the landmark CNN (trunk and head); the original "
        "trains it at the transformer's lr (docs/EXPERIMENTS.md: 10 moves the demo's landmarks, but at random).",
        float,
        minimum=0.0,
    ),
    _opt(
        "optim.landmark_warmup_epochs",
        0.0,
        "Epochs during which the landmark CNN keeps its initial weights "
        "(lr 0) while the rest trains; its lr then ramps up over optim.warmup_epochs.",
        float,
        minimum=0.0,
    ),
    _opt(
        "optim.layer_decay",
        1.0,
        "Layer-wise learning-rate decay: block i of D gets lr x decay^(D + 1 - i); "
        "the embedding and landmark CNN get decay^(D + 1). 1 disables it; the paper fine-tunes with 0.58.",
        float,
        minimum=0.0,
        maximum=1.0,
    ),
    _opt("optim.betas", [0.9, 0.999], "AdamW betas.", list),
    _opt(
        "optim.clip_grad",
        5.0,
        "Clip the global gradient norm to this value (0 disables): one norm over the "
        "whole model (with several processes every process's Partial FC shard counts; pretraining: DINO's "
        "per-parameter rule).",
        float,
        minimum=0.0,
    ),
    _opt(
        "train.amp",
        "auto",
        "Autocast dtype on GPU: auto (bfloat16 where supported, else float16), bf16, fp16 or "
        "off (false and true mean off and auto). CPU runs in float32.",
        choices=("auto", "bf16", "fp16", "off"),
        aliases=((False, "off"), (True, "auto")),
    ),
    _opt(
        "train.original_path",
        False,
        "Use the code paths of the original LAFS repository (per-landmark "
        "grid_sample loop, unfused margin loss from lafs_kernels.baselines; in pretraining the frozen landmark CNN "
        "run once per global view and once for the locals, batch norms unfolded, the DINO loss's per-pair loop; "
        "every token through the transformer's last block, where ours runs the cls row only) "
        "for comparisons. Mixup's full margin per label and the teacher's eval mode are the same on both paths.",
        bool,
    ),
    _opt("train.log_every", 10, "Write a log line every this many optimizer steps.", minimum=1),
    _opt(
        "train.checkpoint_every",
        0,
        "Write checkpoints/last.pt every this many optimizer steps (0: at each verification and at the end).",
        minimum=0,
    ),
    _opt(
        "train.stop_after_steps",
        None,
        "Stop after this many optimizer steps while keeping the schedule of the "
        "full run (continue later with --resume, which does not apply this value again).",
        int,
        nullable=True,
        minimum=1,
    ),
    _opt(
        "train.channels_last",
        True,
        "Store the landmark CNN's convolution weights channels_last (NHWC) and feed "
        "it NHWC images: faster oneDNN / cuDNN convolutions (supervised and fine-tuning stages; not with "
        "train.original_path, which runs NCHW as the original code does).",
        bool,
    ),
    _opt(
        "train.cpu_threads",
        0,
        "Threads of CPU ops per process (0: torch's default). On a CPU shared with other "
        "jobs 1 is often several times faster than more, which then wait on each other.",
        minimum=0,
    ),
    _opt("train.plots", True, "Write curves.png and landmarks.png into the run folder.", bool),
]

MARGIN = [
    _opt(
        "loss.type",
        "cosface",
        "Margin softmax: cosface (target cos - m) or arcface (cos(theta + m)).",
        choices=("cosface", "arcface"),
    ),
    _opt("loss.s", 64.0, "Logit scale s.", float, minimum=0.0),
    _opt("loss.m", 0.4, "Margin m (CosFace 0.4, ArcFace 0.5).", float, minimum=0.0),
    _opt(
        "loss.partial_fc_sample_rate",
        1.0,
        "With several processes the class centres are sharded (Partial FC); "
        "this fraction of negative classes is sampled per step (one process does not sample).",
        float,
        minimum=0.0,
        maximum=1.0,
    ),
]

FLIP = [_opt("aug.flip", 0.5, "Probability of a horizontal flip of a training image.", float, minimum=0.0, maximum=1.0)]

# The landmark CNN trains in the supervised and fine-tuning stages (pretraining keeps it frozen in eval mode).
LANDMARK_TRAINING = [
    _opt(
        "model.landmark_dropout",
        0.5,
        "Rate of the landmark CNN's output dropout while training (the original's Dropout(0.5)); 0 switches it off.",
        float,
        minimum=0.0,
        maximum=1.0,
    ),
    _opt(
        "train.frozen_batch_norm",
        False,
        "Run the landmark CNN's batch norms with their running statistics (eval "
        "mode, statistics not updated) while training; their scale and shift still learn. Then every image is "
        "processed on its own and N processes with batch b train as one process with batch N x b; otherwise "
        "each process normalises with its own batch's statistics.",
        bool,
    ),
]

SUPERVISED = COMMON + MARGIN + FLIP + LANDMARK_TRAINING

FINETUNE = (
    COMMON
    + MARGIN
    + FLIP
    + LANDMARK_TRAINING
    + [
        _opt(
            "init.pretrained",
            None,
            "LAFS pretraining run folder or checkpoint whose teacher transformer starts the "
            "fine-tuning (null: transformer from scratch).",
            str,
            nullable=True,
        ),
        _opt(
            "init.landmark",
            None,
            "Supervised run folder, checkpoint or official state dict whose landmark CNN starts "
            "the fine-tuning (null: landmark CNN from scratch).",
            str,
            nullable=True,
        ),
        _opt("aug.randaugment", True, "Apply RandAugment (torchvision.transforms.v2) to the training images.", bool),
        _opt("aug.randaugment_ops", 2, "RandAugment operations per image.", minimum=1),
        _opt(
            "aug.randaugment_magnitude",
            9,
            "RandAugment magnitude on torchvision's 0-30 scale (timm's rand-mN of 10 is about 3N here).",
            minimum=0,
            maximum=30,
        ),
        _opt(
            "aug.resized_crop_scale",
            None,
            "Random resized crop of the whole face back to its size, area range [low, high] (the released "
            "fine-tuning: [0.9, 1.0]); null: none.",
            list,
            nullable=True,
        ),
        _opt(
            "aug.colour_jitter",
            0.0,
            "Strength of torchvision's ColorJitter on brightness, contrast, saturation and hue (the released "
            "fine-tuning: 0.1); 0: none.",
            float,
            minimum=0.0,
            maximum=0.5,
        ),
        _opt(
            "aug.erasing_prob",
            0.0,
            "Probability of blacking out one random rectangle of 2-10% of the face (torchvision's RandomErasing; "
            "the released fine-tuning: 0.5); 0: none.",
            float,
            minimum=0.0,
            maximum=1.0,
        ),
        _opt(
            "aug.mixup_prob",
            0.1,
            "Probability that a batch is mixed (mixup through the two-label soft-target path "
            "of the fused margin loss); the paper uses 0.1, and 0.2 for MS1MV3. Whether to mix and the weight are "
            "drawn from (seed, step, micro-batch), the same on every process; each process mixes its own images.",
            float,
            minimum=0.0,
            maximum=1.0,
        ),
        _opt("aug.mixup_alpha", 0.8, "Beta(alpha, alpha) distribution of the mixup weight.", float, minimum=0.0),
    ]
)

PRETRAIN = COMMON + [
    _opt(
        "init.landmark",
        None,
        "Supervised run folder, checkpoint or official state dict whose landmark CNN "
        "(frozen, eval mode) places the patches. Required.",
        str,
        nullable=True,
    ),
    _opt(
        "val.student",
        True,
        "Also verify the student transformer at each validation (val_student_accuracy in "
        "the log); the teacher's accuracy picks the best checkpoint.",
        bool,
    ),
    _opt(
        "val.view_probe",
        128,
        "Training images whose two global views (drawn once from the seed) are matched at "
        "each validation: val_view_retrieval is the fraction whose second view is the nearest to their first "
        "(chance 1/N; no labels needed). 0 turns it off.",
        minimum=0,
    ),
    _opt("views.global_scale", [0.4, 1.0], "Random-resized-crop scale range of the two global views.", list),
    _opt("views.local_count", 8, "Local views per image.", minimum=0),
    _opt("views.local_scale", [0.4, 1.0], "Random-resized-crop scale range of the local views.", list),
    _opt("views.local_tokens", 36, "Landmarks drawn per local view.", minimum=1),
    _opt("views.replacement", True, "Draw the local views' landmarks with replacement (as the paper).", bool),
    _opt("views.jitter_std", 5.0, "Gaussian landmark jitter in pixels.", float, minimum=0.0),
    _opt(
        "views.grayscale_p",
        0.2,
        "Probability that a view is turned to grayscale (DINO's 0.2).",
        float,
        minimum=0.0,
        maximum=1.0,
    ),
    _opt(
        "views.landmarks",
        "per_view",
        "Where the frozen landmark CNN runs: per_view (on every view's crop, as the "
        "paper) or per_image (once per source image, its landmarks mapped into each view through the crop's "
        "inverse affine: one CNN pass instead of one per view). train.original_path always runs it per view.",
        choices=("per_view", "per_image"),
    ),
    _opt(
        "views.local_positions",
        None,
        "Position embeddings of a local view's tokens: landmark (each token its "
        "landmark's) or first (the released code's first K + 1 positions, whatever landmarks were drawn); null: "
        "first with train.original_path, else landmark.",
        str,
        nullable=True,
        choices=("landmark", "first"),
    ),
    _opt("dino.out_dim", 65536, "Output dimension of the DINO head (the paper uses up to 100,000).", minimum=1),
    _opt("dino.hidden_dim", 2048, "Hidden width of the DINO head.", minimum=1),
    _opt("dino.bottleneck_dim", 256, "Bottleneck width of the DINO head.", minimum=1),
    _opt("dino.norm_last_layer", True, "Fix the gain of the weight-normalised last layer to 1.", bool),
    _opt("dino.student_temp", 0.1, "Student softmax temperature.", float, minimum=0.0),
    _opt(
        "dino.warmup_teacher_temp",
        0.04,
        "Teacher temperature at the start of its warmup (the released script: 0.07 -> 0.04 over 30 epochs, as "
        "the real-data recipes set it).",
        float,
        minimum=0.0,
    ),
    _opt("dino.teacher_temp", 0.04, "Teacher temperature after warmup.", float, minimum=0.0),
    _opt("dino.warmup_teacher_temp_epochs", 0.0, "Epochs of linear teacher-temperature warmup.", float, minimum=0.0),
    _opt("dino.center_momentum", 0.9, "Momentum of the teacher-output centre.", float, minimum=0.0, maximum=1.0),
    _opt(
        "dino.momentum_teacher",
        0.996,
        "Teacher EMA momentum at the start (cosine to 1).",
        float,
        minimum=0.0,
        maximum=1.0,
    ),
    _opt(
        "dino.weight_decay_end",
        0.4,
        "Weight decay at the end of its cosine schedule (from optim.weight_decay).",
        float,
        minimum=0.0,
    ),
    _opt(
        "dino.freeze_last_layer_epochs",
        1.0,
        "Epochs during which the head's last layer gets no update.",
        float,
        minimum=0.0,
    ),
]

SCHEMAS = {"supervised": SUPERVISED, "pretrain": PRETRAIN, "finetune": FINETUNE}


def check_value(opt: Option, value, source: str):
    """``value`` for ``opt`` after aliases and int/float widening; ConfigError naming ``source`` and the key."""
    where = f"{source}: {opt.key}"
    value = next((meaning for alias, meaning in opt.aliases if value is alias), value)
    if value is None:
        if opt.nullable:
            return None
        raise ConfigError(f"{where} must not be null ({opt.help})")
    if opt.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if opt.kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) and opt.kind is not bool or not isinstance(value, opt.kind):
        raise ConfigError(f"{where} must be {opt.kind.__name__}, got {value!r} ({type(value).__name__})")
    if opt.choices is not None and value not in opt.choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, opt.choices))}; got {value!r}")
    if opt.minimum is not None and value < opt.minimum:
        raise ConfigError(f"{where} must be >= {opt.minimum}; got {value!r}")
    if opt.maximum is not None and value > opt.maximum:
        raise ConfigError(f"{where} must be <= {opt.maximum}; got {value!r}")
    return value
