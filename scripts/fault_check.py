"""Inject faults into the library one at a time and check that the test suite catches each.

A suite that passes says little unless it fails when the code is wrong. Each fault in
:data:`FAULTS` is a small, plausible bug: a sign, a factor, an order, a threshold, a forgotten
step. For each, the script edits one place of one source file, runs the default test suite
(the files most likely to catch faults first, stopping at the first failure) and puts the file
back as it was. Every fault must make the suite fail; a fault the suite misses is a gap in the
tests. ``tests/test_fault_check.py`` checks that each fault still edits exactly one place of the
current code, so the list cannot go stale unnoticed.

Run from the repository root, on demand (tens of minutes on 2 CPU cores):

    python scripts/fault_check.py                  # every fault
    python scripts/fault_check.py --list           # what each fault does
    python scripts/fault_check.py mask_sign warmup # some of them

Each fault first runs, on its own, the test that caught it last (``scripts/fault_hints.json``,
updated by every run); only if that passes does the whole suite run. A hint that no longer
fails thus costs only its own test's time. ``--no-hints`` runs the whole suite for every fault.

The exit status is 0 when the suite caught every fault it ran, and 2 when the suite does not
collect on the unfaulted code (a broken environment would otherwise make every fault "caught").
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = "src/adios_pl/"

#: Test files run first: quick, and between them they check most of the library against
#: independent versions. The rest of the suite follows.
FIRST = [
    "test_exactness.py", "test_masks.py", "test_objectives.py", "test_optim.py", "test_batched_views.py", "test_data.py", "test_folder_scanning.py",
    "test_device_augment.py", "test_precision.py", "test_skip.py", "test_callbacks.py", "test_reliability.py",
    "test_checkpoints.py", "test_module.py", "test_distributed.py",
]
TIMEOUT_S = 900  # per fault: the whole default suite takes about 6 minutes on 2 CPU cores
#: The test that caught each fault last, by fault name (pytest node ids, relative to the root).
HINTS = ROOT / "scripts" / "fault_hints.json"
#: pytest's exit statuses that count a hint's run as the suite failing: tests failed (1), or the
#: run stopped on errors, such as a test file that no longer imports (2).
CAUGHT_BY_HINT = (1, 2)


@dataclass(frozen=True)
class Fault:
    """Replace ``old`` (found exactly once in ``path``) with ``new``."""

    name: str
    path: str  # relative to src/adios_pl/
    old: str
    new: str
    what: str


FAULTS = [
    # the mask penalties and the masking
    Fault("sparsity_unsymmetric", "penalties.py", "torch.minimum(a, 1.0 - a)", "a", "sparsity penalty without the symmetric form (negative at area 1)"),
    Fault("entropy_over_batch", "penalties.py", "areas.log_softmax(dim=1)", "areas.log_softmax(dim=0)", "area softmax over the batch instead of the slots"),
    Fault("area_is_max_row", "penalties.py", "return masks.mean(dim=(-2, -1))", "return masks.mean(dim=-1).amax(dim=-1)", "mask area as the fullest row's"),
    Fault("mask_keeps_slot", "masking.py", "return images * (1.0 - mask)", "return images * mask", "a masked view shows the slot instead of hiding it"),
    Fault("reversal_not_negated", "masking.py", "return -grad", "return grad", "the gradient reversal passes the gradient unchanged"),
    Fault("slot_never_last", "masking.py", "torch.randint(num_masks, ", "torch.randint(max(num_masks - 1, 1), ", "ADIOS-s never draws the last slot"),
    # the game
    Fault("mask_descends", "module.py", "self.manual_backward(-loss)", "self.manual_backward(loss)", "the mask generator descends the SSL loss"),
    Fault("penalty_not_batch_mean", "module.py", "penalty = sparsity_penalty(areas).sum(dim=0).sum() / batch",
          "penalty = sparsity_penalty(areas).sum(dim=0).sum()", "sparsity penalty summed over the batch"),
    Fault("entropy_sign", "module.py", "self.manual_backward(self.sparsity_weight * penalty - self.entropy_weight * entropy)",
          "self.manual_backward(self.sparsity_weight * penalty + self.entropy_weight * entropy)", "entropy term with the wrong sign"),
    Fault("clean_branch_no_backward", "module.py", "            torch.autograd.backward(tensors, grads)", "            pass",
          "the clean view's gradients never reach the encoder"),
    Fault("masks_not_detached", "module.py", "self._encoder_step(x1, x2, None if masks is None else masks.detach(), slots)",
          "self._encoder_step(x1, x2, masks, slots)", "the encoder step back-propagates into the mask generator"),
    Fault("clean_is_masked_view", "module.py", "self.objective.mask_both_views else [x1]", "self.objective.mask_both_views else [x2]",
          "the clean view is views[1]"),
    Fault("baseline_one_view", "module.py", "            yield [x2]\n", "            yield [x1]\n", "the baseline compares views[0] with itself"),
    Fault("mask_step_first", "module.py",
          "        grad_norms = {\"encoder gradient norm\": self._step_encoder(optimizers[0], step)}\n"
          "        if self.learned_masks:\n            assert masks is not None\n"
          "            logs.update(self._mask_step(x1, x2, masks, slots, optimizers[1]))\n",
          "        if self.learned_masks:\n            assert masks is not None\n"
          "            logs.update(self._mask_step(x1, x2, masks, slots, optimizers[1]))\n"
          "        grad_norms = {\"encoder gradient norm\": self._step_encoder(optimizers[0], step)}\n"
          "        if self.learned_masks:\n",
          "the mask step sees the encoder before its update"),
    Fault("schedules_frozen", "module.py", "        for scheduler in schedulers:\n            scheduler.step()", "        for scheduler in schedulers:\n            pass",
          "the learning-rate schedules never advance"),
    Fault("gradients_accumulate", "module.py", "        optimizer.zero_grad(set_to_none=True)\n        return norm", "        return norm",
          "gradients are never cleared"),
    Fault("encoder_not_frozen", "module.py", "        self.toggle_optimizer(mask_opt)  #", "        pass  #", "the mask step also writes the encoder's gradients"),
    Fault("skip_keeps_batch", "module.py", "            snapshot.restore_unless(ok)", "            pass", "nonfinite=\"skip\" keeps a non-finite batch's update"),
    Fault("slots_same_on_all_ranks", "module.py", "self._slot_generator.manual_seed((torch.initial_seed() + 1_000_003 * self.global_rank) % 2**63)",
          "self._slot_generator.manual_seed((torch.initial_seed()) % 2**63)", "every rank draws the same ADIOS-s slots"),
    Fault("slots_not_resumed", "module.py", "            self._slot_generator.set_state(self._slot_state)\n", "            pass\n",
          "a resumed run draws other ADIOS-s slots"),
    Fault("collapse_threshold", "module.py", "(second < 0.02)", "(second < 0.2)", "collapsed-fraction threshold 20 % instead of 2 %"),
    Fault("buffers_not_broadcast", "module.py", "        broadcast_buffers(self.buffers())\n", "\n", "batch-norm statistics drift apart between ranks"),
    Fault("gradients_summed", "distributed.py", "        flat.div_(world)\n", "\n", "gradients summed over ranks, not averaged"),
    # the objectives
    Fault("simclr_self_positive", "objectives/simclr.py", 'sim_00 = (z0 @ all0.T / temperature).masked_fill(itself, float("-inf"))',
          "sim_00 = (z0 @ all0.T / temperature)", "NT-Xent counts each sample as its own negative"),
    Fault("simclr_terms_mean", "objectives/simclr.py", "return loss * terms if terms > 1 else loss", "return loss", "the N batched terms averaged, not summed"),
    Fault("simclr_no_temperature", "objectives/simclr.py", "sim_10 = z1 @ all0.T / temperature", "sim_10 = z1 @ all0.T", "one similarity block without the temperature"),
    Fault("simclr_local_negatives", "objectives/simclr.py", "if gather_distributed and dist.world_size() > 1:", "if False:",
          "negatives from the own rank only under DDP"),
    Fault("byol_updates_at_first_batch", "objectives/byol.py", "        if step == 0:\n            return\n", "",
          "a momentum update after the first batch"),
    Fault("byol_tau_inverted", "objectives/byol.py", "update_momentum(encoder, self.momentum_encoder, m=self.tau)",
          "update_momentum(encoder, self.momentum_encoder, m=1 - self.tau)", "momentum 1 - tau"),
    Fault("byol_one_sided", "objectives/byol.py", 'byol_loss(clean["p"], masked["z_bar"]) + byol_loss(masked["p"], clean["z_bar"])',
          '2 * byol_loss(clean["p"], masked["z_bar"])', "BYOL's loss one way only"),
    Fault("byol_tau_early", "objectives/byol.py", "k = min(max(step - 1, 0), total_steps)", "k = min(max(step, 0), total_steps)",
          "tau of the current batch instead of the last"),
    Fault("byol_projector_frozen", "objectives/byol.py", "        update_momentum(self.projector, self.momentum_projector, m=self.tau)\n", "\n",
          "the momentum projector never moves"),
    Fault("simsiam_not_halved", "objectives/simsiam.py", 'return 0.5 * (simsiam_loss(clean["p"], masked["z"]) + simsiam_loss(masked["p"], clean["z"]))',
          'return (simsiam_loss(clean["p"], masked["z"]) + simsiam_loss(masked["p"], clean["z"]))', "SimSiam's pair loss twice as large"),
    Fault("simsiam_symmetry_pairs", "objectives/simsiam.py", "            pairs += [(c2, m1), (c1, m2)]", "            pairs += [(c1, m1), (c2, m2)]",
          "use_symmetry_mask pairs each view with its own masked copy"),
    # optimisers and schedules
    Fault("warmup_from_zero", "optim.py", "        return (step + 1) / warmup_steps", "        return step / warmup_steps", "the warm-up starts at rate 0"),
    Fault("lars_unclipped", "optim.py", "    return torch.clamp(scale / lr, max=1.0) if lr > 0 else torch.ones_like(scale)\n",
          "    return scale / lr if lr > 0 else torch.ones_like(scale)\n", "LARS's trust ratio not clipped"),
    Fault("lars_foreach_unclipped", "optim.py", "                scale = _clipped(scale, lr)\n            # As",
          "                scale = scale / lr\n            # As", "the multi-tensor LARS's trust ratio not clipped"),
    Fault("lars_tensor_rate_unclipped", "optim.py", "        return torch.where(lr > 0, torch.clamp(scale / lr, max=1.0), 1.0)\n",
          "        return torch.where(lr > 0, scale / lr, 1.0)\n", "LARS's trust ratio not clipped under a tensor rate (compile_optimizers)"),
    Fault("lars_scales_biases", "optim.py", '            if p.ndim != 1 or not group["exclude_bias_n_norm"]:', "            if True:",
          "LARS scales and decays biases and norm weights"),
    Fault("epoch_warmup_too_slow", "optim.py", "return start_factor + epoch * (1.0 - start_factor) / max(1, warmup_epochs - 1)",
          "return start_factor + epoch * (1.0 - start_factor) / max(1, warmup_epochs)", "the per-epoch warm-up reaches 1 an epoch late"),
    # the mask generators
    Fault("masks_not_softmax", "masks.py", "return self.logits(images).softmax(dim=1)", "return self.logits(images).sigmoid()", "masks that do not sum to 1"),
    Fault("unet_bilinear_down", "masks.py", 'x = F.interpolate(x, scale_factor=0.5, mode="nearest")', 'x = F.interpolate(x, scale_factor=0.5, mode="bilinear")',
          "bilinear down-sampling in the U-Net"),
    Fault("unet_skip_first", "masks.py", "x = block(torch.cat([x, skips[i]], dim=1))", "x = block(torch.cat([skips[i], x], dim=1))",
          "the U-Net's skip concatenated before the features"),
    Fault("random_patches_unbalanced", "masks.py", "return (rank * self.num_masks // g2).view(batch, self.cells, self.cells)",
          "return (rank * self.num_masks // (g2 + 3)).view(batch, self.cells, self.cells)", "random patches dealt unevenly"),
    # batched views
    Fault("running_stats_reversed", "batched_views.py", "weights = torch.tensor([momentum * (1 - momentum) ** (views - 1 - v) for v in range(views)]",
          "weights = torch.tensor([momentum * (1 - momentum) ** v for v in range(views)]", "grouped batch norm weighs the views' statistics in reverse"),
    Fault("batches_tracked_once", "batched_views.py", "            layer.num_batches_tracked.add_(self.views)  # once", "            layer.num_batches_tracked.add_(1)  # once",
          "num_batches_tracked advances once for all views"),
    Fault("bn_grad_mean", "batched_views.py", ".unflatten(0, (2, views)).sum(1)", ".unflatten(0, (2, views)).mean(1)",
          "batch-norm parameter gradients averaged over views"),
    # evaluation
    Fault("knn_temperature_inverted", "metrics.py", "(sim / temperature).exp()", "(sim * temperature).exp()", "kNN votes weighted by sim * T"),
    Fault("knn_half_k", "metrics.py", "sim, idx = (q @ bank.T).topk(k, dim=1)", "sim, idx = (q @ bank.T).topk(max(k // 2, 1), dim=1)", "kNN with k / 2 neighbours"),
    Fault("probe_keeps_skipped_batch", "callbacks/linear_probe.py", "            snapshot.restore_unless(finite)  # type: ignore[arg-type]", "            pass",
          "the online probe trains on a skipped batch"),
    # augmentation
    Fault("crop_scale_halved", "data/device_augment.py", "target = area * (target * (scale[1] - scale[0]) + scale[0])",
          "target = area * (target * (scale[1] - scale[0]) / 2 + scale[0])", "device crops from half the scale range"),
    Fault("crop_last_fit", "data/device_augment.py", "first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)",
          "first = fits.to(torch.uint8).flip(1).argmax(dim=1, keepdim=True)", "device crop picks another attempt than the first fit"),
    Fault("blur_sigma_range", "data/device_augment.py", 'sigma = u("sigma")[:, 0] * 1.9 + 0.1', 'sigma = u("sigma")[:, 0] * 0.9 + 0.1', "device blur sigma in [0.1, 1)"),
    Fault("solarise_threshold", "data/device_augment.py", "(x >= 128 / 255)", "(x >= 100 / 255)", "device solarisation threshold 100"),
    Fault("hue_one_sided", "data/device_augment.py", '(draws[:, DRAW_COLUMNS["hue"]] * (2 * h) - h)', '(draws[:, DRAW_COLUMNS["hue"]] * h)',
          "device hue shifts in [0, h] only"),
    Fault("jitter_fixed_order", "data/device_augment.py", 'order = draws[:, DRAW_COLUMNS["order"]].argsort(dim=1)',
          'order = draws[:, DRAW_COLUMNS["order"]].argsort(dim=1).sort(dim=1).values', "device colour jitter in a fixed order"),
    Fault("device_not_divided_by_std", "data/device_augment.py", "        return (x - self.mean) / self.std\n", "        return x - self.mean\n",
          "device views not divided by the std"),
    Fault("gray_weights_equal", "data/device_augment.py", "GRAY_WEIGHTS = (0.2989, 0.587, 0.114)", "GRAY_WEIGHTS = (0.333, 0.333, 0.334)",
          "grayscale as the plain channel mean"),
    Fault("cpu_blur_kernel", "data/transforms.py", "kernel = max(3, (image_size // 10) | 1)", "kernel = max(3, (image_size // 5) | 1)",
          "CPU blur kernel a fifth of the image"),
    Fault("cpu_solarise_threshold", "data/transforms.py", "T.RandomSolarize(threshold=128,", "T.RandomSolarize(threshold=200,", "CPU solarisation threshold 200"),
    Fault("cpu_crop_bilinear", "data/transforms.py",
          "T.RandomResizedCrop(image_size, scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC",
          "T.RandomResizedCrop(image_size, scale=(min_scale, 1.0), interpolation=InterpolationMode.BILINEAR", "bilinear pretraining crops"),
    Fault("eval_crop_above_96", "data/transforms.py", "crop = image_size >= 96 if crop is None else crop", "crop = image_size > 96 if crop is None else crop",
          "96 px evaluation images squashed instead of centre-cropped"),
    Fault("device_crops_same_on_all_ranks", "data/base.py", 'self._augmentation_seed = (torch.initial_seed(), int(getattr(trainer, "global_rank", 0)))',
          "self._augmentation_seed = (torch.initial_seed(), 0)", "every rank draws the same device crops"),
    Fault("val_loaders_swapped", "data/base.py", "for dataset in (self.eval_set, self.bank_set):", "for dataset in (self.bank_set, self.eval_set):",
          "validation loader 0 is the kNN bank, 1 the evaluation split"),
    Fault("train_keeps_last_batch", "data/resumable.py", "super().__init__(dataset, sampler=sampler, drop_last=True, **kwargs)",
          "super().__init__(dataset, sampler=sampler, drop_last=False, **kwargs)", "a partial last training batch"),
    # the mask baselines and the mask-quality scores
    Fault("block_quota_small", "masks.py", "target = g * g // n\n", "target = g * g // (n + 1)\n", "random blocks take too few cells, the last slot the rest"),
    Fault("block_square_only", "masks.py", "aspect = torch.exp(low + self._rand(batch, device=device) * (high - low))",
          "aspect = self._rand(batch, device=device) * 0 + 1", "random blocks always square"),
    Fault("fg_ari_with_background", "metrics.py", "        fg = t != 0\n", "        fg = t >= 0\n", "foreground ARI scores the background too"),
    Fault("mbo_mean_not_best", "metrics.py", "best.append((inter / union).max())", "best.append((inter / union).mean())",
          "mean best overlap averages over segments instead of taking the best"),
    Fault("mask_picture_shows_kept", "callbacks/masks.py", "hidden = pictures.unsqueeze(1) * (1 - masks.unsqueeze(2)) + fill * masks.unsqueeze(2)",
          "hidden = pictures.unsqueeze(1) * masks.unsqueeze(2) + fill * (1 - masks.unsqueeze(2))", "mask pictures hide the kept part"),
    # online and offline evaluation
    Fault("knn_top5_is_top1", "callbacks/knn.py", "correct[:, :1].any(1).sum(), correct.any(1).sum()]",
          "correct[:, :1].any(1).sum(), correct[:, :1].any(1).sum()]", "val/knn_top5 counts top-1 hits"),
    Fault("knn_unlabelled_queries_scored", "callbacks/knn.py", "        queries, query_targets = queries[keep], query_targets[keep]\n", "\n",
          "unlabelled evaluation images count as kNN misses"),
    Fault("knn_ranks_score_one_share", "callbacks/knn.py", "mine = slice(rank * share, (rank + 1) * share)", "mine = slice(0, share)",
          "under DDP every rank scores the first share of the queries"),
    Fault("gather_blocked_order", "distributed.py", "stacked = torch.stack(_all_gather(tensor), dim=1)  # (n, W, ...)", "stacked = torch.stack(_all_gather(tensor), dim=0)  # (n, W, ...)",
          "gathered rows rank by rank instead of in dataset order"),
    Fault("probe_gathers_through_lightning", "callbacks/linear_probe.py", "        features, targets = gather_rows(features), gather_rows(targets)\n",
          "        if torch.distributed.is_available() and torch.distributed.is_initialized():\n"
          "            features, targets = pl_module.all_gather(features).flatten(0, 1), pl_module.all_gather(targets).flatten(0, 1)\n",
          "the online probe gathers through Lightning's all_gather, which warns of a deprecated torch collective in every process"),
    Fault("probe_unlabelled_in_loss", "callbacks/linear_probe.py", "loss = (per_image * labelled).sum() / labelled.sum().clamp(min=1)",
          "loss = per_image.mean()", "the online probe trains on unlabelled images as class 0"),
    Fault("probe_not_gathered", "callbacks/linear_probe.py", "        features, targets = gather_rows(features), gather_rows(targets)\n", "",
          "under DDP the online probe's features are not gathered"),
    Fault("probe_no_lr_decay", "evaluation.py", "opt = _probe_optimizer(optimizer, head, lr, weight_decay)\n    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(0.6 * epochs), int(0.8 * epochs)], gamma=0.1)",
          "opt = _probe_optimizer(optimizer, head, lr, weight_decay)\n    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(0.6 * epochs), int(0.8 * epochs)], gamma=1.0)",
          "the offline probe's rate never decays"),
    Fault("probe_scores_unlabelled", "evaluation.py", "        keep = test_targets >= 0\n        return float((head(test_features",
          "        keep = test_targets >= -1\n        return float((head(test_features", "unlabelled evaluation images count as probe misses"),
    Fault("extract_leaves_eval", "evaluation.py", "    with eval_mode(encoder):\n        for batch in loader:", "    with eval_mode(encoder.eval()):\n        for batch in loader:",
          "feature extraction leaves the encoder in eval mode"),
    # checkpoints, resuming and export
    Fault("checkpoint_loads_code", "checkpoint.py", "weights_only=True if weights_only is None else weights_only",
          "weights_only=False if weights_only is None else weights_only", "checkpoints loaded with pickle's code by default"),
    Fault("live_temporaries_removed", "checkpoint.py", "            os.kill(int(pid), 0)\n", "            raise ProcessLookupError\n",
          "a running process's temporary checkpoint is removed"),
    Fault("cli_checkpoint_drops_parts", "module.py", '        if "_instantiator" in self.hparams:\n            self.save_hyperparameters()\n',
          '        if False:\n            self.save_hyperparameters()\n',
          "a checkpoint of adios-pl fit loses its objective's and mask generator's config; load_from_checkpoint builds defaults"),
    Fault("loaded_model_forgets_its_config", "module.py", '        if "_instantiator" in saved:', "        if False:",
          "a model loaded from a command-line checkpoint drops the parts' config, so its own checkpoints need them passed"),
    Fault("script_parts_not_saved", "module.py", "        elif modules and None not in", "        elif False and None not in",
          "a script's checkpoint keeps no config of the library's objective it was given, so loading asks for it"),
    Fault("load_imports_class_paths", "checkpoint.py", "if module and module not in sys.modules:", "if False:",
          "load_from_checkpoint imports the modules a checkpoint names"),
    Fault("load_defaults_missing_modules", "checkpoint.py", "    if missing:\n        raise ConfigurationError(", "    if False:\n        raise ConfigurationError(",
          "load_from_checkpoint builds the default objective where a script's checkpoint holds none"),
    Fault("resume_keeps_saved_rate", "resume.py", "group[\"lr\"] = group[\"lr\"] * (base / old if old else 1.0)", "group[\"lr\"] = group[\"lr\"]",
          "a changed lr does not take effect on resume"),
    Fault("resume_mask_lr_is_lr", "resume.py", "base = lr if index == 0 else mask_lr", "base = lr", "on resume the mask generator gets the encoder's lr"),
    Fault("resume_keeps_weight_decay", "resume.py", "            group[\"weight_decay\"] = weight_decay\n", "\n",
          "a changed weight decay does not take effect on resume"),
    Fault("export_keeps_prefix", "export.py", "{k[len(ENCODER_PREFIX):]: v", "{k: v", "exported keys keep the 'encoder.' prefix"),
    Fault("global_step_counts_both", "step_counting.py", "for opt in optimizers[1:]:", "for opt in optimizers[2:]:",
          "global_step advances for both players' steps"),
    # non-finite handling
    Fault("finite_if_any_rank", "nonfinite.py", "op=torch.distributed.ReduceOp.MIN", "op=torch.distributed.ReduceOp.MAX",
          "a batch counts as finite when one rank's is"),
    Fault("skip_keeps_new_state", "nonfinite.py", "old = before if isinstance(before, Tensor) else torch.zeros_like(value)",
          "old = before if isinstance(before, Tensor) else value", "a skipped first batch keeps its new optimiser state"),
    Fault("failure_records_last", "nonfinite.py", "first = (~ok) & (self.step < 0)", "first = ~ok", "the last non-finite batch is named instead of the first"),
    Fault("last_finite_overwritten", "nonfinite.py", "self.last_finite = torch.where(ok, stacked, self.last_finite)", "self.last_finite = stacked",
          "the last finite values include non-finite ones"),
    Fault("gradient_norm_l1", "nonfinite.py", "torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())",
          "torch.stack(torch._foreach_norm(grads)).float().sum()", "the gradient norm sums the per-tensor norms"),
    # encoders and synchronised batch norm
    Fault("cifar_stem_below_64", "encoders.py", "    if image_size <= CIFAR_STEM_MAX_SIZE:\n", "    if image_size < CIFAR_STEM_MAX_SIZE:\n",
          "64 px ResNets get the ImageNet stem"),
    Fault("vit_patch_8", "encoders.py", "patch_size = 4 if image_size <= CIFAR_STEM_MAX_SIZE else 16", "patch_size = 8 if image_size <= CIFAR_STEM_MAX_SIZE else 16",
          "ViT patch 8 on small images"),
    Fault("syncbn_biased_running_var", "sync_batch_norm.py", "(var * total / (total - 1))", "var", "synchronised running variance not unbiased"),
    Fault("syncbn_no_mean_spread", "sync_batch_norm.py", "(invstds.pow(-2) - eps + (means - mean).pow(2))", "(invstds.pow(-2) - eps)",
          "synchronised variance leaves out the spread of the ranks' means"),
    Fault("syncbn_local_input_grad", "sync_batch_norm.py", "            dist.all_reduce(sums, group=ctx.group)\n", "\n",
          "synchronised batch norm's input gradient from the local batch only"),
    # augmentation settings that must reach both pipelines
    Fault("cpu_flip_prob_fixed", "data/transforms.py", "T.RandomHorizontalFlip(p=flip_prob)", "T.RandomHorizontalFlip(p=0.5)",
          "the CPU pipeline flips half the views whatever flip_prob says"),
    Fault("cpu_grayscale_prob_fixed", "data/transforms.py", "T.RandomGrayscale(p=grayscale_prob)", "T.RandomGrayscale(p=0.2)",
          "the CPU pipeline's grayscale rate fixed at 0.2"),
    Fault("cpu_jitter_strengths_swapped", "data/transforms.py", "T.ColorJitter(brightness, contrast, saturation, hue)",
          "T.ColorJitter(brightness, saturation, contrast, hue)", "the CPU pipeline swaps the contrast and saturation strengths"),
    Fault("cpu_blur_prob_fixed", "data/transforms.py", "T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_prob)",
          "T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5)", "the CPU pipeline blurs half the views whatever blur_prob says"),
    Fault("device_flip_prob_fixed", "data/device_augment.py", '_chance(u("flip"), self.flip_prob)', '_chance(u("flip"), 0.5)',
          "the device pipeline flips half the views whatever flip_prob says"),
    Fault("device_jitter_prob_fixed", "data/device_augment.py", '_chance(u("jitter"), self.jitter_prob)', '_chance(u("jitter"), 0.8)',
          "the device pipeline's jitter rate fixed at 0.8"),
    Fault("device_solarise_prob_is_blur", "data/device_augment.py", '_chance(u("solarize"), self.solarization_prob)',
          '_chance(u("solarize"), self.blur_prob)', "the device pipeline solarises at blur_prob"),
    Fault("device_jitter_strengths_swapped", "data/device_augment.py",
          'self.jitter = {"brightness": brightness, "contrast": contrast, "saturation": saturation, "hue": hue}',
          'self.jitter = {"brightness": brightness, "contrast": saturation, "saturation": contrast, "hue": hue}',
          "the device pipeline swaps the contrast and saturation strengths"),
    Fault("device_blur_kernel", "data/device_augment.py", "self.blur_kernel = max(3, (image_size // 10) | 1)",
          "self.blur_kernel = max(3, (image_size // 5) | 1)", "the device blur kernel a fifth of the image, not a tenth"),
    Fault("datamodule_drops_probabilities", "data/base.py",
          "return dict(min_scale=self.min_scale, blur_prob=self.blur_prob, **self.jitter, **self.probabilities)",
          "return dict(min_scale=self.min_scale, blur_prob=self.blur_prob, **self.jitter)",
          "a DataModule's flip, grayscale, jitter and solarisation probabilities never reach its pipelines"),
    Fault("datamodule_ignores_blur_prob", "data/base.py", "self.blur_prob = self.default_blur_prob if blur_prob is None else blur_prob",
          "self.blur_prob = self.default_blur_prob", "a DataModule's blur_prob is replaced by the dataset default"),
    # image folders, Shapes
    Fault("split_ignores_seed", "data/folder.py", "torch.Generator().manual_seed(seed)", "torch.Generator().manual_seed(0)",
          "the held-out split is the same whatever the seed"),
    Fault("split_overlaps", "data/folder.py", "return sorted(order[k:]), sorted(order[:k])", "return sorted(order[max(k - 1, 0):]), sorted(order[:k])",
          "one held-out image is also a training image"),
    Fault("given_classes_renumbered", "data/folder.py", "target = index if given else len(kept)", "target = len(kept)",
          "a val_dir without one of the classes shifts the labels of the classes after it"),
    Fault("dark_16_bit_as_8_bit", "data/folder.py", "top = 65535.0 if sixteen or peak > 255 else 255.0",
          "top = 65535.0 if peak > 255 else 255.0", "a dark 16-bit image is read as 8-bit (bright)"),
    Fault("png_16_bit_by_mode_only", "data/folder.py", 'sixteen = image.mode.startswith("I;16") or image.format == "PNG"',
          'sixteen = image.mode.startswith("I;16")', 'a dark 16-bit PNG that Pillow before 10.3 opens as "I" is read as 8-bit'),
    Fault("val_system_folders_are_classes", "data/folder.py",
          "val_classes = sorted(e.name for e in os.scandir(self.val_dir) if e.is_dir() and not _is_system(e.name))",
          "val_classes = sorted(e.name for e in os.scandir(self.val_dir) if e.is_dir())", "hidden and system folders in val_dir count as classes"),
    Fault("colour_shuffle_inverted", "data/shapes.py", "if float(torch.rand(())) >= self.p:", "if float(torch.rand(())) < self.p:",
          "Shapes' colour shuffle applies with probability 1 - p"),
    # mask quality, the collapse warning, the evaluation epochs, the command line
    Fault("mask_quality_random_is_learned", "callbacks/masks.py", "foreground_ari(random, segmentation)", "foreground_ari(pred, segmentation)",
          "the random-patch baseline scores the learned masks"),
    Fault("mask_quality_names_swapped", "callbacks/masks.py", 'SCORES = ("mask_fg_ari", "mask_mbo", "mask_fg_ari_random", "mask_ari", "mask_sc")',
          'SCORES = ("mask_mbo", "mask_fg_ari", "mask_fg_ari_random", "mask_ari", "mask_sc")', "foreground ARI and mean best overlap logged under each other's names"),
    Fault("collapse_threshold_half", "module.py", "collapsed = (collapsed_fraction >= 0.9) & finite", "collapsed = (collapsed_fraction >= 0.5) & finite",
          "a step counts as collapsed when half the images are"),
    Fault("collapse_warned_after_one_step", "module.py", "if steps and collapsed >= steps and not self._collapse_warned:",
          "if steps and collapsed >= 1 and not self._collapse_warned:", "the collapse warning after one collapsed step, not a whole epoch"),
    Fault("every_n_epochs_off_by_one", "callbacks/base.py", "trainer.current_epoch % self.every_n_epochs == 0",
          "(trainer.current_epoch + 1) % self.every_n_epochs == 0", "every_n_epochs=2 evaluates epochs 1, 3, ... instead of 0, 2, ..."),
    Fault("sanity_check_evaluated", "callbacks/base.py", "return not trainer.sanity_checking and trainer.current_epoch",
          "return trainer.current_epoch", "the evaluation callbacks run in the sanity check too"),
    Fault("cli_image_size_unlinked", "cli.py", '        parser.link_arguments("data.init_args.image_size", "model.image_size")\n', "        pass\n",
          "the command line does not pass the data's image size to the model"),
    Fault("cli_shows_lightning_internal_warnings", "cli.py", "    hide_lightning_internal_warnings()\n", "",
          "adios-pl prints Lightning's warning about its own use of a deprecated torch API"),
    Fault("cli_gpu_error_without_hint", "cli.py", 'return f"{message} ({hints[0]})" if hints else message', "return message",
          "a GPU config on a machine without one fails with Lightning's words only, not what to pass instead"),
    Fault("unlabelled_folder_silent", "data/folder.py", "        if not labelled:\n            rank_zero_warn(", "        if False:\n            rank_zero_warn(",
          "an image folder without class folders trains with nothing to evaluate and says nothing of it"),
    Fault("timm_encoder_without_hint", "encoders.py", 'hint = "; for a timm model, create it with num_classes=0" if hasattr(encoder, "reset_classifier") else ""',
          'hint = ""', "a timm encoder that ends in its classifier is refused without saying how to make it without"),
    Fault("mask_pictures_only_to_tensorboard", "callbacks/masks.py", 'elif callable(log_image := getattr(logger, "log_image", None)):', "elif False:",
          "the mask pictures reach TensorBoard only, not a W&B logger"),
    Fault("cli_drops_why_a_class_failed", "cli.py", 'failed = [_chained_reason(error, c) for c in causes if c.startswith("Problem with given class_path")]',
          "failed: list[str] = []", "a class that fails to build on the command line is one line without its reason"),
    Fault("ari_on_foreground_only", "metrics.py", "scores = [adjusted_rand_score(p, t).float().cpu() for p, t in zip(pred.flatten(1), true.flatten(1))]",
          "scores = [adjusted_rand_score(p[t != 0], t[t != 0]).float().cpu() for p, t in zip(pred.flatten(1), true.flatten(1))]",
          "the full-image ARI leaves the background out"),
    Fault("covering_unweighted", "metrics.py", "weighted.append((sizes * best).sum() / sizes.sum() if len(best)", "weighted.append(best.mean() if len(best)",
          "segmentation covering ignores the objects' sizes"),
    Fault("predict_silent_about_its_files", "callbacks/features.py", "            rank_zero_info(", "            (lambda *_: None)(",
          "adios-pl predict writes the features without saying where"),
    # offline evaluation, written features, the torchvision DataModules, loaders, checks, pictures, the demo
    Fault("evaluate_fits_on_eval_split", "evaluation.py", "train_x, train_y = extract_features(encoder, loaders[1], device)",
          "train_x, train_y = extract_features(encoder, loaders[0], device)", "the offline probe and kNN fit on the evaluation split"),
    Fault("evaluate_knn_default_temperature", "evaluation.py", "num_classes, k, temperature)}", "num_classes, k)}",
          "the offline kNN ignores the temperature it is given"),
    Fault("augmented_probe_encoder_training", "evaluation.py", "    with eval_mode(encoder):\n        for _ in range(epochs):", "    with torch.enable_grad():\n        for _ in range(epochs):",
          "the augmented probe runs the encoder in training mode (batch statistics, running stats changed)"),
    Fault("augmented_probe_no_flip", "evaluation.py", "T.RandomHorizontalFlip(), T.ToDtype", "T.ToDtype",
          "the augmented probe's training images are never flipped"),
    Fault("features_last_batch_only", "callbacks/features.py", 'torch.cat([o["features"].cpu() for o in outputs])',
          'torch.cat([o["features"].cpu() for o in outputs[-1:]])', "written features keep the last batch only"),
    Fault("feature_indices_batches_reversed", "callbacks/features.py", "flat = [i for batch in indices for i in batch]",
          "flat = [i for batch in indices[::-1] for i in batch]", "written indices list the batches in reverse order"),
    Fault("stl10_eval_cropped", "data/torchvision_sets.py", "crop=False)", "crop=True)",
          "STL10's evaluation images are centre-cropped instead of resized whole"),
    Fault("stl10_bank_is_pretrain_set", "data/torchvision_sets.py", "self.pretrain_set, self.eval_set, self.bank_set = pretrain, test, train",
          "self.pretrain_set, self.eval_set, self.bank_set = pretrain, test, pretrain", "STL10's kNN bank includes the unlabelled images"),
    Fault("cifar100_with_cifar10_statistics", "data/torchvision_sets.py", "default_mean = CIFAR100_MEAN", "default_mean = CIFAR10_MEAN",
          "CIFAR-100 is normalised with CIFAR-10's mean"),
    Fault("batch_check_ignores_world", "data/base.py", "if n // world < self.batch_size:", "if n < self.batch_size:",
          "the batch-size check counts every device's images as one device's"),
    Fault("pin_memory_on_cpu", "data/base.py", 'return accelerator == "CUDAAccelerator"', "return True",
          "loaders pin host memory when training on the CPU"),
    Fault("eval_loaders_shuffled", "data/base.py", "            shuffle=False,\n            drop_last=False,",
          "            shuffle=True,\n            drop_last=False,", "the evaluation loaders shuffle their images"),
    Fault("stored_size_ignored", "data/base.py", "size = self.stored_size or self.image_size", "size = self.image_size",
          "augment_on='device' stores images at image_size whatever stored_size says"),
    Fault("mask_sum_unchecked", "checks.py", "torch.ones_like(masks[:, 0]), atol=1e-3)", "torch.ones_like(masks[:, 0]), atol=1e3)",
          "a mask generator whose masks do not sum to 1 is accepted"),
    Fault("view_size_unchecked", "checks.py", "tuple(x1.shape[1:]) != (3, image_size, image_size)", "x1.shape[1] != 3",
          "training views of another size than image_size are accepted"),
    Fault("mask_picture_first_images", "callbacks/masks.py", "torch.linspace(0, n - 1, min(self.num_images, n)).round().long()",
          "torch.arange(min(self.num_images, n))", "the mask picture shows the split's first images, not images spread over it"),
    Fault("demo_speed_counts_views", "demo.py", "self.images += len(batch[1])", "self.images += len(batch[0])",
          "the demo's images/s counts the two views of a batch, not its images"),
    Fault("demo_random_baseline_is_learned", "demo.py", 'result["random_patch_fg_ari"] = float(foreground_ari(random, segmentations)',
          'result["random_patch_fg_ari"] = float(foreground_ari(predicted, segmentations)', "the demo's random-patch baseline scores the learned masks"),
    Fault("image_32_bit_clipped", "data/folder.py", "                    if peak > 65535:\n                        top = 2.0**31 - 1\n", "",
          "a 32-bit integer image with values above 16 bits is clipped to white"),
    # the resumable training loader
    Fault("train_batches_not_counted", "data/base.py", "            self._train_loader.count_batch()\n", "            pass\n",
          "the training loader's state never counts the batches trained on (a mid-epoch resume repeats them)"),
    Fault("loader_state_dropped", "data/base.py", 'self._train_loader_state = state_dict.get("train_loader")',
          "self._train_loader_state = None", "the DataModule drops the loader state of the checkpoint it resumes from"),
    Fault("resumed_epoch_set_late", "data/resumable.py", "        self.sampler.set_epoch(epoch)\n", "",
          "the resumed epoch is set only by Lightning, after loader workers drew epoch 0's order"),
    Fault("resume_skips_every_epoch", "data/resumable.py", "if self._resume is not None and self._resume[0] == self.epoch else 0",
          "if self._resume is not None else 0", "every epoch after a resume skips the resumed epoch's first images"),
    Fault("epoch_end_state_resumes_its_epoch", "data/resumable.py", 'if done >= int(state["epoch_images"]):',
          'if done > int(state["epoch_images"]):', "a checkpoint written at an epoch's end resumes that epoch, not the next"),
    Fault("train_loader_not_sharded", "data/base.py", 'num_replicas=int(shares.get("num_replicas", 1)), rank=int(shares.get("rank", 0))',
          "num_replicas=1, rank=0", "under DDP every process trains on the whole dataset"),
    Fault("resume_ignores_limit_train_batches", "data/base.py", "            self._train_loader.batches_per_epoch = limit\n", "            pass\n",
          "an epoch ended early by limit_train_batches=N counts as part-way, so the next resumes wrongly"),
    Fault("resume_ignores_a_batch_fraction", "data/base.py", "elif isinstance(limit, float) and limit < 1.0:", "elif False:",
          "an epoch ended early by a fraction limit_train_batches counts as part-way"),
    Fault("device_views_not_reseeded", "data/base.py", "        if loader is not None and loader.batch_size and generator is not None:",
          "        if False:", "device augmentation draws on from one generator, so a resumed run makes other views"),
    Fault("device_seed_ignores_the_epoch", "data/base.py", "batch_seed(*self._augmentation_seed, loader.sampler.epoch, index)",
          "batch_seed(*self._augmentation_seed, index)", "device augmentation repeats its draws for a batch position every epoch"),
    Fault("train_order_ignores_the_seed", "data/base.py", "seed=lightning_seed(), with_seeds", "seed=0, with_seeds",
          "the training order ignores seed_everything's seed"),
    # host augmentation's per-image seeds
    Fault("host_seed_ignores_the_epoch", "data/resumable.py", "(index, (self.seed, self.epoch, position))", "(index, (self.seed, position))",
          "host augmentation repeats an image position's views every epoch"),
    Fault("host_seed_ignores_the_rank", "data/resumable.py", "range(self.rank + start * self.num_replicas,",
          "range(start * self.num_replicas,", "under DDP the processes' items share positions, so their draws coincide"),
    Fault("host_seed_ignores_the_resume", "data/resumable.py", "range(self.rank + start * self.num_replicas,",
          "range(self.rank,", "a resumed epoch's items take the keys of the epoch's first items (other views than a straight run's)"),
    Fault("host_worker_not_seeded", "data/resumable.py", "    def _fetch(self, index: int, seed: int) -> Any:\n",
          "    def _fetch(self, index: int, seed: int) -> Any:\n        if get_worker_info() is not None:\n            return self.dataset[index]\n",
          "in loader workers the items draw from the worker's generators (views depend on the workers)"),
    Fault("host_python_not_seeded", "data/resumable.py", "        random.seed(seed)\n", "",
          "Python's generator is not seeded (a transform that draws from random differs between workers and runs)"),
    Fault("host_seed_clobbers_main_generators", "data/resumable.py", "    with torch.random.fork_rng(devices=[]):\n",
          "    with contextlib.nullcontext():\n",
          "with num_workers=0 loading leaves torch's generator seeded by the last image (training's draws repeat)"),
    Fault("host_numpy_not_seeded", "data/resumable.py", "        np.random.seed(seed % 2**32)\n", "",
          "numpy's global generator is not seeded (a transform that draws from it differs between workers and runs)"),
    Fault("host_seed_clobbers_numpy", "data/resumable.py", "            np.random.set_state(numpy_state)\n", "",
          "with num_workers=0 loading leaves numpy's generator seeded by the batch's last image"),
    Fault("pending_loader_state_outlives_the_fit", "data/base.py", '        if stage == "fit":\n            self._train_loader_state = None\n', "",
          "a state restored after the loader was made stays pending: the DataModule's next fit resumes from it again"),
    # running a module in eval mode and handing it back
    Fault("eval_mode_restores_the_top_mode", "modes.py", "        for m, training in modes:\n            m.training = training",
          "        module.train(modes[0][1])", "eval_mode gives every submodule the top module's mode back (a frozen batch norm thaws)"),
    Fault("eval_mode_not_restored_on_error", "modes.py", "    finally:\n", "    except BaseException:\n        raise\n    else:\n",
          "eval_mode leaves the module in eval mode when the block raises"),
    Fault("check_mask_generator_in_training_mode", "checks.py", "with eval_mode(mask_generator), torch.no_grad():", "with torch.no_grad():",
          "the mask generator check runs it in training mode (its batch-norm statistics move)"),
    Fault("check_encoder_in_training_mode", "encoders.py", "with eval_mode(encoder), torch.no_grad():", "with torch.no_grad():",
          "the encoder check runs it in training mode (its batch-norm statistics move)"),
    # batches with more after the targets (lightly's file names)
    Fault("training_batch_of_three_refused", "checks.py", "or len(batch) < 2:", "or len(batch) != 2:",
          "a training batch with file names after the targets (lightly's) is refused"),
    Fault("file_names_taken_for_a_segmentation", "callbacks/base.py", "rest[0] if rest and isinstance(rest[0], Tensor) else None",
          "rest[0] if rest else None", "the callbacks take a validation batch's file names for a segmentation"),
    # reading a checkpoint's hyper-parameters before building from them
    Fault("hyper_parameters_read_unguarded", "checkpoint.py", "raise unreadable_checkpoint(checkpoint, error) from error", "raise",
          "load_from_checkpoint shows torch's traceback for an empty or truncated file"),
    Fault("checkpoint_folder_not_named", "checkpoint.py", "    refuse_folder(checkpoint)\n", "",
          "load_from_checkpoint on a folder ends in IsADirectoryError's traceback"),
    # adios-pl evaluate and the command the demo prints for it
    Fault("evaluate_at_the_configs_image_size", "cli.py", "        config.data.init_args.image_size = model.image_size\n", "        pass\n",
          "adios-pl evaluate scores images at the data section's size, not the size the encoder was trained at"),
    Fault("evaluate_ignores_its_settings", "cli.py", "result = evaluate_encoder(model.encoder, data, **settings)",
          "result = evaluate_encoder(model.encoder, data, device=settings['device'])", "adios-pl evaluate ignores --evaluate.epochs and the rest"),
    Fault("evaluate_refuses_a_fit_config", "cli.py", '    for name in ["seed_everything", *sorted(fit_only)]:', '    for name in ["seed_everything"]:',
          "adios-pl evaluate refuses the config fit wrote (its weights_only key)"),
    Fault("demo_evaluate_command_default_sizes", "demo.py", "if getattr(data, name) != defaults[name].default]", "if False]",
          "the demo prints an evaluate command for the default Shapes sizes even when it trained on others"),
    # --ckpt_path last across the logger's versions
    Fault("ckpt_path_last_left_to_lightning", "cli.py", '        if kwargs.get("ckpt_path") == "last":', "        if False:",
          "a restart with --ckpt_path last trains from scratch, and validate scores untrained weights"),
    Fault("last_checkpoint_oldest", "resume.py", "return max(candidates, key=lambda name:", "return min(candidates, key=lambda name:",
          "--ckpt_path last resumes the oldest run"),
    Fault("last_checkpoint_tie_by_text", "resume.py", "[int(part) if part.isdigit() else part", "[part",
          "--ckpt_path last takes version_9 over version_10 written in the same second"),
    Fault("last_checkpoint_this_version_only", "resume.py", 'str(logger.name), "*", "checkpoints")',
          'str(logger.name), f"version_{logger.version}", "checkpoints")', "--ckpt_path last looks in the new run's own version folder only"),
    Fault("requeue_checkpoint_not_a_candidate", "resume.py", '    patterns.append(os.path.join(str(trainer.default_root_dir), "hpc_ckpt_*.ckpt"))\n', "",
          "--ckpt_path last ignores a newer SLURM requeue checkpoint"),
    Fault("validate_last_without_checkpoint_runs", "cli.py", '                if subcommand != "fit":', "                if False:",
          "validate --ckpt_path last with no checkpoint scores untrained weights"),
    Fault("evaluate_last_is_a_file_name", "cli.py", '    if config.ckpt_path == "last":', "    if False:",
          "adios-pl evaluate --ckpt_path last looks for a file called last"),
    # the published configs, found from any folder
    Fault("shipped_config_over_the_users_file", "cli.py", "    if os.path.exists(value):\n", "    if False:\n",
          "a user's configs/... file is replaced by the shipped one of that name"),
    Fault("config_equals_form_not_resolved", "cli.py", '        elif arg.startswith(("--config=", "-c=")):', "        elif False:",
          "--config=configs/... outside the repository is not found"),
    # adios-pl export
    Fault("export_written_to_the_working_folder", "cli.py", 'str(Path(checkpoint).with_name(f"{Path(checkpoint).stem}_encoder.pt"))',
          'f"{Path(checkpoint).stem}_encoder.pt"', "adios-pl export writes into the working folder, not beside the checkpoint"),
    Fault("export_last_is_a_file_name", "cli.py", 'if config.ckpt_path == "last" else config.ckpt_path',
          "if False else config.ckpt_path", "adios-pl export --ckpt_path last looks for a file called last"),
    Fault("export_folder_not_named", "checkpoint.py", "        refuse_folder(path)\n", "",
          "exporting from a folder (AtomicCheckpointIO's reader) ends in IsADirectoryError's traceback"),
    Fault("validate_picture_named_step_zero", "callbacks/masks.py", "        if trainer.state.fn == TrainerFn.FITTING:\n",
          "        if True:\n", "validate's mask picture is named epoch_000_step_0000000 whatever checkpoint it shows"),
    # the Lightning package (adios_pl.backend)
    Fault("lightning_variable_ignored", "backend.py", '    chosen = environ.get(ENV_VAR, "").strip()\n', '    chosen = ""\n',
          "ADIOS_PL_LIGHTNING does not choose the package"),
    Fault("lightning_script_not_followed", "backend.py", '        return "lightning"\n    return "pytorch_lightning" if', '        pass\n    return "pytorch_lightning" if',
          "a script that imported lightning first gets pytorch_lightning classes (its Trainer refuses them)"),
    Fault("callback_on_pytorch_lightning", "callbacks/knn.py", "from adios_pl.backend import pl\n", "import pytorch_lightning as pl\n",
          "OnlineKNN is a pytorch_lightning callback whatever the package"),
    Fault("published_checkpoint_callback_by_path", "configs/cifar10/simclr_adios_resnet18.yaml", "class_path: ModelCheckpoint\n",
          "class_path: pytorch_lightning.callbacks.ModelCheckpoint\n", "a published config's ModelCheckpoint is pytorch_lightning's, refused under lightning"),
    Fault("other_packages_checkpoint_refused", "module.py", 'if saved.get("_instantiator") in CLI_INSTANTIATORS else {}', "if False else {}",
          "a command-line checkpoint written under the other Lightning package does not load"),
    Fault("class_path_typo_not_suggested", "cli.py", "        message = _suggest_class_path(message)\n", "",
          "a misspelt class_path in a config gets no suggestion"),
    Fault("subclass_typo_not_suggested", "cli.py", "        message = _suggest_subclass(message)\n", "",
          "a misspelt class name given as a flag's value gets no suggestion"),
    Fault("subcommand_not_checked", "cli.py", "        _check_subcommand(args)\n", "",
          "a missing or misspelt subcommand names only LightningCLI's three, after its usage text"),
    Fault("demo_flags_abbreviated", "demo.py", ", description=__doc__, allow_abbrev=False)", ", description=__doc__)",
          "adios-pl demo takes --minute for --minutes"),
    Fault("other_lightning_config_passed_on", "cli.py", "        _refuse_the_other_lightning(value)\n", "",
          "a run config of the other Lightning package ends in jsonargparse's usage text"),
    Fault("mixed_packages_silent", "module.py", "            rank_zero_warn(mixed)\n", "            pass\n",
          "a model built while both Lightning packages are imported says nothing"),
    Fault("sharding_strategy_trained", "module.py", "            check_strategy(self.trainer.strategy)\n", "            pass\n",
          "a fit under FSDP, DeepSpeed or ModelParallel trains, averaging sharded gradients again"),
    Fault("lightning_advert_shown", "cli.py", "    hide_lightning_adverts()\n", "",
          "the demo and every command show Lightning's tip for its cloud logger"),
    Fault("package_imports_lightning", "__init__.py", "if TYPE_CHECKING:\n    from adios_pl.module", "if True:\n    from adios_pl.module",
          "a bad ADIOS_PL_LIGHTNING stops adios-pl with a traceback from importing the package"),
    Fault("help_lists_every_module", "cli.py", '        kwargs.setdefault("formatter_class", ShortListsHelpFormatter)\n', "",
          "fit --help lists some 1,600 nn.Module classes for each module argument"),
    Fault("bare_import_lacks_modules", "__init__.py",
          '    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:\n'
          '        return importlib.import_module(f"{__name__}.{name}")\n', "",
          "import adios_pl alone no longer gives adios_pl.objectives, adios_pl.masks, adios_pl.encoders"),
    Fault("one_batch_read_as_whole_epoch", "cli.py", "        whole_numbers_as_int(parser)\n", "",
          "--trainer.limit_train_batches=1 trains whole epochs (read as 1.0)"),
    Fault("gathered_score_logged_unsynced", "callbacks/base.py", ', sync_dist=True, reduce_fx="max")', ")",
          "the validation scores are logged without sync_dist: Lightning warns in every multi-GPU run"),
    Fault("fast_dev_run_saves_last", "cli.py", '                    setattr(callback, "save_last", False)\n', "                    pass\n",
          "--trainer.fast_dev_run writes a 100-200 MB last.ckpt (Lightning 2.6's on_train_end)"),
    Fault("usage_buries_the_error", "cli.py", "        return f\"usage: {self.prog.replace(' [options]', '')} [-h] [options]\\n\"\n",
          "        return super().format_usage()\n",
          "a misspelt flag's error comes below jsonargparse's 74-line usage of every option"),
    Fault("demo_plan_forgets_validation", "demo.py", "    epoch_seconds = batches_per_epoch * batch_seconds + validation_seconds\n",
          "    epoch_seconds = batches_per_epoch * batch_seconds\n",
          "the demo plans more batches than its budget fits: the validations' time is left out"),
    Fault("demo_validation_start_up_untimed", "demo.py", "    total = clock.validation_seconds\n", "    total = 0.0\n",
          "the demo's plan counts a validation's batches only, not its start-up and scoring"),
    Fault("objective_losses_eager", "module.py", "        return compiled[name] if compiled is not None else getattr(self.objective, name)\n",
          "        return getattr(self.objective, name)\n", "compile_objective compiles the losses, but the step calls them eagerly"),
    Fault("objective_forward_not_compiled", "module.py", "                self.objective.compile(options=options)\n", "",
          "compile_objective compiles the losses only, not the objective's forward (heads and encoder)"),
    Fault("objective_outputs_left_in_graphs", "module.py",
          '        modes = (self.hparams["compile_encoder"], self.hparams["compile_objective"])\n',
          '        modes = (self.hparams["compile_encoder"],)\n',
          "with compile_objective replaying as CUDA graphs, the step hands the graphs' own loss and features to logs and callbacks"),
    Fault("optimizers_share_a_code_object", "optim.py",
          "    run.__code__ = run.__code__.replace(co_name=name)  # a new code object: its graphs are counted apart\n", "",
          "every compiled optimiser update shares one code object: past dynamo's limit of 8 graphs the rest run eagerly"),
    Fault("compile_optimizers_ignored", "module.py", "            if setting := hp.compile_optimizers:", "            if setting := False:",
          "compile_optimizers leaves the optimisers eager"),
    Fault("compiled_step_drops_the_closure_value", "optim.py", "        return loss\n\n    optimizer.step = types.MethodType",
          "        return None\n\n    optimizer.step = types.MethodType", "the compiled step does not return its closure's value"),
    Fault("compiled_step_keeps_tensor_rates", "optim.py", '                group["lr"] = number\n', "                pass\n",
          "after a compiled step the groups keep their rates as tensors (schedulers, checkpoints and logs expect numbers)"),
    Fault("lars_forgets_its_momentum", "optim.py", '                buffers.append(self.state[p].get("momentum_buffer"))\n',
          "                buffers.append(None)\n", "LARS starts its momentum buffers afresh at every step"),
]


def _suite() -> list[str]:
    """The default suite's files, :data:`FIRST` first. Not tests/test_fault_check.py, which
    fails on any fault (the text a fault replaces is gone)."""
    tests = ROOT / "tests"
    rest = sorted(p.name for p in tests.glob("test_*.py") if p.name not in FIRST and p.name != "test_fault_check.py")
    return [str(tests / name) for name in FIRST + rest]


def read_hints() -> dict[str, str]:
    """The hints file's ``{fault name: node id}`` (empty when there is none)."""
    return json.loads(HINTS.read_text()) if HINTS.exists() else {}


