"""ADIOSModule: an encoder and a mask generator playing the ADIOS game under manual optimisation.

- [0] ADIOS, 2022, https://arxiv.org/abs/2201.13100
"""

from __future__ import annotations

import math
import os
import sys
from importlib import import_module
from typing import Any, Iterable, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from adios_pl.backend import TrainerFn, mixed_packages_warning, pl, rank_zero_warn
from adios_pl.batched_views import forward_views, synchronised_batch_norm
from adios_pl.checkpoint import CLI_INSTANTIATOR, CLI_INSTANTIATORS, check_loadable, constructor_config
from adios_pl.checks import check_arguments, check_mask_generator, compile_options, replays_as_cuda_graphs, unpack_training_batch
from adios_pl.distributed import all_reduce_gradients, broadcast_buffers, check_strategy, disable_ddp_grad_sync
from adios_pl.encoders import check_encoder, create_encoder
from adios_pl.errors import BatchFormatError, ConfigurationError
from adios_pl.masking import masked_view, reverse_gradient, sample_slots
from adios_pl.masks import MaskGenerator, RandomMasks
from adios_pl.nonfinite import FirstFailure, StateSnapshot, all_finite, gradient_norm
from adios_pl.objectives import Objective, SimCLR, ViewOutput
from adios_pl.optim import build_optimizer, compile_step, schedule_factor
from adios_pl.penalties import entropy_term, mask_areas, sparsity_penalty
from adios_pl.resume import apply_configured_rates, check_identity
from adios_pl.step_counting import count_batches_only

#: The objective's loss methods that ``compile_objective`` compiles (the step calls them through
#: :meth:`ADIOSModule._loss`).
OBJECTIVE_LOSSES = ("loss", "loss_both", "terms_loss")

# Lightning's classmethod that refuses a call on an instance (which would return a new model)
_restricted_classmethod: Any = getattr(import_module(f"{pl.__name__}.utilities.model_helpers"), "_restricted_classmethod", classmethod)


def _leaf_copies(outputs: ViewOutput) -> ViewOutput:
    """Detached copies of the tensors that carry gradients, made leaves that collect gradients."""
    return {k: v.detach().requires_grad_() if v.requires_grad else v for k, v in outputs.items()}


