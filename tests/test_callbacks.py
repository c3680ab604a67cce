"""Evaluation callbacks, metrics, export and offline evaluation (single process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from PIL import Image
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import Logger, TensorBoardLogger
from torch import Tensor

from adios_pl import ADIOSModule
from adios_pl.callbacks import MaskQuality, MaskVisualizer, OnlineKNN, OnlineLinearProbe
from adios_pl.data import ShapesDataModule
from adios_pl.evaluation import evaluate_encoder, extract_features, knn_accuracy, linear_probe, seeded_linear
from adios_pl.export import export_encoder
from adios_pl.metrics import adjusted_rand_index, foreground_ari, knn_predict, mean_best_overlap, random_patch_segmentation, segmentation_covering
from adios_pl.objectives import SimCLR

from conftest import quiet_trainer


def shapes(**kw: object) -> ShapesDataModule:
    args = dict(train_size=64, val_size=40, batch_size=16, num_workers=0, pin_memory=False)
    args.update(kw)
    return ShapesDataModule(**args)


def small_model(**kw: object) -> ADIOSModule:
    args = dict(encoder="small_cnn", encoder_kwargs={"width": 8}, image_size=32, mask_width=8, num_masks=3, warmup_epochs=0,
                objective=SimCLR(proj_hidden_dim=32, proj_output_dim=16))
    args.update(kw)
    return ADIOSModule(**args)


def probe_host(num_features: int) -> Any:
    """What :class:`OnlineLinearProbe` reads of its LightningModule: the encoder's
    ``num_features``, the device and ``log``; for driving the probe's hooks by hand."""
    return type("M", (), {"encoder": type("E", (), {"num_features": num_features})(), "device": torch.device("cpu"), "log": lambda *a, **k: None})()


def naive_knn(q: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, c: int, k: int, t: float) -> torch.Tensor:
    out = torch.zeros(len(q), c)
    for i in range(len(q)):
        sims = [float(torch.nn.functional.cosine_similarity(q[i], b, dim=0)) for b in bank]
        order = sorted(range(len(bank)), key=lambda j: -sims[j])[:k]
        for j in order:
            out[i, labels[j]] += torch.exp(torch.tensor(sims[j] / t))
    return out


def test_knn_predict_equals_naive_and_chunks() -> None:
    torch.manual_seed(0)
    q, bank, labels = torch.randn(7, 5), torch.randn(30, 5), torch.randint(0, 3, (30,))
    want = naive_knn(q, bank, labels, 3, 10, 0.1)
    assert torch.allclose(knn_predict(q, bank, labels, 3, k=10, temperature=0.1), want, rtol=1e-4)
    assert torch.allclose(knn_predict(q, bank, labels, 3, k=10, temperature=0.1, chunk_size=2), want, rtol=1e-4)
    with pytest.raises(ValueError, match="empty"):
        knn_predict(q, bank[:0], labels[:0], 3)


def test_mask_metrics() -> None:
    true = torch.zeros(2, 8, 8, dtype=torch.long)
    true[:, :4, :4], true[:, 4:, 4:] = 1, 2
    perfect = true.clone()
    perfect[true == 0] = 5  # background ids do not matter for FG-ARI
    assert torch.allclose(foreground_ari(perfect, true), torch.ones(2))
    assert torch.allclose(mean_best_overlap(true, true), torch.ones(2))
    one_segment = torch.zeros_like(true)
    assert torch.allclose(foreground_ari(one_segment, true), torch.zeros(2))
    assert mean_best_overlap(one_segment, true)[0] == pytest.approx(16 / 64)
    assert torch.isnan(foreground_ari(one_segment, torch.zeros_like(true))).all()