def write_hints(hints: dict[str, str]) -> None:
    """Write the hints, sorted by fault name."""
    HINTS.write_text(json.dumps(dict(sorted(hints.items())), indent=1) + "\n")


def failed_node(line: str) -> str | None:
    """The node id of a short-summary line ``FAILED tests/x.py::test[id] - message``."""
    for prefix in ("FAILED ", "ERROR "):
        if line.startswith(prefix):
            node = line[len(prefix):].split(" - ", 1)[0].strip()
            return node if node.startswith("tests/") else None
    return None


def unfaulted_problem(pytest_args: list[str]) -> str | None:
    """Why the suite cannot be collected on the code as it is (a package missing from the
    environment, say), or None. Every fault would otherwise be told caught by that error."""
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *pytest_args, *_suite()]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    if done.returncode == 0:
        return None
    lines = done.stdout.strip().splitlines()
    return next((line for line in lines if line.startswith("ERROR")), lines[-1] if lines else done.stderr.strip()[-300:])


def run_fault(fault: Fault, pytest_args: list[str], hint: str | None = None) -> tuple[str, str]:
    """Apply ``fault``, run ``hint`` (a node id) and, unless it fails, the suite; restore the file;
    ``(outcome, detail)`` with outcome ``"caught"``, ``"MISSED"``, ``"TIMEOUT"`` or ``"STALE"``
    (the text to replace is not found exactly once)."""
    path = ROOT / SRC / fault.path
    original = path.read_text()
    if original.count(fault.old) != 1:
        return "STALE", f"{fault.old!r} occurs {original.count(fault.old)} times in {SRC}{fault.path}"
    try:
        path.write_text(original.replace(fault.old, fault.new))
        # no bytecode: a restored file written within the same second as the faulty one, at the
        # same size, would otherwise be served the faulty file's cached bytecode
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-W", "ignore", *pytest_args]

        def pytest(*targets: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*command, *targets], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)

        try:
            # the hint on its own: named beside the suite's files, pytest would run it in its file's place
            done = pytest(hint) if hint else None
            if done is None or done.returncode not in CAUGHT_BY_HINT:  # no hint, it passed, or its test is gone
                done = pytest(*_suite())
        except subprocess.TimeoutExpired:
            return "TIMEOUT", f"the suite ran over {TIMEOUT_S} s"
    finally:
        path.write_text(original)
    lines = done.stdout.strip().splitlines()
    failed = next((line for line in lines if line.startswith(("FAILED", "ERROR"))), "")
    summary = lines[-1] if lines else done.stderr.strip()[-200:]
    if done.returncode == 0:
        return "MISSED", summary
    return "caught", failed or summary