class ADIOSModule(pl.LightningModule):
    """ADIOS: an encoder (with the objective's heads) and a mask generator, trained adversarially.

    Per batch ``(views, targets)`` (``views`` two tensors ``(B, 3, H, W)``, ``targets`` long with
    -1 for unlabelled images), with masks ``m = mask_generator(views[1])`` computed once:

    1. encoder step (encoder + heads): minimise ``sum_n L(views[0], views[1] * (1 - m_n))`` with
       the masks detached;
    2. mask step (mask generator), encoder side frozen:
       ``mask_loss = -sum_n L(...) + sparsity_weight * sum_n mean_b 1/sin(pi area_bn)
       - entropy_weight * sum_b sum_n p_bn log p_bn`` -- the mask generator *ascends* the SSL
       loss minus the penalties of the paper.

    The clean view is encoded once per step, the mask generator runs once per batch, and the N
    masked terms are back-propagated one at a time, so peak activation memory does not grow
    with N (or, with ``masked_views="batched"``, go through the encoder as one batch). The
    result equals the reference algorithm (see ``tests/test_exactness.py``).

    Args:
        encoder: A registered name (:func:`adios_pl.encoders.list_encoders`) or any module mapping
            ``(B, 3, H, W)`` to ``(B, num_features)`` with an integer ``num_features``.
        objective: An :class:`~adios_pl.objectives.Objective`; ``None`` means ``SimCLR()``.
        num_masks: N, the number of mask slots; 0 trains the plain objective on the two views
            (the baseline) through the same step code; 1 is rejected (one slot covers all).
        mask_mode: ``"all"`` (ADIOS: every mask for every image) or ``"one"`` (ADIOS-s: one slot
            per image, drawn uniformly, so one masked forward per step).
        sparsity_weight: Weight ``a_s`` of the sparsity penalty.
        entropy_weight: Weight ``a_e`` of the area-entropy term.
        image_size: Side of the square training views.
        mask_width: Base width ``c`` of the U-Net.
        mask_norm: ``"gn"``, ``"in"`` or ``"none"``.
        optimizer: ``"sgd"`` (momentum 0.9), ``"lars"`` or ``"adamw"``, for both players.
        lr: Learning rate of the encoder side (encoder and heads).
        mask_lr: Learning rate of the mask generator.
        weight_decay: Weight decay of both players.
        warmup_epochs: Linear warm-up length; a cosine decay to ``min_lr_factor * lr`` follows.
        min_lr_factor: Final learning rate as a fraction of the initial one.
        schedule_interval: ``"step"`` (warm-up and cosine advance every batch) or ``"epoch"``
            (the reference: pl_bolts' warm-up cosine, stepped once per epoch).
        warmup_start_lr: Learning rate at the start of the warm-up (the reference: 0.003), the
            same absolute value for both players.
        momentum: Momentum of SGD and LARS.
        lars_eta: LARS trust coefficient.
        encoder_kwargs: Extra arguments of a registered encoder (e.g. ``{"norm": "gn"}``).
        mask_blocks: U-Net depth; ``None`` takes the reference's ``int(log2(image_size) - 1)``.
        mask_type: ``"learned"`` (the U-Net, ADIOS) or a random-mask baseline at the same masked
            fraction (each of the N slots hides about 1/N of the image): ``"random_patch"``
            (MAE-style random patches) or ``"random_block"`` (BEiT-style blocks). Random masks
            have no mask step.
        mask_patch_size: Cell size of the random masks (``image_size // 8`` by default).
        update: ``"alternating"`` (the reference game, exact) or ``"simultaneous"``: both
            players' gradients from one forward/backward, the mask generator's through a
            gradient reversal. An approximation (the mask generator sees the encoder before its
            update, not after) that saves the mask step's N+1 encoder passes.
        channels_last: Run the encoder, the mask generator and the views in channels-last memory
            format (faster convolutions on recent GPUs); ``None`` (default): on a CUDA device only.
        compile_encoder: ``torch.compile`` the encoder in place (parameter names unchanged):
            ``True`` in its default mode, or a mode by name (``adios_pl.checks.COMPILE_MODES``).
            ``"reduce-overhead"`` (and ``"max-autotune"``) replay the compiled encoder as CUDA
            graphs on a GPU; the step then marks each batch as a new graph step and copies the
            features it hands on (to the callbacks) out of the graphs' memory. The mode's options
            go with Inductor's mix-order reduction off (:func:`adios_pl.checks.compile_options`).
        masked_views: How the N masked views of a step go through the encoder and heads:
            ``"sequential"`` (one at a time, each back-propagated before the next, so activation
            memory does not grow with N) or ``"batched"`` (all N as one batch of ``N * B``: a
            GPU launches each kernel once instead of N times, and the activations of all views
            are alive at once). Both give the same result: while batched, batch-norm layers keep
            per-view statistics (:mod:`adios_pl.batched_views`). Other layers that mix images of
            a batch would see the N views together.
        nonfinite: ``"raise"`` (stop on a NaN/Inf loss or gradient, naming it) or ``"skip"``
            (drop the whole batch, restoring every state, and count it in ``train/skipped_batches``).
        mask_generator: Any module mapping ``(B, 3, H, W)`` to ``(B, N, H, W)`` masks that sum to 1
            over N, with an integer ``num_masks`` (equal to ``num_masks``); trained by the mask
            optimiser if and only if it has trainable parameters. ``None`` builds the default from
            ``num_masks``, ``mask_type``, ``mask_width``, ``mask_norm``, ``mask_blocks``,
            ``mask_patch_size``.
        compile_mask_generator: ``torch.compile`` a learned mask generator in place, as
            ``compile_encoder`` does the encoder (same values; ignored for random masks).
        compile_objective: ``torch.compile`` the objective in place (same values as
            ``compile_encoder``): its forward, which runs the encoder, the heads and any momentum
            copies as one graph, and its losses (:data:`OBJECTIVE_LOSSES`). In training the encoder
            is then compiled within the objective's graphs (``compile_encoder`` still compiles it
            for evaluation and ``model(x)``). With the encoder and the mask generator compiled, the
            heads and the losses launch the largest share of the kernels left eager
            (``benchmarks/ops_per_step.py``).
        compile_optimizers: ``torch.compile`` both players' optimiser updates (same values as
            ``compile_encoder``; :func:`adios_pl.optim.compile_step`): a few fused kernels per
            update instead of several per weight group (multi-tensor LARS) or per weight. Never
            replayed as CUDA graphs, whatever the mode: the gradients they read are new tensors
            at every step. Optimiser step hooks are not run. With ``"sgd"`` and ``"lars"``.
    """

    def __init__(
        self,
        encoder: str | nn.Module = "resnet18",
        objective: Objective | None = None,
        num_masks: int = 6,
        mask_mode: Literal["all", "one"] = "all",
        sparsity_weight: float = 1.0,
        entropy_weight: float = 0.0,
        image_size: int = 32,
        mask_width: int = 32,
        mask_norm: Literal["gn", "in", "none"] = "gn",
        optimizer: Literal["sgd", "lars", "adamw"] = "sgd",
        lr: float = 0.3,
        mask_lr: float = 0.1,
        weight_decay: float = 1e-5,
        warmup_epochs: float = 10.0,
        min_lr_factor: float = 0.0,
        schedule_interval: Literal["step", "epoch"] = "step",
        warmup_start_lr: float = 0.0,
        momentum: float = 0.9,
        lars_eta: float = 0.02,
        encoder_kwargs: dict[str, Any] | None = None,
        mask_blocks: int | None = None,
        mask_type: Literal["learned", "random_patch", "random_block"] = "learned",
        mask_patch_size: int | None = None,
        update: Literal["alternating", "simultaneous"] = "alternating",
        channels_last: bool | None = None,
        compile_encoder: bool | str = False,
        nonfinite: Literal["raise", "skip"] = "raise",
        mask_generator: nn.Module | None = None,
        masked_views: Literal["sequential", "batched"] = "sequential",
        compile_mask_generator: bool | str = False,
        compile_objective: bool | str = False,
        compile_optimizers: bool | str = False,
    ) -> None:
        super().__init__()
        if (mixed := mixed_packages_warning(os.environ, sys.modules)) is not None:
            rank_zero_warn(mixed)
        check_arguments(
            num_masks=num_masks, mask_mode=mask_mode, sparsity_weight=sparsity_weight,
            entropy_weight=entropy_weight, image_size=image_size, mask_norm=mask_norm,
            optimizer=optimizer, lr=lr, mask_lr=mask_lr, weight_decay=weight_decay,
            warmup_epochs=warmup_epochs, min_lr_factor=min_lr_factor, mask_type=mask_type, update=update,
            nonfinite=nonfinite, schedule_interval=schedule_interval, warmup_start_lr=warmup_start_lr,
            mask_patch_size=mask_patch_size, masked_views=masked_views, compile_encoder=compile_encoder,
            compile_mask_generator=compile_mask_generator, compile_objective=compile_objective,
            compile_optimizers=compile_optimizers,
        )
        # Under LightningCLI the hyper-parameters are the run's config, where the parts are class
        # paths with their arguments: all are kept, so load_from_checkpoint(path) rebuilds the
        # model as trained. A module passed in a script is saved the same way where its
        # arguments can be read off it (the library's objectives); otherwise it is left out (its
        # weights are in the state dict) and load_from_checkpoint asks for it again.
        parts = {"encoder": encoder, "objective": objective, "mask_generator": mask_generator}
        modules = {name: part for name, part in parts.items() if isinstance(part, nn.Module)}
        self.save_hyperparameters(ignore=list(modules))
        if "_instantiator" in self.hparams:
            self.save_hyperparameters()
        elif modules and None not in (configs := {name: constructor_config(part) for name, part in modules.items()}).values():
            self.save_hyperparameters({**configs, "_instantiator": CLI_INSTANTIATOR})
        self.automatic_optimization = False

        encoder_name = encoder if isinstance(encoder, str) else type(encoder).__name__
        if isinstance(encoder, str):
            encoder = create_encoder(encoder, image_size=image_size, **(encoder_kwargs or {}))
        elif not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be a registered name or an nn.Module, got {type(encoder).__name__}")
        check_encoder(encoder, image_size)
        self.encoder = encoder

        if objective is None:
            objective = SimCLR()
        if not isinstance(objective, Objective):
            raise TypeError(
                "objective must be an adios_pl.objectives.Objective (SimCLR, BYOL, SimSiam or your "
                f"own subclass), got {type(objective).__name__}"
            )
        objective.build(self.encoder)
        self.objective = objective
        # What a checkpoint must agree with to be loaded (saved beside the weights).
        self.identity = {
            "objective": type(objective).__name__, "encoder": encoder_name, "num_masks": num_masks,
            "image_size": image_size, "mask_width": mask_width, "mask_norm": mask_norm,
            "mask_blocks": mask_blocks, "mask_type": mask_type, "optimizer": optimizer,
        }

        if mask_generator is not None:
            check_mask_generator(mask_generator, num_masks, image_size)
            self.identity.update(mask_type=type(mask_generator).__name__, mask_width=None, mask_norm=None, mask_blocks=None)
        elif num_masks > 0 and mask_type == "learned":
            mask_generator = MaskGenerator(num_masks, image_size, width=mask_width, norm=mask_norm, num_blocks=mask_blocks)
        elif num_masks > 0:
            mask_generator = RandomMasks(num_masks, image_size, kind=mask_type, patch_size=mask_patch_size)
        self.mask_generator: nn.Module | None = mask_generator
        # trained by the mask optimiser if and only if it has trainable parameters
        self.learned_masks = mask_generator is not None and any(p.requires_grad for p in mask_generator.parameters())
        self.num_masks = num_masks
        self.mask_mode = mask_mode
        self.sparsity_weight = sparsity_weight
        self.entropy_weight = entropy_weight
        self.image_size = image_size
        self.update_rule = update  # not hparams.update: that name is the dict's method
        self.masked_views = masked_views
        self.total_steps = 1
        self._skipped = torch.zeros((), dtype=torch.long)  # on the device: read back only when asked
        self._failure = FirstFailure()  # nonfinite="raise": the first non-finite batch, on the device
        self._collapse_steps = torch.zeros(())
        self._epoch_steps = 0
        self._collapse_warned = False
        # Created in on_train_start: a torch.Generator cannot be sent to spawned processes.
        self._slot_generator: torch.Generator | None = None
        self._slot_state: Tensor | None = None
        self._mask_rng_state: Tensor | None = None

    # ----------------------------------------------------------------------------------- API
    def embed(self, images: Tensor) -> Tensor:
        """Encoder features ``(B, num_features)`` of images ``(B, 3, H, W)`` for evaluation."""
        features: Tensor = self.encoder(images)
        return self._out_of_graphs(features)

    def forward(self, images: Tensor) -> Tensor:
        """``model(images)``: the encoder features, as :meth:`embed`."""
        return self.embed(images)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Features of ``(images, targets, ...)`` batches: ``{"features", "targets"}`` (``trainer.predict``)."""
        return self.validation_step(batch, batch_idx, dataloader_idx)

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """What the encoder optimiser updates: the encoder and the objective's heads."""
        yield from self.encoder.parameters()
        yield from self.objective.trainable_parameters()

    # ---------------------------------------------------------------------------- optimisers
    def configure_optimizers(self) -> Any:
        """One optimiser and one warm-up + cosine schedule per player.

        The schedulers are stepped once per batch; with ``schedule_interval="epoch"`` their
        factor changes only at epoch boundaries. Parameters the objective names in
        ``constant_lr_parameters`` (SimSiam's predictor, optionally) form a group of their own
        whose rate is not scheduled.
        """
        hp: Any = self.hparams
        trainer = self.trainer
        if trainer.train_dataloader is None:  # with max_steps alone Lightning has not loaded it yet
            trainer.fit_loop.setup_data()
        estimated = trainer.estimated_stepping_batches  # batches: see adios_pl.step_counting
        # Endless training (no max_epochs, no max_steps): warm-up, then a constant rate.
        self.total_steps = max(int(estimated), 1) if math.isfinite(estimated) else 2**62
        per_epoch = trainer.num_training_batches
        if hp.warmup_epochs > 0 and not math.isfinite(per_epoch):
            raise ConfigurationError("warmup_epochs > 0 needs a training dataloader with a length; set warmup_epochs=0")
        if hp.schedule_interval == "epoch" and not math.isfinite(per_epoch):
            raise ConfigurationError('schedule_interval="epoch" needs a training dataloader with a length; use "step"')
        per_epoch = int(per_epoch) if math.isfinite(per_epoch) else 1
        if hp.warmup_epochs > 0 and hp.warmup_epochs * per_epoch >= self.total_steps:
            rank_zero_warn(
                f"warmup_epochs={hp.warmup_epochs} ({round(hp.warmup_epochs * per_epoch)} batches) is as long as the "
                f"whole run ({self.total_steps} batches): the learning rate never reaches lr. Lower warmup_epochs."
            )
        constant = {id(p) for p in self.objective.constant_lr_parameters()}
        encoder_groups = [[p for p in self.encoder_parameters() if id(p) not in constant]]
        if constant:
            encoder_groups.append([p for p in self.encoder_parameters() if id(p) in constant])
        players = [(encoder_groups, hp.lr)]
        if self.learned_masks:
            assert self.mask_generator is not None
            players.append(([list(self.mask_generator.parameters())], hp.mask_lr))
        optimizers, schedulers = [], []
        for groups, lr in players:
            opt = build_optimizer(
                hp.optimizer, [{"params": g} for g in groups], lr=lr, weight_decay=hp.weight_decay,
                momentum=hp.momentum, lars_eta=hp.lars_eta,
            )
            if setting := hp.compile_optimizers:  # before the scheduler, which wraps step
                compile_step(opt, {**compile_options(setting), "triton.cudagraphs": False})
            factors = [
                schedule_factor(
                    hp.schedule_interval, hp.warmup_epochs, per_epoch, self.total_steps,
                    start_factor=hp.warmup_start_lr / lr, min_factor=hp.min_lr_factor, constant=i > 0,
                )
                for i in range(len(groups))
            ]
            optimizers.append(opt)
            schedulers.append(torch.optim.lr_scheduler.LambdaLR(opt, factors))
        return optimizers, schedulers

    # -------------------------------------------------------------------------------- hooks
    def setup(self, stage: str) -> None:
        """Before a fit, refuse a strategy that shards the parameters (see :func:`check_strategy`)."""
        if stage == TrainerFn.FITTING:
            check_strategy(self.trainer.strategy)

    def on_train_start(self) -> None:
        """Seed the ADIOS-s slot sampler, differently on each rank; put the counters on the device."""
        self._skipped = self._skipped.to(self.device)  # logged every step: keep it where the logs are
        self._slot_generator = torch.Generator()
        if self._slot_state is not None:  # resumed: continue the saved sequence
            self._slot_generator.set_state(self._slot_state)
            self._slot_state = None
        else:
            self._slot_generator.manual_seed((torch.initial_seed() + 1_000_003 * self.global_rank) % 2**63)
        if hasattr(self.mask_generator, "generator"):  # random baselines: a generator on the masks' device
            generator = torch.Generator(device=self.device)
            if self._mask_rng_state is not None:
                generator.set_state(self._mask_rng_state)
                self._mask_rng_state = None
            else:
                generator.manual_seed((torch.initial_seed() + 1_000_003 * self.global_rank + 7) % 2**63)
            self.mask_generator.generator = generator  # type: ignore[union-attr]

    def configure_model(self) -> None:
        """Apply the channels-last and compile options once the model is on its device."""
        if self._channels_last():
            self.encoder.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            if self.mask_generator is not None:
                self.mask_generator.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if not getattr(self, "_compiled", False):
            for setting, part in ((self.hparams["compile_encoder"], self.encoder), (self._compile_mask_generator(), self.mask_generator)):
                if setting and part is not None:
                    part.compile(options=compile_options(setting))
            if setting := self.hparams["compile_objective"]:
                options = compile_options(setting)
                self.objective.compile(options=options)
                self._losses = {name: torch.compile(getattr(self.objective, name), options=options) for name in OBJECTIVE_LOSSES}
            self._compiled = True

    @_restricted_classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None, strict: bool | None = None, **kwargs: Any,
    ) -> ADIOSModule:
        """Lightning's ``load_from_checkpoint``, with two checks first.

        - A checkpoint of ``adios-pl fit`` rebuilds the model as trained: its hyper-parameters
          hold the objective, encoder and mask generator as class paths with their arguments.
          A class path whose module is not imported yet is refused (loading a file never
          imports code it names); import that module first.
        - A checkpoint of a script holds the library's own parts (objectives, mask generators,
          ``SmallConvNet``) the same way, with the arguments read back from them. A module of
          the user's is saved as weights only: pass it again (``objective=MyLoss(...)``,
          ``encoder=...``, ``mask_generator=...``); a missing one is an error naming it, not a
          silent default.

        Other keyword arguments replace saved hyper-parameters, as in Lightning.
        """
        parts = ("encoder", "objective", "mask_generator")
        saved = check_loadable(checkpoint_path, hparams_file, kwargs, parts)
        # written with either Lightning package (each allows only its own name): built with this one's
        instantiator = {"_instantiator": CLI_INSTANTIATOR} if saved.get("_instantiator") in CLI_INSTANTIATORS else {}
        saved.update(instantiator)
        model = super().load_from_checkpoint(checkpoint_path, map_location, hparams_file, strict, **{**instantiator, **kwargs})
        if "_instantiator" in saved:  # built from the config: keep it, so the model's own checkpoints load alone too
            model.save_hyperparameters({key: saved[key] for key in (*parts, "_instantiator") if key in saved and key not in kwargs})
        return model  # type: ignore[return-value]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the ADIOS-s slot sampler so a resumed run draws the same slots; never save the
        weights of a non-finite batch not yet read back."""
        self._failure.raise_if_any()
        checkpoint["adios_identity"] = dict(self.identity)
        checkpoint["adios_skipped_batches"] = self.skipped_batches
        if self._slot_generator is not None:
            checkpoint["adios_slot_rng"] = self._slot_generator.get_state()
        mask_rng = getattr(self.mask_generator, "generator", None)
        if isinstance(mask_rng, torch.Generator):
            checkpoint["adios_mask_rng"] = mask_rng.get_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another configuration; restore the ADIOS-s slot sampler."""
        check_identity(checkpoint.get("adios_identity", {}), self.identity)
        self._slot_state = checkpoint.get("adios_slot_rng")
        self._mask_rng_state = checkpoint.get("adios_mask_rng")
        self.skipped_batches = int(checkpoint.get("adios_skipped_batches", 0))
        hp: Any = self.hparams
        apply_configured_rates(checkpoint, hp.lr, hp.mask_lr, hp.weight_decay, hp.momentum, hp.optimizer)

    # ------------------------------------------------------------------------------ training
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """One round of the game on ``batch = (views, targets)``; returns the clean-view features.

        The returned ``features`` (detached encoder output of ``views[0]``) and ``targets`` reach
        callbacks through ``on_train_batch_end``, so online evaluation needs no extra forward.
        Nothing in the step reads a value back to the host (see :mod:`adios_pl.nonfinite`).
        """
        if self._cuda_graphs():  # the graphs' outputs of the last batch may now be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        x1, x2, targets = self._unpack(batch)
        disable_ddp_grad_sync(self.trainer.strategy.model)  # each player's gradients are averaged in _step_player
        step = self.global_step  # counts batches: see adios_pl.step_counting
        optimizers, schedulers = self._players()
        snapshot = StateSnapshot(self, optimizers) if self.hparams["nonfinite"] == "skip" else None
        masks, slots = self._predict_masks(x1, x2)  # one forward serves both players
        play = self._simultaneous_round if self._simultaneous() else self._alternating_round
        with synchronised_batch_norm([self.encoder, self.objective]):  # SyncBatchNorm without host synchronisation
            logs, grad_norms, features = play(x1, x2, masks, slots, optimizers, step)
        return self._end_batch(step, snapshot, schedulers, logs, grad_norms, features, targets)

    def _alternating_round(
        self, x1: Tensor, x2: Tensor, masks: Tensor | None, slots: Tensor | None, optimizers: list[Any], step: int,
    ) -> tuple[dict[str, Any], dict[str, Tensor | None], Tensor]:
        """The reference game. Player 1, the encoder side, minimises the SSL loss of the masked
        views (masks fixed) and steps; player 2, the mask generator, then ascends the SSL loss of
        the *updated* encoder minus its penalties, and steps."""
        encoder_loss, features = self._encoder_step(x1, x2, None if masks is None else masks.detach(), slots)
        logs: dict[str, Any] = {"train/encoder_loss": encoder_loss}
        grad_norms = {"encoder gradient norm": self._step_encoder(optimizers[0], step)}
        if self.learned_masks:
            assert masks is not None
            logs.update(self._mask_step(x1, x2, masks, slots, optimizers[1]))
            grad_norms["mask gradient norm"] = self._step_player(optimizers[1])
        return logs, grad_norms, features

    def _simultaneous_round(
        self, x1: Tensor, x2: Tensor, masks: Tensor | None, slots: Tensor | None, optimizers: list[Any], step: int,
    ) -> tuple[dict[str, Any], dict[str, Tensor | None], Tensor]:
        """Both players' gradients from one forward/backward: the masks enter the encoder's terms
        through a gradient reversal, so the encoder's backward also gives the mask generator its
        ascent direction (of the encoder before its update, unlike the reference); the penalties
        complete it, then both players step."""
        assert masks is not None
        leaf = masks.detach().requires_grad_()  # collects the masks' (reversed) gradient over the N terms
        encoder_loss, features = self._encoder_step(x1, x2, reverse_gradient(leaf), slots)
        logs: dict[str, Any] = {"train/encoder_loss": encoder_loss}
        logs.update(self._mask_penalties_and_backward(masks, leaf, encoder_loss))
        grad_norms = {
            "encoder gradient norm": self._step_encoder(optimizers[0], step),
            "mask gradient norm": self._step_player(optimizers[1]),
        }
        return logs, grad_norms, features

    def _step_encoder(self, optimizer: Any, step: int) -> Tensor | None:
        """Step the encoder side, then the objective's ``on_encoder_step_end`` hook."""
        norm = self._step_player(optimizer)
        self.objective.on_encoder_step_end(self.encoder, step, self.total_steps)
        return norm

    def _players(self) -> tuple[list[Any], list[Any]]:
        """The optimisers and schedulers: the encoder side's, then the mask generator's if learned."""
        opts: Any = self.optimizers()
        optimizers: list[Any] = opts if isinstance(opts, list) else [opts]
        scheds: Any = self.lr_schedulers()
        schedulers: list[Any] = scheds if isinstance(scheds, list) else [scheds]
        count_batches_only(optimizers)
        return optimizers, schedulers

    def _simultaneous(self) -> bool:
        return self.update_rule == "simultaneous" and self.learned_masks

    def _predict_masks(self, x1: Tensor, x2: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Masks of ``views[1]`` (of both views, stacked, when the objective masks both) and, for
        ADIOS-s, the slot drawn for each image."""
        if self.mask_generator is None:
            return None, None
        both = self.objective.mask_both_views
        masks: Tensor = self.mask_generator(torch.cat([x1, x2]) if both else x2)
        slots = None
        if self.mask_mode == "one":  # drawn on the host (a generator saved in checkpoints), copied without waiting
            slots = sample_slots(x2.shape[0], self.num_masks, self._slot_generator)
            slots = slots.pin_memory().to(x2.device, non_blocking=True) if x2.is_cuda else slots.to(x2.device)
        return masks, slots

    def _step_player(self, optimizer: Any) -> Tensor | None:
        """Average one player's gradients over ranks and step; returns their norm (for the
        finiteness check at the end of the batch)."""
        params = self._params_of(optimizer)
        all_reduce_gradients(params)
        # Under a GradScaler (16-mixed) the gradients are scaled, and an overflow is the scaler's
        # business: it skips that step and lowers the scale. Only the losses are checked then.
        norm = None if getattr(self.trainer.precision_plugin, "scaler", None) is not None else gradient_norm(params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def _end_batch(
        self, step: int, snapshot: StateSnapshot | None, schedulers: list[Any], logs: dict[str, Any],
        grad_norms: dict[str, Tensor | None], features: Tensor, targets: Tensor,
    ) -> dict[str, Any]:
        """After both players: momentum update, the finiteness decision, schedules, buffers, logs,
        and the callbacks' outputs."""
        self.objective.on_step_end(self.encoder, step, self.total_steps)  # the reference's on_train_batch_end
        # in the order of the step: the encoder's loss and gradient, then the mask player's
        losses = {k: v for k, v in logs.items() if k.endswith("_loss") and isinstance(v, Tensor)}
        ordered: dict[str, Tensor | None] = {"train/encoder_loss": losses.pop("train/encoder_loss")}
        ordered["encoder gradient norm"] = grad_norms["encoder gradient norm"]
        ordered.update(losses)
        ordered["mask gradient norm"] = grad_norms.get("mask gradient norm")
        checked = {k: v for k, v in ordered.items() if v is not None}
        ok = all_finite(list(checked.values()))
        read_back = (step + 1) % self._readback_interval() == 0
        if snapshot is not None:  # nonfinite="skip": a non-finite batch leaves no trace but the count
            snapshot.restore_unless(ok)
            self._skipped = self._skipped.to(ok.device) + (~ok).long()
        else:
            self._failure.record(ok, step, self.current_epoch, list(checked), list(checked.values()))
            if read_back:
                self._failure.raise_if_any()
        if "train/mask_collapsed_fraction" in logs:
            self._track_collapse(logs["train/mask_collapsed_fraction"], ok)
        if read_back:  # the rates of this batch, before the schedulers move them
            logs["train/lr"] = self._on_device(schedulers[0].get_last_lr()[0])
            if self.learned_masks:
                logs["train/mask_lr"] = self._on_device(schedulers[1].get_last_lr()[0])
        for scheduler in schedulers:
            scheduler.step()
        broadcast_buffers(self.buffers())
        encoder_loss = logs["train/encoder_loss"]
        # Logged when Lightning's loggers write them (every log_every_n_steps batches; every batch
        # on the CPU): each self.log costs about a millisecond of host time, and the progress bar
        # reads its values back at every log.
        if read_back:
            logs["train/skipped_batches"] = self._skipped.float()
            self.log_dict(logs, on_step=True, on_epoch=False, prog_bar=False)
            self.log("train/loss", encoder_loss, on_step=True, on_epoch=False, prog_bar=True, logger=False)
        outputs = {"loss": encoder_loss, "features": features, "targets": targets}
        if snapshot is not None:  # callbacks that train (the probe) must drop a skipped batch too
            outputs["finite"] = ok
        return outputs

    def _on_device(self, value: float) -> Tensor:
        """A number as a tensor on the module's device, written by a kernel: ``self.log`` of a
        Python number would copy it from host memory, which waits for the device."""
        return torch.full((), value, device=self.device)

    def _readback_interval(self) -> int:
        """Batches between read-backs and logs (the non-finite record, the logged values): every
        batch on the CPU (free), Lightning's ``log_every_n_steps`` on an accelerator."""
        if self.device.type == "cpu":
            return 1
        return max(1, int(getattr(self.trainer, "log_every_n_steps", 50)))

    @property
    def skipped_batches(self) -> int:
        """Batches dropped by ``nonfinite="skip"`` (reads the device counter back)."""
        return int(self._skipped)

    @skipped_batches.setter
    def skipped_batches(self, value: int) -> None:
        """Set the counter (a checkpoint's value when resuming)."""
        self._skipped = torch.full((), int(value), dtype=torch.long, device=self._skipped.device)

    def _terms(self, slots: Tensor | None) -> Sequence[int | Tensor]:
        """The masked terms of one step: every slot (ADIOS) or the drawn slot per image (ADIOS-s)."""
        return [slots] if slots is not None else list(range(self.num_masks))

    def _clean_views(self, x1: Tensor, x2: Tensor) -> list[Tensor]:
        """The views the loss compares masked views with: ``views[0]``, and ``views[1]`` too when
        the objective masks both."""
        return [x1, x2] if self.mask_generator is not None and self.objective.mask_both_views else [x1]

    def _masked_inputs(self, x1: Tensor, x2: Tensor, masks: Tensor | None, slots: Tensor | None) -> Iterator[list[Tensor]]:
        """The images of each term of the loss, one per clean view, made as they are asked for:
        ``views[1]`` with one slot hidden (and ``views[0]`` with it too when the objective masks
        both); without masks, the one term ``[views[1]]``.

        ``masks`` are the mask generator's output: of ``views[1]`` ``(B, N, H, W)``, or of both
        views stacked ``(2B, N, H, W)`` when the objective masks both.
        """
        if masks is None:
            yield [x2]
            return
        halves = masks.split(x1.shape[0]) if self.objective.mask_both_views else (masks,)
        views = (x1, x2) if self.objective.mask_both_views else (x2,)
        for term in self._terms(slots):
            yield [masked_view(x, m, term) for x, m in zip(views, halves)]

    def _term_count(self, slots: Tensor | None) -> int:
        return 1 if self.mask_generator is None else len(self._terms(slots))

    def _term_loss(self, clean: list[ViewOutput], masked: list[ViewOutput]) -> Tensor:
        """The SSL loss of one term: the clean views' outputs against the term's."""
        return self._loss("loss_both")(clean, masked) if len(clean) == 2 else self._loss("loss")(clean[0], masked[0])

    def _batched(self, views: int) -> bool:
        return self.masked_views == "batched" and views > 1

    def _forward_together(self, leading: list[Tensor], terms: Iterable[list[Tensor]]) -> tuple[list[ViewOutput], list[list[ViewOutput]]]:
        """The objective's outputs of ``leading`` and of each term's images, from one forward of
        them all stacked (per-view batch norm); the terms' outputs grouped as the terms."""
        terms = list(terms)
        views = leading + [x for term in terms for x in term]
        outputs = forward_views(self.objective, self.encoder, views, [self.encoder, self.objective])
        rest = iter(outputs[len(leading) :])
        return outputs[: len(leading)], [[next(rest) for _ in term] for term in terms]

    def _encoder_step(self, x1: Tensor, x2: Tensor, masks: Tensor | None, slots: Tensor | None) -> tuple[Tensor, Tensor]:
        """Back-propagate ``sum_n L(x1, x2 * (1 - m_n))`` into the encoder side.

        ``masked_views="sequential"``: the clean views are encoded once; their outputs enter every
        term as detached leaves that collect the gradients, which then go through the clean branch
        in one backward after the terms' one-at-a-time backwards. ``"batched"``: the clean and all
        masked views in one forward and one backward.
        """
        clean_views = self._clean_views(x1, x2)
        terms = self._masked_inputs(x1, x2, masks, slots)
        if self._batched(len(clean_views) * (1 + self._term_count(slots))):
            clean, masked = self._forward_together(clean_views, terms)
            total = self._loss("terms_loss")(clean, masked)
            self.manual_backward(total)
            # the total goes on to the logs and the outputs: out of the loss's graphs, as the features
            return self._out_of_graphs(total.detach()), self._out_of_graphs(clean[0]["features"].detach())
        clean = [self.objective(self.encoder, x) for x in clean_views]
        leaves = [_leaf_copies(out) for out in clean]
        total = x1.new_zeros(())
        for term in terms:
            loss = self._term_loss(leaves, [self.objective(self.encoder, x) for x in term])
            self.manual_backward(loss)
            total += loss.detach()
        tensors, grads = [], []
        for out, leaf in zip(clean, leaves):
            for k, v in leaf.items():
                if v.grad is not None and out[k] is not v:
                    tensors.append(out[k])
                    grads.append(v.grad)
        if tensors:
            torch.autograd.backward(tensors, grads)
        return total, self._out_of_graphs(clean[0]["features"].detach())

    def _mask_step(self, x1: Tensor, x2: Tensor, masks: Tensor, slots: Tensor | None, mask_opt: Any) -> dict[str, Tensor]:
        """Back-propagate the mask loss into the mask generator, the encoder side frozen.

        The gradients of the N terms (one at a time, or together with ``masked_views="batched"``)
        are collected on a detached copy of the masks, then go through the mask generator in one
        backward.
        """
        self.toggle_optimizer(mask_opt)  # freezes every parameter the mask optimiser does not own
        try:
            with torch.no_grad():  # the clean views do not depend on the masks
                clean = [self.objective(self.encoder, x) for x in self._clean_views(x1, x2)]
            leaf = masks.detach().requires_grad_()
            terms = self._masked_inputs(x1, x2, leaf, slots)
            losses: Iterable[Tensor]
            if self._batched(len(clean) * self._term_count(slots)):
                _, masked = self._forward_together([], terms)
                losses = [self._loss("terms_loss")(clean, masked)]
            else:
                losses = (self._term_loss(clean, [self.objective(self.encoder, x) for x in term]) for term in terms)
            ssl = x1.new_zeros(())
            for loss in losses:
                self.manual_backward(-loss)  # sign convention: the mask generator ascends the SSL loss
                ssl += loss.detach()
            return self._mask_penalties_and_backward(masks, leaf, ssl)
        finally:
            self.untoggle_optimizer(mask_opt)

    def _mask_penalties_and_backward(self, masks: Tensor, leaf: Tensor, ssl: Tensor) -> dict[str, Tensor]:
        """Add the penalties' gradients on ``leaf`` and back-propagate all into the mask generator.

        With both views masked the penalties cover the 2N masks of each image: the sparsity term
        sums each view's batch mean, the entropy is over the 2N areas, as in the reference.
        """
        views = 2 if self.objective.mask_both_views else 1
        batch = leaf.shape[0] // views
        areas = mask_areas(leaf)
        penalty = sparsity_penalty(areas).sum(dim=0).sum() / batch
        entropy = entropy_term(torch.cat(areas.split(batch), dim=1))
        self.manual_backward(self.sparsity_weight * penalty - self.entropy_weight * entropy)
        masks.backward(leaf.grad)
        areas = areas.detach()
        mask_loss = -ssl + self.sparsity_weight * penalty.detach() - self.entropy_weight * entropy.detach()
        second = areas.topk(2, dim=1).values[:, 1] if areas.shape[1] > 1 else areas[:, 0]
        return {
            "train/mask_loss": mask_loss,
            "train/mask_ssl_loss": ssl,
            "train/sparsity_penalty": penalty.detach(),
            "train/entropy": -entropy.detach(),
            "train/mask_area_mean": areas.mean(),
            "train/mask_area_min": areas.min(),
            "train/mask_area_max": areas.max(),
            # fraction of images whose second-largest mask covers < 2%: one slot has everything
            "train/mask_collapsed_fraction": (second < 0.02).float().mean(),
        }

    # ---------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Features of evaluation images for the callbacks: ``{"features", "targets"}``.

        ``batch`` is ``(images, targets)`` or ``(images, targets, segmentation)``; anything else after
        the targets (lightly's file names) is not used.
        """
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise BatchFormatError("a validation batch must be (images, targets) or (images, targets, segmentation)")
        return {"features": self.embed(batch[0]), "targets": batch[1]}

    # ------------------------------------------------------------------------------ helpers
    def _unpack(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        x1, x2, targets = unpack_training_batch(batch, self.image_size)
        if self._channels_last():
            x1, x2 = x1.contiguous(memory_format=torch.channels_last), x2.contiguous(memory_format=torch.channels_last)
        return x1, x2, targets

    def _channels_last(self) -> bool:
        setting = self.hparams["channels_last"]
        if setting is not None:
            return bool(setting)
        trainer = getattr(self, "_trainer", None)  # in configure_model the module is not on its device yet
        device = trainer.strategy.root_device if trainer is not None else self.device
        return device.type == "cuda"

    def _compile_mask_generator(self) -> bool | str:
        """The mask generator's compile setting; it applies to a learned mask generator only."""
        return self.hparams["compile_mask_generator"] if self.learned_masks else False

    def _cuda_graphs(self) -> bool:
        """Whether a compiled part replays as CUDA graphs (a CUDA-graph mode, on a GPU)."""
        modes = (self.hparams["compile_encoder"], self._compile_mask_generator(), self.hparams["compile_objective"])
        return any(replays_as_cuda_graphs(mode, self.device) for mode in modes)

    def _out_of_graphs(self, tensor: Tensor) -> Tensor:
        """``tensor`` (features, a loss), copied out of the CUDA graphs' memory when the encoder or
        the objective replays as CUDA graphs: a later replay (the mask step's, the next batch's)
        may overwrite the outputs of the last, and callbacks and logs receive and may keep these."""
        modes = (self.hparams["compile_encoder"], self.hparams["compile_objective"])
        return tensor.clone() if any(replays_as_cuda_graphs(mode, self.device) for mode in modes) else tensor

    def _loss(self, name: str) -> Any:
        """The objective's loss method ``name`` (one of :data:`OBJECTIVE_LOSSES`), compiled where
        ``compile_objective`` says so."""
        compiled = getattr(self, "_losses", None)
        return compiled[name] if compiled is not None else getattr(self.objective, name)

    @staticmethod
    def _params_of(optimizer: Any) -> list[nn.Parameter]:
        return [p for group in optimizer.param_groups for p in group["params"]]

    def _track_collapse(self, collapsed_fraction: Tensor, finite: Tensor) -> None:
        """Count (finite) steps where (nearly) every image has all but one mask empty."""
        collapsed = (collapsed_fraction >= 0.9) & finite
        self._collapse_steps = self._collapse_steps.to(collapsed_fraction.device) + collapsed.float()
        self._epoch_steps += 1

    def on_validation_epoch_start(self) -> None:
        """Raise on a non-finite batch not yet read back, before evaluating its weights."""
        self._failure.raise_if_any()

    def on_train_end(self) -> None:
        """Raise on a non-finite batch not yet read back."""
        self._failure.raise_if_any()

    def on_train_epoch_end(self) -> None:
        """Raise on a non-finite batch not yet read back; warn once if the masks collapsed to a
        single slot for a whole epoch."""
        self._failure.raise_if_any()
        steps, collapsed = self._epoch_steps, float(self._collapse_steps)
        self._epoch_steps, self._collapse_steps = 0, torch.zeros(())
        if steps and collapsed >= steps and not self._collapse_warned:
            self._collapse_warned = True
            rank_zero_warn(
                f"mask collapse: in every step of epoch {self.current_epoch} one slot covered (nearly) whole "
                f"images and the other {self.num_masks - 1} were empty. Raise sparsity_weight "
                f"(now {self.sparsity_weight}; try {max(2 * self.sparsity_weight, 0.5):g}) or lower mask_lr."
            )
