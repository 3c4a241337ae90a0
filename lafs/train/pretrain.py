"""Stage 2: LAFS self-supervised pretraining (DINO on landmark-centred patch views).

The landmark CNN comes from stage 1 (or an official checkpoint), frozen in eval
mode inside ``lafs.ssl.MultiViewBuilder`` (batch norms folded, channels_last; with
``train.original_path`` it runs as the original script runs it, once per global view,
and cuts patches with the original per-landmark ``grid_sample`` loop); ``lafs.ssl.DINOTrainer``
owns student, teacher, DINO head and loss, optimizer and the per-step schedules. Labels of
the training set are never read. Verification embeds the held-out pairs with
the teacher transformer behind the frozen landmark CNN; without labels, ``val.view_probe``
images' two global views (drawn once, from a fixed seed) tell whether the backbones learn
anything augmentation-invariant at all (``lafs.ssl.monitor``).
"""

from __future__ import annotations

import torch

from lafs.eval.embed import evaluation_mode
from lafs.models import create_model
from lafs.models.checkpoint import model_to_dict
from lafs.models.part_fvit import PartFViT
from lafs.ssl.monitor import probe_views, view_retrieval_accuracy
from lafs.ssl.step import DINOSettings, DINOTrainer
from lafs.ssl.views import MultiViewBuilder

from . import plots
from .config import ConfigError
from .data import build_train_set, build_val_sets
from .precision import autocast_dtype
from .stage import Stage
from .validation import verify_sets
from .weights import load_landmark_cnn

# autocast dtype -> DINOSettings.amp_dtype
_AMP_NAMES = {None: None, torch.bfloat16: "bfloat16", torch.float16: "float16"}