def main(argv: list[str] | None = None) -> int:
    """Run the faults named (all by default) and print what the suite made of each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="faults to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the faults and exit")
    parser.add_argument("--pytest-arg", action="append", default=[], help="an extra pytest argument (repeatable)")
    parser.add_argument("--no-hints", action="store_true", help="run the whole suite for every fault, without its hint")
    args = parser.parse_args(argv)
    known = {f.name: f for f in FAULTS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown fault(s) {unknown}; --list shows them")
    if args.list:
        for f in FAULTS:
            print(f"{f.name:32} {SRC}{f.path}: {f.what}")
        return 0
    # restore the file on SIGTERM too (KeyboardInterrupt already unwinds through run_fault)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    chosen = [known[n] for n in args.names] if args.names else FAULTS
    problem = unfaulted_problem(args.pytest_arg)
    if problem:
        print(f"fault_check: the suite does not even collect on the unfaulted code, so no fault was run: {problem}")
        return 2
    outcomes: dict[str, int] = {}
    hints = read_hints()
    start = time.monotonic()
    for i, fault in enumerate(chosen, 1):
        began = time.monotonic()
        outcome, detail = run_fault(fault, args.pytest_arg, None if args.no_hints else hints.get(fault.name))
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        node = failed_node(detail)
        if outcome == "caught" and node:
            hints[fault.name] = node
            write_hints(hints)
        print(f"[{i}/{len(chosen)}] {outcome:7} {fault.name} ({time.monotonic() - began:.0f} s): {detail}", flush=True)
    minutes = (time.monotonic() - start) / 60
    others = ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items()) if k != "caught")
    print(f"{outcomes.get('caught', 0)} of {len(chosen)} faults caught in {minutes:.0f} min" + (f" ({others})" if others else ""))
    return 0 if outcomes.get("caught", 0) == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