class ImageLogger(Logger):
    """A logger with Weights & Biases' ``log_image`` API that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[str, list[Tensor], int | None]] = []

    @property
    def name(self) -> str:
        return "images"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_image(self, key: str, images: list[Tensor], step: int | None = None) -> None:
        self.images.append((key, images, step))


def test_callbacks_log_and_draw(tmp_path: Path) -> None:
    dm = shapes()
    viz = MaskVisualizer(num_images=4)
    callbacks = [OnlineLinearProbe(num_classes=4), OnlineKNN(k=5), MaskQuality(), viz]
    images = ImageLogger()
    trainer = quiet_trainer(max_epochs=1, callbacks=callbacks, logger=[TensorBoardLogger(str(tmp_path)), images], default_root_dir=str(tmp_path))
    trainer.fit(small_model(), dm)
    metrics = trainer.callback_metrics
    for key in ["val/linear_top1", "val/linear_top5", "val/knn_top1", "val/knn_top5", "val/mask_fg_ari", "val/mask_mbo", "val/mask_fg_ari_random",
                "val/mask_ari", "val/mask_sc", "train/linear_loss"]:
        assert key in metrics, key
        assert 0 <= float(metrics[key]) <= 1 or key == "train/linear_loss"
    assert float(metrics["val/linear_top5"]) >= float(metrics["val/linear_top1"])
    assert viz.last_path is not None and viz.last_path.exists()
    with Image.open(viz.last_path) as picture:
        width, height = picture.size
    assert width > height > 0  # 4 rows of 2N+2 = 8 tiles
    assert list(Path(tmp_path).rglob("events.out.tfevents*"))
    ((key, (grid,), step),) = images.images
    assert key == "val/masks" and step == trainer.global_step and grid.shape == (3, height, width)


def test_knn_callback_equals_offline_knn() -> None:
    dm = shapes()
    knn = OnlineKNN(k=7, temperature=0.1)
    model = small_model()
    trainer = quiet_trainer(max_epochs=1, callbacks=[knn], limit_train_batches=0)
    trainer.validate(model, dm)
    dm.setup("fit")
    val, bank = dm.val_dataloader()
    qx, qy = extract_features(model.encoder, val)
    bx, by = extract_features(model.encoder, bank)
    assert float(trainer.callback_metrics["val/knn_top1"]) == pytest.approx(knn_accuracy(bx, by, qx, qy, 4, k=7, temperature=0.1))


def test_probe_state_is_checkpointed_and_restored(tmp_path: Path) -> None:
    dm = shapes()
    probe = OnlineLinearProbe(num_classes=4)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
    quiet_trainer(max_epochs=1, callbacks=[probe, ckpt], enable_checkpointing=True, limit_val_batches=0).fit(small_model(), dm)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]
    (state,) = [v for k, v in saved.items() if "OnlineLinearProbe" in k]
    assert torch.equal(state["head"]["1.weight"], probe.linear.weight.detach())
    assert torch.equal(state["head"]["0.running_mean"], probe.head[0].running_mean), "the normalisation statistics are saved"
    assert state["optimizer"]["state"], "the optimiser state (momentum) is saved"
    fresh = OnlineLinearProbe(num_classes=4)
    quiet_trainer(max_epochs=1, callbacks=[fresh], limit_train_batches=0, limit_val_batches=0).fit(small_model(), dm, ckpt_path=str(tmp_path / "last.ckpt"))
    assert torch.equal(fresh.linear.weight.detach(), probe.linear.weight.detach())
    assert torch.equal(fresh.head[0].running_var, probe.head[0].running_var)


def test_probe_normalisation_keeps_sgd_stable_on_large_features() -> None:
    """Features of squared norm ~370 (a ResNet18's): the normalised probe learns, the raw one diverges."""
    g = torch.Generator().manual_seed(0)
    common = torch.rand(512, generator=g) * 1.5  # a large shared component, like post-ReLU features
    centres = 0.05 * torch.randn(4, 512, generator=g)
    y = torch.randint(0, 4, (2048,), generator=g)
    x = (common + centres[y] + 0.3 * torch.randn(2048, 512, generator=g)).clamp_min(0)
    assert 300 < float((x**2).sum(1).mean()) < 500
    losses = {}
    for normalize in (False, True):
        probe = OnlineLinearProbe(num_classes=4, normalize=normalize)
        module = probe_host(512)
        probe.setup(None, module, "fit")  # type: ignore[arg-type]
        for step in range(64):
            idx = slice(32 * step, 32 * step + 32)
            probe.on_train_batch_end(None, module, {"features": x[idx], "targets": y[idx]}, None, step)  # type: ignore[arg-type]
        probe.head.eval()
        with torch.no_grad():
            losses[normalize] = float(torch.nn.functional.cross_entropy(probe.head(x), y))
    assert losses[True] < 0.1 < 0.3 < losses[False], losses  # measured: 0.035 and 0.72


def test_probe_rejects_labels_beyond_num_classes() -> None:
    with pytest.raises(ValueError, match="num_classes=2"):
        quiet_trainer(max_steps=1, callbacks=[OnlineLinearProbe(num_classes=2)], limit_val_batches=0).fit(small_model(), shapes())


def naive_ari(pred: list[int], true: list[int]) -> float:
    """The adjusted Rand index from its definition over pairs of pixels (Hubert and Arabie)."""
    pairs = [(i, j) for i in range(len(pred)) for j in range(i + 1, len(pred))]
    both = sum(pred[i] == pred[j] and true[i] == true[j] for i, j in pairs)
    in_pred = sum(pred[i] == pred[j] for i, j in pairs)
    in_true = sum(true[i] == true[j] for i, j in pairs)
    expected = in_pred * in_true / len(pairs)
    return (both - expected) / ((in_pred + in_true) / 2 - expected)


def naive_covering(pred: list[int], true: list[int], weighted: bool) -> float:
    """Each object's (true id != 0) best IoU with a predicted segment, from sets of pixel indices."""
    objects = {o: {i for i, t in enumerate(true) if t == o} for o in set(true) - {0}}
    segments = [{i for i, p in enumerate(pred) if p == s} for s in set(pred)]
    best = {o: max(len(pixels & seg) / len(pixels | seg) for seg in segments) for o, pixels in objects.items()}
    weights = {o: len(pixels) if weighted else 1 for o, pixels in objects.items()}
    return sum(weights[o] * best[o] for o in best) / sum(weights.values())


def test_ari_and_covering_equal_their_definitions() -> None:
    generator = torch.Generator().manual_seed(0)
    true = torch.zeros(6, 8, 8, dtype=torch.long)
    for image in range(6):  # up to three rectangles on a background
        for obj in range(1, 2 + image % 3):
            top, left = torch.randint(0, 6, (2,), generator=generator).tolist()
            true[image, top : top + 3, left : left + 4] = obj
    pred = torch.randint(0, 4, (6, 8, 8), generator=generator)
    pred[:3] = torch.where(true[:3] > 0, true[:3] + 1, pred[:3])  # half the images close to the truth
    for name, got, want in [
        ("ari", adjusted_rand_index(pred, true), [naive_ari(p.tolist(), t.tolist()) for p, t in zip(pred.flatten(1), true.flatten(1))]),
        ("sc", segmentation_covering(pred, true), [naive_covering(p.tolist(), t.tolist(), True) for p, t in zip(pred.flatten(1), true.flatten(1))]),
        ("mbo", mean_best_overlap(pred, true), [naive_covering(p.tolist(), t.tolist(), False) for p, t in zip(pred.flatten(1), true.flatten(1))]),
    ]:
        assert torch.allclose(got, torch.tensor(want), atol=1e-5), (name, got, want)
    sizes_differ = segmentation_covering(pred, true) != mean_best_overlap(pred, true)
    assert sizes_differ.any(), "the test images do not tell weighted from unweighted covering"
    assert torch.isnan(segmentation_covering(pred[:1], torch.zeros_like(true[:1]))).all()


def test_mask_quality_warns_without_segmentation_or_masks() -> None:
    with pytest.warns(UserWarning, match="no mask generator"):
        quiet_trainer(max_epochs=1, callbacks=[MaskQuality()], limit_train_batches=0).validate(small_model(num_masks=0), shapes())


def test_mask_quality_averages_each_images_scores_over_the_split() -> None:
    """The five logged figures against the metrics (checked in test_mask_metrics and
    test_ari_and_covering_equal_their_definitions) applied image
    by image: the learned masks' argmax, and the random patches that MaskQuality draws for each
    batch (seeded by the batch index), averaged over all 40 evaluation images (batches of 16, 16
    and 8)."""
    dm, model = shapes(), small_model()
    trainer = quiet_trainer(max_epochs=1, callbacks=[MaskQuality(patch_size=8)], limit_train_batches=0)
    trainer.validate(model, dm)
    scores: dict[str, list[float]] = {"mask_fg_ari": [], "mask_mbo": [], "mask_fg_ari_random": [], "mask_ari": [], "mask_sc": []}
    model.eval()
    for index, (images, _, segmentation) in enumerate(dm.val_dataloader()[0]):
        with torch.no_grad():
            learned = model.mask_generator(images).argmax(dim=1)
        random = random_patch_segmentation(len(images), 32, 3, 8, torch.Generator().manual_seed(index))
        for i in range(len(images)):
            truth = segmentation[i : i + 1]
            scores["mask_fg_ari"].append(float(foreground_ari(learned[i : i + 1], truth)))
            scores["mask_mbo"].append(float(mean_best_overlap(learned[i : i + 1], truth)))
            scores["mask_fg_ari_random"].append(float(foreground_ari(random[i : i + 1], truth)))
            scores["mask_ari"].append(float(adjusted_rand_index(learned[i : i + 1], truth)))
            scores["mask_sc"].append(float(segmentation_covering(learned[i : i + 1], truth)))
    assert len(scores["mask_mbo"]) == 40
    for name, values in scores.items():
        expected = float(torch.tensor(values).nanmean())
        assert float(trainer.callback_metrics[f"val/{name}"]) == pytest.approx(expected, rel=1e-5, abs=1e-6), name
    assert scores["mask_fg_ari"] != scores["mask_fg_ari_random"]


def test_evaluation_runs_every_nth_epoch_from_the_first_and_not_in_the_sanity_check(tmp_path: Path) -> None:
    """every_n_epochs=2 over three epochs: epochs 0 and 2. The sanity check (two batches before
    training) draws nothing."""
    viz = MaskVisualizer(every_n_epochs=2, num_images=2, out_dir=str(tmp_path))
    quiet_trainer(max_epochs=3, callbacks=[viz], num_sanity_val_steps=2).fit(small_model(), shapes(train_size=32))
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["epoch_000_step_0000002.png", "epoch_002_step_0000006.png"]


def test_export_encoder_loads_into_plain_torchvision(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
    model = ADIOSModule(encoder="resnet18", image_size=32, num_masks=2, mask_width=8, warmup_epochs=0, objective=SimCLR(proj_hidden_dim=16, proj_output_dim=8))
    quiet_trainer(max_steps=1, callbacks=[ckpt], enable_checkpointing=True, limit_val_batches=0).fit(model, shapes(train_size=8, batch_size=8))
    path = export_encoder(tmp_path / "last.ckpt", tmp_path / "encoder.pt")
    plain = torchvision.models.resnet18()
    plain.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    plain.maxpool, plain.fc = torch.nn.Identity(), torch.nn.Identity()
    plain.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    plain.eval(), model.eval()
    assert torch.allclose(plain(x), model.embed(x), atol=1e-5)


def test_offline_evaluation_runs_and_probe_learns_separable_data() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 4
    y = torch.randint(0, 3, (300,), generator=g)
    x = centres[y] + torch.randn(300, 8, generator=g)
    assert linear_probe(x[:200], y[:200], x[200:], y[200:], 3, epochs=10) > 0.95
    assert knn_accuracy(x[:200], y[:200], x[200:], y[200:], 3, k=20) > 0.95
    assert linear_probe(x[:200], y[:200], x[200:], y[200:], 3, epochs=10, optimizer="lars") > 0.95
    result = evaluate_encoder(small_model().encoder, shapes(), epochs=2)
    assert set(result) == {"linear_top1", "knn_top1"} and all(0 <= v <= 1 for v in result.values())


def test_augmented_probe_trains_on_new_crops_every_epoch() -> None:
    """The reference's protocol: the head sees a fresh augmentation of the training images every epoch."""
    seen: list[torch.Tensor] = []
    encoder = small_model().encoder
    hook = encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    data = shapes(batch_size=64)  # 40 evaluation images, 64 labelled training images: one batch each
    try:
        result = evaluate_encoder(encoder, data, epochs=2, augment=True, optimizer="lars")
    finally:
        hook.remove()
    assert 0 <= result["linear_top1"] <= 1
    # eval split, bank (fixed features for kNN), 2 augmented epochs; the probe is scored on the
    # eval split's features already extracted
    assert [len(x) for x in seen] == [40, 64, 64, 64]
    bank, epoch1, epoch2 = seen[1], seen[2], seen[3]
    sums = [sorted(x.sum(dim=(1, 2, 3)).tolist()) for x in (bank, epoch1, epoch2)]
    assert sums[0] != sums[1] and sums[1] != sums[2], "the probe's training images were not re-augmented"
    with pytest.raises(ValueError, match="optimizer"):
        evaluate_encoder(encoder, shapes(), epochs=1, optimizer="adam")


def test_evaluate_encoder_runs_on_the_gpu_where_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import adios_pl.evaluation as evaluation

    class Stop(Exception):
        pass

    seen: list[str] = []

    def record(encoder: Any, loader: Any, device: Any = "cpu") -> Any:
        seen.append(str(device))
        raise Stop

    encoder = small_model().encoder
    monkeypatch.setattr(evaluation, "extract_features", record)
    monkeypatch.setattr(type(encoder), "to", lambda self, *args, **kwargs: self)  # this machine may have no GPU
    for available in (True, False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        with pytest.raises(Stop):
            evaluate_encoder(encoder, shapes())
    with pytest.raises(Stop):
        evaluate_encoder(encoder, shapes(), device="cpu")
    assert seen == ["cuda", "cpu", "cpu"]


def test_evaluate_encoder_fits_on_the_labelled_training_images_with_the_settings_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe and kNN fit on loader 1 (the labelled training images) and score loader 0 (the
    evaluation split), with the epochs, k and temperature passed in, not their defaults."""
    import inspect

    import adios_pl.evaluation as evaluation

    calls: dict[str, dict[str, Any]] = {}

    def spy(name: str, real: Any) -> Any:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            bound = inspect.signature(real).bind(*args, **kwargs)
            bound.apply_defaults()
            calls[name] = dict(bound.arguments)
            return real(*args, **kwargs)
        return recorded

    monkeypatch.setattr(evaluation, "linear_probe", spy("linear", evaluation.linear_probe))
    monkeypatch.setattr(evaluation, "knn_accuracy", spy("knn", evaluation.knn_accuracy))
    encoder, data = small_model().encoder, shapes()
    result = evaluate_encoder(encoder, data, epochs=3, k=7, temperature=0.3)
    test_x, test_y = extract_features(encoder, data.val_dataloader()[0])
    train_x, train_y = extract_features(encoder, data.val_dataloader()[1])
    assert len(test_x) == 40 and len(train_x) == 64
    for name in ("linear", "knn"):
        args = calls[name]
        assert torch.equal(args["train_features"], train_x) and torch.equal(args["train_targets"], train_y), name
        assert torch.equal(args["test_features"], test_x) and torch.equal(args["test_targets"], test_y), name
        assert args["num_classes"] == 4, name
    assert calls["linear"]["epochs"] == 3
    assert (calls["knn"]["k"], calls["knn"]["temperature"]) == (7, 0.3)
    assert result == {"linear_top1": evaluation.linear_probe(train_x, train_y, test_x, test_y, 4, epochs=3),
                      "knn_top1": evaluation.knn_accuracy(train_x, train_y, test_x, test_y, 4, k=7, temperature=0.3)}


def test_augmented_probe_leaves_the_encoder_as_it_was() -> None:
    """The frozen encoder runs in eval mode: its batch-norm running statistics do not move while
    the probe trains, and it is handed back with each layer in the mode it came in."""
    encoder = small_model().encoder
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules()), "needs batch norm to be decisive"
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    encoder.train()
    next(m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)).eval()  # frozen by the user
    modes = [m.training for m in encoder.modules()]
    evaluate_encoder(encoder, shapes(batch_size=64), epochs=1, augment=True, optimizer="lars")
    assert [m.training for m in encoder.modules()] == modes
    changed = [k for k, v in encoder.state_dict().items() if not torch.equal(before[k], v)]
    assert not changed, f"the probe changed the encoder: {changed}"


def test_probe_augmentation_flips_half_the_images_and_keeps_their_orientation_otherwise() -> None:
    """On a horizontal ramp (brighter to the right) a crop stays brighter on its right unless it
    is flipped: the share of crops brighter on the left is the flip rate, 0.5."""
    from adios_pl.evaluation import probe_augmentation

    ramp = torch.arange(64, dtype=torch.uint8).mul(4).expand(3, 64, 64).contiguous()
    augment = probe_augmentation(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    torch.manual_seed(0)
    flipped = []
    for _ in range(400):
        view = augment(ramp)
        assert view.shape == (3, 32, 32)
        left, right = float(view[:, :, 0].mean()), float(view[:, :, -1].mean())
        assert left != right
        flipped.append(left > right)
    assert abs(sum(flipped) / 400 - 0.5) < 0.1  # 4 sigma of a rate of 0.5 over 400 draws


def test_unlabelled_evaluation_split_and_untrained_probe_log_nothing() -> None:
    """Targets all -1 in the evaluation split (kNN, probe) or in training (probe): no crash, no figure."""
    from torch.utils.data import DataLoader, TensorDataset

    from conftest import make_loader

    g = torch.Generator().manual_seed(0)
    images = torch.randn(12, 3, 32, 32, generator=g)
    unlabelled = DataLoader(TensorDataset(images, torch.full((12,), -1)), batch_size=6)
    bank = DataLoader(TensorDataset(images, torch.arange(12) % 3), batch_size=6)
    trainer = quiet_trainer(max_steps=2, callbacks=[OnlineKNN(k=3), OnlineLinearProbe(num_classes=4)])
    trainer.fit(small_model(), make_loader(n=16, batch_size=8), val_dataloaders=[unlabelled, bank])
    assert "val/knn_top1" not in trainer.callback_metrics and "val/linear_top1" not in trainer.callback_metrics
    unlabelled_train = make_loader(n=16, batch_size=8)
    unlabelled_train.dataset.y[:] = -1
    probe = OnlineLinearProbe(num_classes=4)
    trainer = quiet_trainer(max_steps=2, callbacks=[probe])
    trainer.fit(small_model(), unlabelled_train, val_dataloaders=[bank, bank])
    assert int(probe.labelled_images) == 0 and "val/linear_top1" not in trainer.callback_metrics


def test_mask_picture_tiles_are_the_image_masks_segmentation_and_masked_images() -> None:
    """One row of ``mask_grid``, tile by tile, from the definitions: the image denormalised, each
    mask, then each masked image: the kept part as is, the hidden part (mask 1) in the mean colour."""
    from adios_pl.callbacks.masks import PALETTE, mask_grid

    g = torch.Generator().manual_seed(0)
    size, mean, std = 6, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    picture = torch.rand(1, 3, size, size, generator=g) * 0.5 + 0.25  # inside [0, 1]: no clamping
    images = (picture - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    masks = torch.zeros(1, 2, size, size)
    masks[:, 0, :, :2], masks[:, 0, :, 2:4] = 1.0, 0.25  # hidden, partly hidden, kept (columns 4-5)
    masks[:, 1] = 1 - masks[:, 0]
    grid = mask_grid(images, masks, mean, std)
    tile = lambda j: grid[:, 2 : 2 + size, 2 + j * (size + 2) : 2 + j * (size + 2) + size]  # noqa: E731 (padding 2)
    assert grid.shape == (3, size + 4, 6 * (size + 2) + 2)
    assert torch.allclose(tile(0), picture[0], atol=1e-6)
    for n in range(2):
        assert torch.allclose(tile(1 + n), masks[0, n].expand(3, size, size))
        shown = picture[0] * (1 - masks[0, n]) + torch.tensor(mean).view(3, 1, 1) * masks[0, n]
        assert torch.allclose(tile(4 + n), shown, atol=1e-6), f"masked image {n}"
    assert torch.equal(tile(3), PALETTE[masks[0].argmax(0)].permute(2, 0, 1))


def test_knn_callback_top1_and_top5_over_the_labelled_queries_equal_the_naive_vote() -> None:
    """Ten classes, so top-5 is not trivially 1, and every third evaluation image unlabelled
    (target -1: left out, not counted as a miss): both figures against :func:`naive_knn`."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    queries = DataLoader(TensorDataset(torch.randn(30, 3, 32, 32, generator=g), torch.where(torch.arange(30) % 3 == 0, -1, torch.arange(30) % 10)),
                         batch_size=8)
    bank = DataLoader(TensorDataset(torch.randn(60, 3, 32, 32, generator=g), torch.arange(60) % 10), batch_size=8)
    torch.manual_seed(0)
    # a linear encoder spreads the cosines over (-1, 1): the nearest neighbours and the votes are
    # far from ties, so the figures cannot depend on the last bits of the similarities
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 16))
    encoder.num_features = 16  # type: ignore[assignment]
    model = small_model(encoder=encoder)
    trainer = quiet_trainer(callbacks=[OnlineKNN(k=10, temperature=0.1)])
    trainer.validate(model, [queries, bank])
    qx, qy = extract_features(model.encoder, queries)
    bx, by = extract_features(model.encoder, bank)
    labelled = qy >= 0
    top = naive_knn(qx[labelled], bx, by, 10, 10, 0.1).topk(5, dim=1).indices
    hits = top == qy[labelled].unsqueeze(1)
    assert float(trainer.callback_metrics["val/knn_top1"]) == pytest.approx(float(hits[:, 0].float().mean()), abs=1e-6)
    assert float(trainer.callback_metrics["val/knn_top5"]) == pytest.approx(float(hits.any(1).float().mean()), abs=1e-6)
    assert 0 < float(hits[:, 0].float().mean()) < float(hits.any(1).float().mean()) < 1, "the data do not tell top-1 from top-5"


