"""The ``adios-pl`` command line: LightningCLI for ``fit``/``validate``/..., plus ``demo`` and
``evaluate``.

Every constructor argument of :class:`~adios_pl.ADIOSModule`, the objectives, the DataModules,
the callbacks and the Trainer is a flag or a YAML key (jsonargparse reads the signatures).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, Union, get_args, get_origin

import torch
from jsonargparse import ActionConfigFile, DefaultHelpFormatter

from adios_pl import __version__
from adios_pl.backend import (
    ENV_VAR,
    OTHER_PACKAGE,
    PACKAGE,
    PACKAGES,
    LightningArgumentParser,
    LightningCLI,
    MisconfigurationException,
    pl,
    rank_zero_info,
    rank_zero_warn,
)
from adios_pl.callbacks.features import FeatureWriter
from adios_pl.checkpoint import AtomicCheckpointIO, read_hyper_parameters
from adios_pl.data.base import SSLDataModule
from adios_pl.errors import ConfigurationError, UserInputError
from adios_pl.evaluation import evaluate_encoder
from adios_pl.export import export_encoder
from adios_pl.module import ADIOSModule
from adios_pl.resume import find_last_checkpoint, last_checkpoint_patterns, newest_checkpoint

DESCRIPTION = (
    "adios-pl: ADIOS (adversarial masking for self-supervised learning) on PyTorch Lightning. "
    "Subcommands: fit, validate, predict (writes encoder features), `adios-pl evaluate` (offline "
    "linear probe and kNN of a checkpoint), `adios-pl export` (the encoder's weights as a plain "
    "state_dict) and `adios-pl demo` (a CPU demo on built-in data). "
    "Every argument of ADIOSModule, the objectives, the DataModules, the callbacks and the Trainer "
    "is a flag or a YAML key. The published configurations ship with the package: --config "
    "configs/<dataset>/<name>.yaml finds them from any folder (see the README, \"Configurations\")."
)

#: The published configurations, shipped in the package (the repository's ``configs/`` links here).
PUBLISHED_CONFIGS = Path(__file__).resolve().parent / "configs"

#: Errors a user can cause while the command line is parsed and the objects are built; one line.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError, TypeError, MisconfigurationException, KeyError)
#: Errors a user can cause that surface while running (bad data, wrong checkpoint); one line.
#: Anything else raised while running is a bug and keeps its traceback.
RUN_USER_ERRORS = (UserInputError, FileNotFoundError, NotADirectoryError, MisconfigurationException)


def _known_keys(parser: Any) -> list[str]:
    """Every option key of ``parser`` and of its subcommands' parsers."""
    keys: list[str] = []
    for action in getattr(parser, "_actions", []):
        if getattr(action, "dest", None) and action.dest not in ("help", "config"):
            keys.append(action.dest)
        for sub in getattr(action, "_name_parser_map", {}).values():
            keys += _known_keys(sub)
    return keys


def _init_parameters(class_path: str) -> list[str]:
    """Constructor argument names of ``class_path`` and of its bases (for ``**kwargs``)."""
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if init is not None:
            names += [p for p in inspect.signature(init).parameters if p not in ("self", "args", "kwargs")]
    return names


def _class_path_cause(message: str) -> str:
    """Turn jsonargparse's "Does not validate against any of the Union subtypes" into its cause."""
    key = re.search(r'Parser key "([^"]+)"', message)
    cause = re.search(r"Problem with given class_path '([^']+)':\s*\n((?:.*\n?)*)", message)
    if not key or not cause:
        return message
    lines = []
    for line in cause.group(2).splitlines():
        if re.match(r"\s*- Expected a <class 'NoneType'>|\s*Given value", line):
            break
        lines.append(line.strip())
    class_path, reason = cause.group(1), " ".join(x for x in lines if x)
    text = f'Parser key "{key.group(1)}": {reason} ({class_path})'
    wrong = re.search(r"Option '([^']+)' is not accepted|Key '([^']+)' is not expected", reason)
    if wrong:
        prefix = key.group(1)
        text += _did_you_mean(next(g for g in wrong.groups() if g), _init_parameters(class_path), lambda name: f"{prefix}.init_args.{name}")
    return text