class PretrainStage(Stage):
    name = "pretrain"

    @property
    def progress_keys(self) -> tuple:
        return ("loss", "teacher_temp")

    def build(self) -> None:
        """Check the epoch counts, load the data, the frozen landmark CNN and two fresh transformers."""
        self._check_whole_epochs()
        self.train_set = build_train_set(self.cfg)
        self.val_sets = build_val_sets(self.cfg)
        self.landmark_cnn, self.student, self.teacher = self._build_models()

    def setup_schedules(self) -> None:
        """Pretraining's schedules live in its DINO trainer: the view builder, the settings (built once from the
        configuration and the run's length) and the trainer; then the label-free view probe."""
        views = self._build_views()
        settings = DINOSettings.from_config(
            self.cfg,
            iters_per_epoch=self.steps_per_epoch,
            amp_dtype=_AMP_NAMES[autocast_dtype(self.cfg.train.amp, self.device)],
        )
        self.trainer = DINOTrainer(
            self.student.to(self.device), self.teacher.to(self.device), views, settings, device=self.device
        )
        self.view_probe = self._build_view_probe()

    def _check_whole_epochs(self) -> None:
        """DINO's schedules count whole epochs: ConfigError on a fractional one."""
        cfg = self.cfg
        for key in ("optim.epochs", "dino.warmup_teacher_temp_epochs", "dino.freeze_last_layer_epochs"):
            if not float(cfg.get_path(key)).is_integer():
                raise ConfigError(f"{key} must be a whole number of epochs for pretraining; got {cfg.get_path(key)}")

    def _build_models(self) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
        """(landmark CNN from ``init.landmark``, frozen in eval mode on the device; student and teacher
        transformers, on the CPU) of ``cfg.model``."""
        cfg = self.cfg
        try:
            template = create_model(cfg.model.name, **cfg.model.overrides)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model: {exc}") from exc
        landmark_cnn = template.landmark_cnn
        load_landmark_cnn(landmark_cnn, cfg.init.landmark)
        landmark_cnn.to(self.device).eval().requires_grad_(False)
        student, teacher = template.transformer, create_model(cfg.model.name, **cfg.model.overrides).transformer
        if cfg.train.original_path:
            student.compute_as_released()
            teacher.compute_as_released()
        return landmark_cnn, student, teacher

    def _build_views(self) -> MultiViewBuilder:
        """The multi-crop view builder of ``cfg.views`` behind the frozen landmark CNN (own generator per process)."""
        cfg, v = self.cfg, self.cfg.views
        return MultiViewBuilder(
            self.landmark_cnn,
            patch_size=self.student.patch_size,
            global_views=2,
            local_views=v.local_count,
            local_tokens=v.local_tokens,
            jitter_std=v.jitter_std,
            replacement=v.replacement,
            global_scale=tuple(v.global_scale),
            local_scale=tuple(v.local_scale),
            image_size=self.landmark_cnn.image_size,
            grayscale_p=v.grayscale_p,
            seed=cfg.seed + self.dist.rank,
            original_path=cfg.train.original_path,
            landmarks=v.landmarks,
            local_positions=v.local_positions,
        )

    def _build_view_probe(self):
        """``val.view_probe`` images' two global views, drawn once from the seed (main process only), or None."""
        count = self.cfg.val.view_probe
        if not count or not self.dist.is_main:
            return None
        return probe_views(self.trainer.views, self._probe_images(count), self.cfg.seed)

    def _probe_images(self, count: int) -> torch.Tensor:
        """``count`` training images spread evenly over the set (so over many identities): [count, 3, H, W]."""
        if count < 2:
            raise ConfigError(f"val.view_probe must be 0 (off) or at least 2 images, got {count}")
        count = min(count, len(self.train_set))
        picks = torch.linspace(0, len(self.train_set) - 1, count).round().long()  # distinct: spacing >= 1
        return torch.stack([self.train_set[int(i)][0] for i in picks]).to(self.device)

    def current_lr(self, step: int) -> float:
        return float(self.trainer.lr_schedule[min(step, self.trainer.total_steps - 1)])

    def train_step(self, micro_batches: list, step: int) -> dict:
        if len(micro_batches) != 1:
            raise ConfigError("pretraining does not accumulate gradients: set optim.accum_steps=1")
        images, _ = micro_batches[0]  # labels are never used
        try:
            stats = self.trainer.train_step(images, step, step // self.steps_per_epoch)
        except FloatingPointError:
            return {"loss": float("nan")}
        stats.pop("lr")
        return stats

    def embedding_model(self, backbone=None) -> PartFViT:
        """A transformer (default: the teacher) behind the frozen landmark CNN, in eval mode: what verification uses.

        Both parts are shared with the trainer; the teacher never trains, and ``_evaluate`` puts a
        student back into the mode it found.
        """
        return PartFViT(self.landmark_cnn, self.trainer.teacher.backbone if backbone is None else backbone).eval()

    def validate(self) -> dict:
        """The teacher's verification (``accuracy``, which picks the best checkpoint) and, with ``val.student``,
        the student's as ``student_accuracy`` / ``student_acc_<set>``: a student that learns while the teacher
        lags behind tells a momentum problem from a pretraining that learns nothing.  With ``val.view_probe``
        also ``view_retrieval`` (and ``student_view_retrieval``): the fraction of probe images whose second
        global view is the nearest to their first (chance 1 / val.view_probe)."""
        if not self.dist.is_main:
            return {}
        results = self._evaluate(self.trainer.teacher.backbone)
        if self.cfg.val.student:
            results.update({f"student_{k}": v for k, v in self._evaluate(self.trainer.student.backbone).items()})
        return results

    def _evaluate(self, backbone) -> dict:
        """Verification of ``backbone`` behind the frozen landmark CNN, and its view retrieval on the probe;
        ``backbone`` goes back to the mode it was in (the landmark CNN stays in eval mode: it is frozen)."""
        with evaluation_mode(backbone):
            results = verify_sets(
                self.embedding_model(backbone), self.val_sets, batch_size=self.cfg.val.batch_size, device=self.device
            )
        if self.view_probe is not None:
            results["view_retrieval"] = view_retrieval_accuracy(backbone, self.view_probe)
        return results

    def state_dict(self) -> dict:
        return {
            "dino": self.trainer.state_dict(),
            "teacher_transformer": model_to_dict(self.trainer.teacher.backbone),
            "student_transformer": model_to_dict(self.trainer.student.backbone),
            "landmark_cnn": self.landmark_cnn.state_dict(),
        }

    def load_state_dict(self, state: dict, shard=None) -> None:
        self.trainer.load_state_dict(state["dino"])

    def process_state(self) -> dict:
        """The view generator: each process draws its own views."""
        return {"views": self.trainer.views.generator.get_state()}

    def load_process_state(self, state: dict) -> None:
        if "views" in state:
            self.trainer.views.generator.set_state(state["views"])

    def finish(self, summary: dict) -> dict:
        if self.cfg.train.plots:
            plots.curves(self.run.read_log(), self.run.path / "curves.png", title=self.name)
            plots.landmarks(
                self.embedding_model(),
                self.val_sets[0].sample_images(),
                self.run.path / "landmarks.png",
                device=self.device,
            )
        summary["train_images"] = len(self.train_set)
        return summary