def test_online_probe_step_leaves_unlabelled_images_out_of_the_loss() -> None:
    """A batch with unlabelled images (target -1) moves the probe as the labelled images alone do
    (without the normalisation, whose batch statistics every image enters)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 16, generator=g), torch.arange(12) % 3
    y_mixed = torch.where(torch.arange(12) % 4 == 0, -1, y)
    module = probe_host(16)
    weights = []
    for features, targets in ((x, y_mixed), (x[y_mixed >= 0], y[y_mixed >= 0])):
        probe = OnlineLinearProbe(num_classes=3, normalize=False)
        probe.setup(None, module, "fit")  # type: ignore[arg-type]
        probe.on_train_batch_end(None, module, {"features": features, "targets": targets}, None, 0)  # type: ignore[arg-type]
        weights.append(probe.linear.weight.detach().clone())

    assert not torch.allclose(weights[0], seeded_linear(16, 3).weight, atol=1e-4), "the step did not move the probe"
    assert torch.allclose(weights[0], weights[1], atol=1e-7)
    assert int(probe.labelled_images) == 9


def test_offline_probe_rate_drops_tenfold_at_60_and_80_percent_of_the_epochs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The published schedule, read off every SGD step: 0.1 for epochs 0-5, 0.01 for 6-7, 0.001
    for 8-9 of 10, with two steps an epoch."""
    rates: list[float] = []
    step = torch.optim.SGD.step

    def recording(self: torch.optim.SGD, *args: object, **kwargs: object) -> object:
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=g), torch.arange(40) % 2
    linear_probe(x, y, x, y, 2, epochs=10, batch_size=20)
    assert rates == pytest.approx([0.1] * 12 + [0.01] * 4 + [0.001] * 4)


def test_offline_scores_leave_unlabelled_evaluation_images_out() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 2
    y = torch.randint(0, 3, (200,), generator=g)
    x = centres[y] + torch.randn(200, 8, generator=g)
    test_y = torch.where(torch.arange(100) % 3 == 0, -1, y[100:])
    keep = test_y >= 0
    assert linear_probe(x[:100], y[:100], x[100:], test_y, 3, epochs=3) == linear_probe(x[:100], y[:100], x[100:][keep], test_y[keep], 3, epochs=3)
    assert knn_accuracy(x[:100], y[:100], x[100:], test_y, 3, k=10) == knn_accuracy(x[:100], y[:100], x[100:][keep], test_y[keep], 3, k=10)


@pytest.mark.parametrize("training", [True, False])
def test_feature_extraction_runs_in_eval_mode_and_puts_the_mode_back(training: bool) -> None:
    from torch.utils.data import DataLoader, TensorDataset


    encoder = small_model().encoder.train(training)
    modes: list[bool] = []
    encoder.register_forward_hook(lambda m, args, out: modes.append(m.training))
    extract_features(encoder, DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)), batch_size=2))
    assert modes == [False, False] and encoder.training is training
    assert all(m.training is training for m in encoder.modules())