def _did_you_mean(word: str, candidates: Iterable[str], spell: Callable[[str], str] = str) -> str:
    """`` -- did you mean '<x>'?`` for the closest ``x`` of ``candidates`` to ``word`` (difflib's
    ratio 0.6 or more), written out by ``spell``; ``""`` when none is that close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" -- did you mean '{spell(close[0])}'?" if close else ""


def _suggest_class_path(message: str) -> str:
    """Add "did you mean ..." to jsonargparse's "module 'm' has no attribute 'x'" (a misspelt
    ``class_path`` in a config), from the public names of the module that was found."""
    missing = re.search(r"module '([\w.]+)' has no attribute '(\w+)'", message)
    module = sys.modules.get(missing.group(1)) if missing else None
    if missing is None or module is None:
        return message
    wrong = f"{missing.group(1)}.{missing.group(2)}"
    given = re.search(rf"\(({re.escape(wrong)}(?:\.\w+)*)\)", message)  # the whole class path, where shown
    whole = given.group(1) if given else wrong
    names = [name for name in dir(module) if not name.startswith("_")]
    return message + _did_you_mean(missing.group(2), names, lambda name: whole.replace(wrong, f"{missing.group(1)}.{name}", 1))


def _suggest_subclass(message: str) -> str:
    """Add "did you mean ..." to jsonargparse's "Expected a dot import path string: x" (a misspelt
    class name given as a flag's value): the closest of the subclasses of the types the flag takes,
    by name or by full path as given. Nothing where a suggestion was made already."""
    given = re.search(r"Expected a dot import path string: ([\w.]+)", message)
    subtypes = re.search(r"Subtypes: \[(.*)\]", message)
    if given is None or subtypes is None or "did you mean" in message:
        return message
    classes: list[type] = []
    for path in re.findall(r"<class '([\w.]+)'>", subtypes.group(1)):
        module, _, name = path.rpartition(".")
        base = getattr(sys.modules.get(module), name, None)
        stack = [base] if isinstance(base, type) and base.__module__ != "builtins" else []
        while stack:  # the base and its subclasses, at any depth
            cls = stack.pop()
            classes.append(cls)
            stack += cls.__subclasses__()
    full = "." in given.group(1)
    names = sorted({f"{cls.__module__}.{cls.__qualname__}" if full else cls.__name__ for cls in classes if not cls.__name__.startswith("_")})
    return message + _did_you_mean(given.group(1), names)


@contextlib.contextmanager
def while_running() -> Iterator[None]:
    """Mark an exception raised in the block as raised while running, not while parsing: :func:`main`
    then keeps the traceback of any but :data:`RUN_USER_ERRORS` (a bug, not a user's mistake)."""
    try:
        yield
    except Exception as error:
        error.adios_while_running = True  # type: ignore[attr-defined]
        raise


#: The most known subclasses the help lists for one argument; a longer list is cut.
MOST_SUBCLASSES_LISTED = 40
#: What a cut list keeps, by argument: the library's classes of that kind (else all of its classes).
OWN_CLASSES = {"model.encoder": "adios_pl.encoders.", "model.mask_generator": "adios_pl.masks."}


def shorten_subclass_list(help_text: str, keep: str = "adios_pl.", most: int = MOST_SUBCLASSES_LISTED) -> str:
    """``help_text`` with a list of "known subclasses" longer than ``most`` cut to the class paths
    that start with ``keep`` and a count of the others. jsonargparse lists every importable
    subclass of a type; for an ``nn.Module`` argument (``--model.encoder``,
    ``--model.mask_generator``) that is some 1,600 classes of torch, torchvision and timm: three
    thousand lines of ``fit --help``."""
    head, marker, listed = help_text.partition(", known subclasses: ")
    if not marker or not listed.endswith(")"):
        return help_text
    class_paths = listed[:-1].split(", ")
    if len(class_paths) <= most:
        return help_text
    kept = [path for path in class_paths if path.startswith(keep)]
    others = f"and {len(class_paths) - len(kept)} others: any importable class path"
    return f"{head}{marker}{', '.join([*kept, others])})"


class ShortListsHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, with long lists of known subclasses cut (:func:`shorten_subclass_list`
    keeps :data:`OWN_CLASSES`)."""

    def _get_help_string(self, action: Any) -> str:
        keep = OWN_CLASSES.get(action.dest, "adios_pl.")
        return shorten_subclass_list(super()._get_help_string(action), keep)


class SuggestingParser(LightningArgumentParser):
    """A parser whose "unknown option" errors suggest the closest known key, under a one-line usage."""

    def format_usage(self) -> str:
        """``usage: adios-pl fit [-h] [options]``: what an error prints above itself. jsonargparse's
        usage lists every option (74 lines for ``fit``), which pushed the error's cause far below
        the command that was typed; ``--help`` still lists them all."""
        return f"usage: {self.prog.replace(' [options]', '')} [-h] [options]\n"

    def error(self, message: str, *args: Any, **kwargs: Any) -> Any:
        """Add "did you mean ..." to errors about unknown keys; name the real cause of errors in a
        class given by ``class_path`` instead of jsonargparse's "does not validate" summary."""
        message = _class_path_cause(message)
        message = _suggest_class_path(message)
        message = _suggest_subclass(message)
        match = re.search(r"option '([^']+)'|unrecognized arguments: --(\S+)|Key '([^']+)' is not expected", message)
        if match:
            wrong = next(g for g in match.groups() if g)
            message += _did_you_mean(wrong, sorted(set(_known_keys(self))))
        return super().error(message, *args, **kwargs)


def whole_numbers_as_int(parser: Any) -> list[str]:
    """Make the parser's arguments typed ``Union[..., float, int, ...]`` try ``int`` first; returns
    their names.

    For ``limit_train_batches`` and its kin ``1`` is one batch and ``1.0`` all of them. Python's
    typing reuses a union made earlier that compares equal, so the Trainer's hint of
    ``Optional[Union[int, float]]`` can come out as ``Union[float, int, None]``, and jsonargparse,
    trying the subtypes in order, read ``--trainer.limit_train_batches=1`` (or ``1`` in a config)
    as 1.0: a whole epoch. With ``int`` first, ``1`` is an integer and ``1.0`` or ``0.5`` a fraction.
    """
    changed = []
    for action in parser._actions:
        hint = getattr(action, "_typehint", None)
        if get_origin(hint) is not Union:
            continue
        subtypes = get_args(hint)
        if int in subtypes and float in subtypes and subtypes.index(float) < subtypes.index(int):
            at = subtypes.index(float)
            rest = tuple(t for t in subtypes[at:] if t is not int)
            action._typehint = Union[subtypes[:at] + (int,) + rest]  # a tuple key: the order is kept
            changed.append(action.dest)
    return changed


class ADIOSCLI(LightningCLI):
    """LightningCLI for :class:`ADIOSModule` and any :class:`SSLDataModule` subclass.

    ``data.init_args.image_size`` is linked to ``model.image_size``, so the size is set once, in
    the data section.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``predict``: the module has no test step."""
        commands = dict(LightningCLI.subcommands())
        commands.pop("test", None)
        return commands

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Parsers that suggest the closest key for a misspelt one, take no abbreviations and keep
        their help short."""
        kwargs.setdefault("dump_header", ["adios-pl"])
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", ShortListsHelpFormatter)
        parser = SuggestingParser(**kwargs)
        parser.add_argument("-c", "--config", action=ActionConfigFile, help="Path to a configuration file in json or yaml format.")
        return parser

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Link the image size of the data to the model; read whole numbers as integers where a
        Trainer argument takes either (:func:`whole_numbers_as_int`)."""
        parser.link_arguments("data.init_args.image_size", "model.image_size")
        whole_numbers_as_int(parser)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The Trainer, with atomic, weights-only checkpoint I/O unless the config names plugins.

        Under ``--trainer.fast_dev_run`` no checkpoint is written, as Lightning documents: its 2.6
        ``ModelCheckpoint.on_train_end`` saves ``last.ckpt`` without checking ``fast_dev_run``,
        so a shipped config's trial run wrote a 100-200 MB ``checkpoints/last.ckpt``.
        """
        trainer_config = self._get(self.config_init, "trainer", default={})
        if not trainer_config.get("plugins") and "plugins" not in kwargs:
            kwargs["plugins"] = [AtomicCheckpointIO()]
        trainer = super().instantiate_trainer(**kwargs)
        if getattr(trainer, "fast_dev_run", False):
            for callback in trainer.checkpoint_callbacks:
                if hasattr(callback, "save_last"):  # a ModelCheckpoint
                    setattr(callback, "save_last", False)
        return trainer

    def _parse_ckpt_path(self) -> None:
        """Do not apply a checkpoint's hyper-parameters over the user's configuration.

        Lightning's CLI reads ``hyper_parameters`` from ``--ckpt_path`` and lets them override the
        command line (and instantiates any ``class_path`` they name). Here the user's config wins;
        :meth:`ADIOSModule.on_load_checkpoint` refuses a checkpoint of another architecture.
        """

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        """The subcommand's arguments, with ``--ckpt_path last`` made the newest ``last*.ckpt`` of
        any version of the logger's folder (:func:`~adios_pl.resume.find_last_checkpoint`).

        Lightning's ``"last"`` looks only in the new run's own version folder, so a restarted job
        trained from scratch, and ``validate``/``predict`` ran on untrained weights, each after a
        warning. Without a last checkpoint ``fit`` starts from the beginning (a job's first run);
        ``validate`` and ``predict`` stop with one line.
        """
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("ckpt_path") == "last":
            kwargs["ckpt_path"] = find_last_checkpoint(self.trainer)
            if kwargs["ckpt_path"] is None:
                searched = ", ".join(last_checkpoint_patterns(self.trainer))
                if subcommand != "fit":
                    raise ConfigurationError(
                        f"--ckpt_path last: no checkpoint matches {searched}; pass the checkpoint file, or the "
                        "--trainer.default_root_dir (or logger) of the run that wrote it")
                if not any(getattr(callback, "save_last", False) for callback in self.trainer.checkpoint_callbacks):
                    rank_zero_warn("--ckpt_path last: no ModelCheckpoint of this run saves last.ckpt, so a restart will not "
                                   "find one either; add --trainer.callbacks+=ModelCheckpoint --trainer.callbacks.save_last=true")
                rank_zero_info(f"--ckpt_path last: no checkpoint matches {searched} yet; training from the start")
        return kwargs

    def _run_subcommand(self, subcommand: str) -> None:
        """Run, marking exceptions as raised while running (see :func:`main`)."""
        with while_running():
            super()._run_subcommand(subcommand)

    def before_predict(self) -> None:
        """Write the features to disk unless a prediction writer is configured."""
        callbacks: list[Any] = getattr(self.trainer, "callbacks")
        if not any(isinstance(c, FeatureWriter) for c in callbacks):
            callbacks.append(FeatureWriter())


def build_cli(args: Sequence[str] | None = None, run: bool = True) -> ADIOSCLI:
    """Create the CLI (``args=None`` reads ``sys.argv``)."""
    # Passing args from main() is intended: the demo split happens before LightningCLI.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    return ADIOSCLI(
        ADIOSModule,
        SSLDataModule,
        subclass_mode_data=True,
        args=list(args) if args is not None else None,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "adios-pl", "description": DESCRIPTION},
        # the two players' optimisers and schedules are ADIOSModule arguments (optimizer, lr, ...)
        auto_configure_optimizers=False,
    )


EVALUATE_DESCRIPTION = (
    "adios-pl evaluate: the offline linear probe and kNN top-1 of a checkpoint's encoder (fixed settings, "
    "nothing chosen on the scored split; see adios_pl.evaluation.evaluate_encoder). The model is rebuilt "
    "from --ckpt_path alone; the data section (a training config's, or --data flags) says what to score: "
    "the DataModule's evaluation split, with its labelled training images to fit the probe and the kNN "
    "bank, at the checkpoint's image size. A training config's model and trainer sections are accepted "
    "and not used. Prints one JSON line."
)


def evaluate_parser() -> SuggestingParser:
    """The parser of ``adios-pl evaluate``: ``--ckpt_path``, a DataModule (``--data``), the settings of
    :func:`~adios_pl.evaluation.evaluate_encoder` (``--evaluate.*``) and ``-c/--config``, which may be
    the config of the training run."""
    parser = SuggestingParser(prog="adios-pl evaluate", description=EVALUATE_DESCRIPTION, allow_abbrev=False,
                              dump_header=["adios-pl evaluate"])
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="Path to a configuration file in json or yaml format.")
    parser.add_argument("--ckpt_path", type=str, required=True, help="the checkpoint to evaluate")
    parser.add_subclass_arguments(SSLDataModule, "data", required=True)
    parser.add_function_arguments(evaluate_encoder, "evaluate", skip={"encoder", "datamodule"})
    # a training config's other keys, read but not used: the model is the checkpoint's, and the
    # evaluation draws from seeds of its own
    for section in ("model", "trainer"):
        parser.add_argument(f"--{section}", type=dict | None, default=None, help="ignored (the model is the checkpoint's)")
    fit_only = set(inspect.signature(pl.Trainer.fit).parameters) - {"self", "model", "train_dataloaders", "val_dataloaders", "datamodule", "ckpt_path"}
    for name in ["seed_everything", *sorted(fit_only)]:  # weights_only in Lightning 2.6
        parser.add_argument(f"--{name}", type=Any, default=None, help="ignored (a key of fit's config)")
    return parser


def run_evaluate_cli(args: Sequence[str]) -> int:
    """``adios-pl evaluate``: print the offline linear-probe and kNN top-1 of ``--ckpt_path``'s
    encoder on the configured DataModule as one JSON line; returns the exit code."""
    parser = evaluate_parser()
    config = parser.parse_args(list(args))
    if config.ckpt_path == "last":
        configs = config.get("config") or []
        config.ckpt_path = _last_beside_config(configs[-1].absolute if configs else None)
    model = ADIOSModule.load_from_checkpoint(config.ckpt_path, map_location="cpu")
    if "image_size" in config.data.init_args:  # the size the encoder was trained at
        config.data.init_args.image_size = model.image_size
    data = parser.instantiate_classes(config).data
    settings = config.evaluate.as_dict()
    with while_running():
        result = evaluate_encoder(model.encoder, data, **settings)
    ran_on = next(model.encoder.parameters(), None)  # where evaluate_encoder put the encoder
    settings["device"] = str(ran_on.device) if ran_on is not None else settings["device"]
    print(json.dumps({"checkpoint": config.ckpt_path, "data": config.data.class_path, "image_size": model.image_size,
                      **settings, **result}))
    return 0


def _last_beside_config(config: str | None) -> str:
    """``--ckpt_path last`` of ``evaluate`` and ``export``: the newest ``last*.ckpt`` in the
    ``checkpoints`` folder beside ``config``, where ``fit`` writes it beside the run's config.yaml."""
    if not config:
        raise ConfigurationError("--ckpt_path last needs -c <the run's config.yaml> (fit writes checkpoints/ beside "
                                 "it); or pass the checkpoint file")
    pattern = os.path.join(os.path.dirname(os.path.abspath(config)), "checkpoints", "last*.ckpt")
    found = newest_checkpoint([pattern])
    if found is None:
        raise ConfigurationError(f"--ckpt_path last: no checkpoint matches {pattern} (beside the config); pass -c "
                                 "the config.yaml of a run, or the checkpoint file")
    return found


EXPORT_DESCRIPTION = (
    "adios-pl export: write the encoder's weights from a checkpoint as a plain state_dict that loads "
    "without adios-pl (into torchvision's ResNet with fc = nn.Identity(), and the CIFAR stem at 64 px or "
    "less, or into timm's ViT; see adios_pl.export.export_encoder). Prints one JSON line."
)


def export_parser() -> SuggestingParser:
    """The parser of ``adios-pl export``: ``--ckpt_path``, ``--out`` and ``-c/--config`` (the run's
    config.yaml, which only locates ``--ckpt_path last``)."""
    parser = SuggestingParser(prog="adios-pl export", description=EXPORT_DESCRIPTION, allow_abbrev=False)
    parser.add_argument("--ckpt_path", type=str, required=True,
                        help="the checkpoint; 'last': the newest last*.ckpt in checkpoints/ beside --config")
    parser.add_argument("-c", "--config", type=str | None, default=None,
                        help="the config.yaml fit wrote for the run (only to find --ckpt_path last)")
    parser.add_argument("--out", type=str | None, default=None,
                        help="where to write the weights (default: <checkpoint name>_encoder.pt beside the checkpoint)")
    return parser


def run_export_cli(args: Sequence[str]) -> int:
    """``adios-pl export``: write ``--ckpt_path``'s encoder weights with
    :func:`~adios_pl.export.export_encoder` and print what was written as one JSON line; returns
    the exit code."""
    config = export_parser().parse_args(list(args))
    checkpoint = _last_beside_config(config.config) if config.ckpt_path == "last" else config.ckpt_path
    out = config.out or str(Path(checkpoint).with_name(f"{Path(checkpoint).stem}_encoder.pt"))
    path = export_encoder(checkpoint, out)
    hyper_parameters = read_hyper_parameters(checkpoint)
    print(json.dumps({"checkpoint": checkpoint, "out": str(path), "tensors": len(torch.load(path, weights_only=True, mmap=True)),
                      **{key: hyper_parameters.get(key) for key in ("encoder", "encoder_kwargs", "image_size")}}, default=str))
    return 0


#: Warnings about Lightning's own code that a user of the command line can do nothing about.
LIGHTNING_INTERNAL_WARNINGS = (
    # Lightning 2.6's pytree helper uses an API that torch 2.14 deprecates; it warns at the first batch
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
)


def hide_lightning_internal_warnings() -> None:
    """Hide :data:`LIGHTNING_INTERNAL_WARNINGS` for the rest of the process (the command line
    only: a script that imports the library keeps Python's warning filters)."""
    for category, message in LIGHTNING_INTERNAL_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


#: The start of Lightning's lines that advertise a product instead of reporting on the run:
#: Lightning 2.6 logs a tip for its cloud logger whenever a Trainer is built without it.
LIGHTNING_ADVERTS = ("\N{ELECTRIC LIGHT BULB} Tip:",)


def _not_an_advert(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(LIGHTNING_ADVERTS)


def hide_lightning_adverts() -> None:
    """Drop the log lines of :data:`LIGHTNING_ADVERTS` for the rest of the process (the command
    line only: a script that imports the library keeps Lightning's logging as it is)."""
    logger = logging.getLogger(f"{pl.__name__}.utilities.rank_zero")  # where rank_zero_info logs
    if _not_an_advert not in logger.filters:
        logger.addFilter(_not_an_advert)


def published_configs() -> list[str]:
    """The published configurations shipped in the package, as ``configs/<dataset>/<name>.yaml``."""
    return sorted(f"configs/{path.relative_to(PUBLISHED_CONFIGS).as_posix()}" for path in PUBLISHED_CONFIGS.glob("*/*.yaml"))


def resolve_config_paths(args: Sequence[str]) -> list[str]:
    """``args`` with each ``-c``/``--config`` file that does not exist written as the published one
    it names: ``configs/<dataset>/<name>.yaml`` is the file shipped in the package, so the README's
    commands run from any folder after any install (a wheel has no repository ``configs/``).

    A config file that exists is left as it is, as is a config given inline (not ending in
    ``.yaml``, ``.yml`` or ``.json``). Any other missing file is a :class:`ConfigurationError`
    naming the closest published config.
    """
    resolved = list(args)
    for index, arg in enumerate(resolved):
        if arg in ("-c", "--config") and index + 1 < len(resolved):
            resolved[index + 1] = _config_file(resolved[index + 1])
        elif arg.startswith(("--config=", "-c=")):
            flag, value = arg.split("=", 1)
            resolved[index] = f"{flag}={_config_file(value)}"
    return resolved


def _config_file(value: str) -> str:
    """The path of the config file ``value`` names (see :func:`resolve_config_paths`)."""
    if not value.endswith((".yaml", ".yml", ".json")):
        return value
    if os.path.exists(value):
        _refuse_the_other_lightning(value)
        return value
    name = os.path.normpath(value).replace(os.sep, "/")
    published = published_configs()
    if name in published:
        return str(PUBLISHED_CONFIGS / name.removeprefix("configs/"))
    hint = _did_you_mean(name, published) or f" (the published ones: {', '.join(published[:3])}, ... {len(published)} in all)"
    raise ConfigurationError(f"--config {value}: no such file{hint}")


def _refuse_the_other_lightning(path: str) -> None:
    """One line for a config that names a class of the Lightning package this process does not
    use (:mod:`adios_pl.backend`): a run's ``config.yaml`` names the callbacks of the package it
    ran on, and given back under the other, jsonargparse refuses them with its usage text."""
    prefixes = "|".join(re.escape(f"{module}.") for module in PACKAGES[OTHER_PACKAGE])
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:  # a folder or an unreadable file: jsonargparse says so
        return
    found = re.search(rf"class_path[\"']?\s*:\s*[\"']?((?:{prefixes})[\w.]+)", text)
    if found:
        raise ConfigurationError(
            f"--config {path} names {found.group(1)}, a class of the {OTHER_PACKAGE} package, and adios-pl runs on "
            f"{PACKAGE} here: run it with {ENV_VAR}={OTHER_PACKAGE} (a run's config.yaml names the classes of the package it ran on)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adios-pl`` console script; returns the exit code.

    ``adios-pl demo [...]`` runs the demo, ``adios-pl evaluate [...]`` :func:`run_evaluate_cli`,
    ``adios-pl export [...]`` :func:`run_export_cli`;
    anything else goes to LightningCLI. Errors a user can
    cause are printed as one line (set ``ADIOS_PL_DEBUG=1`` for the traceback).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    hide_lightning_internal_warnings()
    hide_lightning_adverts()
    try:
        _check_subcommand(args)
        args = resolve_config_paths(args)
        if args[:1] in (["--version"], ["-V"]):
            print(f"adios-pl {__version__}")
            return 0
        if args[:1] == ["demo"]:
            from adios_pl.demo import run_demo_cli

            return run_demo_cli(args[1:])
        if args[:1] == ["evaluate"]:
            return run_evaluate_cli(args[1:])
        if args[:1] == ["export"]:
            return run_export_cli(args[1:])
        build_cli(args)
        return 0
    except USER_ERRORS as error:
        running = getattr(error, "adios_while_running", False)
        if os.environ.get("ADIOS_PL_DEBUG") or (running and not isinstance(error, RUN_USER_ERRORS)):
            raise
        print(f"adios-pl: error: {_with_hint(_one_line(error))}", file=sys.stderr)
        return 2


#: Every subcommand of ``adios-pl``: LightningCLI's, then the library's own.
SUBCOMMANDS = ("fit", "validate", "predict", "evaluate", "export", "demo")


def _check_subcommand(args: Sequence[str]) -> None:
    """A :class:`ConfigurationError` naming all six subcommands when ``args`` has none, or starts
    with a word that is not one (LightningCLI alone knows only its three)."""
    if not args:
        raise ConfigurationError(f"a subcommand is needed: {', '.join(SUBCOMMANDS)} (adios-pl --help; adios-pl demo to try it)")
    if not args[0].startswith("-") and args[0] not in SUBCOMMANDS:
        raise ConfigurationError(f"unknown subcommand '{args[0]}'{_did_you_mean(args[0], SUBCOMMANDS)} (the subcommands: {', '.join(SUBCOMMANDS)})")


def _one_line(error: BaseException) -> str:
    """The message of ``error`` in one line: for jsonargparse's "does not validate against any of the
    Union subtypes", the errors of the subtypes instead (the real cause)."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    if text.startswith("Does not validate against any of the Union subtypes"):
        causes = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("- ")]
        causes = [c for c in causes if not c.startswith("Expected a <class 'NoneType'>")]
        # a class that failed to build says why in the exception chained below, not in this text
        failed = [_chained_reason(error, c) for c in causes if c.startswith("Problem with given class_path")]
        if failed:
            return "; ".join(failed)
        if causes:
            return "; ".join(causes)
    return text.splitlines()[0]


def _chained_reason(error: BaseException, cause: str) -> str:
    """``cause`` ("Problem with given class_path 'X':") followed by the reason that the exception of
    that text, chained below ``error``, gives on its next lines."""
    below = error.__cause__ or error.__context__
    while below is not None:
        lines = str(below).strip().splitlines()
        if lines and lines[0].strip() == cause.strip():
            reason = " ".join(line.strip() for line in lines[1:] if line.strip())
            return f"{cause} {reason}" if reason else cause
        below = below.__cause__ or below.__context__
    return cause


#: Lightning's words for a Trainer setting this machine cannot meet, and what to pass instead.
MACHINE_HINTS = {
    "No supported gpu backend found": "trainer.accelerator is 'gpu', as in every published config, and this "
    "machine has no GPU; pass --trainer.accelerator cpu or auto",
}


def _with_hint(message: str) -> str:
    """``message``, followed by what to pass instead when it is Lightning's for a setting this
    machine cannot meet."""
    hints = [hint for words, hint in MACHINE_HINTS.items() if words in message]
    return f"{message} ({hints[0]})" if hints else message


def console_main() -> None:
    """``adios-pl`` console script of installs made before :mod:`adios_pl.console` held it."""
    from adios_pl.console import console_main as run

    run()


if __name__ == "__main__":
    raise SystemExit(main())
