"""``train``, ``sweep`` and ``export``: domain-adaptive pre-training (DAPT) on cached montages.

The training flags of ``train`` and ``sweep`` are derived from the fields of ``DaptConfig``
(``dapt_config``, torch-free): every field is a flag spelled as its name in kebab-case, typed by
its annotation (jsonargparse parses ``Optional``/``Union`` values, in flags and in ``--config``
files alike), defaulting to the field's default, documented by the class docstring and grouped by
its sections. A new field is therefore a new flag and a new ``--config`` key with no edit here.
Four small tables say where the command line differs from the dataclass on purpose:
``_NOT_FLAGS`` (fields a command fills from its inputs), ``_SPELLINGS`` (the short flags the CLI
has always had, e.g. ``--lr``), ``_CHOICES`` (the names a text field may take) and ``_HELP``
(help worded for the command line where the docstring's reads badly there).
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ZeroShotILDLib.errors import InputError
from ZeroShotILDLib.settings import AnalysisSettings

from . import dapt_config
from .cli_common import PROG, _csv_list, _pairs, _read_manifest, log
from .files import check_export_target, claim_out_dir

#: Fields a command sets from its inputs, never from a flag of their own: the run folder (``--out``),
#: the label classes (``--classes``, a comma list), Lightning's bar (``-q`` and the terminal) and the
#: montage settings (read from ``--cache``).
_NOT_FLAGS = frozenset({"output_dir", "class_names", "progress_bar", "montage_settings"})
#: field -> (flag, --config key) where the command line has always used a shorter name.
_SPELLINGS = {
    "learning_rate": ("--lr", "lr"),
    "text_choice": ("--text", "text_choice"),
    "sentences_per_sample": ("--sentences", "sentences"),
    "gradient_clip_norm": ("--grad-clip", "grad_clip"),
    "val_every_steps": ("--val-every", "val_every"),
    "patience_steps": ("--patience", "patience"),
    "val_label": ("--label", "label"),
    "val_prompt": ("--prompt", "prompt"),
    "val_negative": ("--negative", "negative"),
    "num_workers": ("--workers", "workers"),
}
#: Text fields with a fixed set of values (the dataclass types them as plain ``str``).
_CHOICES = {"loss": dapt_config.LOSSES, "optimizer": dapt_config.OPTIMIZERS, "recipe": tuple(dapt_config.RECIPES),
            "monitor": tuple(dapt_config.MONITORS), "logger": dapt_config.LOGGERS}
#: Fields whose flag defaults to None, "the --recipe's" (filled in after parsing: apply_recipe).
_RECIPE_FIELDS = frozenset(("text_choice", "sentences_per_sample"))
#: Help for the command line where the docstring's wording is about the Python API (or shared by two fields).
_HELP = {
    "model": "registry name, dapt:<checkpoint> or a checkpoint path",
    "checkpoint": "weights file for a registry model",
    "weights_dir": "folder where registry weights are looked for",
    "loss": "clip | relaxed (relaxed positives, Jang et al. 2022, eq. 3) | slip | uniclip | unicl, dlilp (need labels)",
    "relax_threshold": "t of eq. 3",
    "relax_slope": "alpha of eq. 3",
    "ssl_weight": "weight of SLIP's image self-supervised (NT-Xent) term",
    "ssl_temperature": "fixed temperature of SLIP's NT-Xent term",
    "recipe": "paper000 (default, Van Uden et al. 2023): impression, whole text; paper001 (Jang et al. 2022): "
              "findings+impression, 3 sampled sentences",
    "text_choice": "report part to train on (default: the recipe's; full = whole text, e.g. captions)",
    "sentences_per_sample": "sentences sampled per report and step (default: the recipe's; 0 = whole text)",
    "augment": "no weak (geometric) augmentation of the CLIP/UniCL/DLILP image",
    "warmup_steps": "linear warm-up steps (default: 10% of the run's steps, at most 100; longer than the run is refused)",
    "weight_decay": "weight decay of the optimizer (matrices only)",
    "max_epochs": f"epoch limit (default: none with --max-steps, else {dapt_config.DEFAULT_MAX_EPOCHS}); the earlier limit wins",
    "max_steps": "optimizer-step limit (-1 = none)",
    "gradient_clip_norm": "max gradient norm (0 = off)",
    "collapse_cosine": "mean pairwise cosine of the validation image embeddings at or above which a run counts as "
                       "collapsed",
    "chance_margin": "a best validation loss within this fraction of the chance level counts as at chance",
    "val_prompt": "text scored for that AUROC (default: the label's name, or for ild the preprocessing prompt)",
    "val_negative": "its negative text (default: 'no ' + the prompt)",
    "accelerator": "auto | cpu | gpu",
    "devices": "devices per node: a count, 'auto', or ids '0,1'",
    "num_nodes": "nodes (multi-node DDP; launch with srun/torchrun)",
    "strategy": "auto (DDP when several processes) | ddp | ddp_spawn ...",
    "precision": "auto (bf16-mixed on GPU, 32-true on CPU) | 32-true | 16-mixed ...",
    "num_workers": "data-loader processes per device (default: the CPUs this process may use minus one, at most 4)",
}


@dataclass(frozen=True)
class TrainingFlag:
    """One ``DaptConfig`` field on the command line."""

    field: str
    flag: str  #: option string
    dest: str  #: key in the parsed namespace and in --config files
    inverted: bool = False  #: ``--no-<field>`` of a field that defaults to True


def _docstring_help(cls) -> tuple:
    """({field: help}, {field: section}) from a dataclass docstring laid out as ``DaptConfig``'s:
    section titles indented once, ``name[, name] : text`` entries below them, continued on deeper lines."""
    doc = (cls.__doc__ or "").expandtabs()
    helps: dict = {}
    sections: dict = {}
    section, current = None, []
    names = {f.name for f in dataclasses.fields(cls)}
    for line in doc.splitlines()[1:]:
        indent = len(line) - len(line.lstrip())
        text = line.strip()
        if not text:
            current = []
            continue
        if indent <= 4 and " : " not in text and not text.endswith("."):
            section, current = text, []
            continue
        for name in names:  # listed in a section ("name :", "name (...)", "name,"; Hardware's is free text): in it
            if section and re.search(rf"\b{name}\b(?=\s*(\(|,|:|$))", text):
                sections.setdefault(name, section)
        match = re.match(r"^([a-z_]+(?:, [a-z_]+)*) : (.*)$", text)
        if match and all(n in names for n in match.group(1).split(", ")):
            current = match.group(1).split(", ")
            for name in current:
                helps[name] = match.group(2)
            continue
        more = re.match(r"^(.*?);\s*([a-z_]+) : (.*)$", text)  # "...; name : text" starts another entry
        if more and more.group(2) in names:
            for name in current:
                helps[name] += " " + more.group(1)
            current = [more.group(2)]
            helps[more.group(2)] = more.group(3)
            continue
        for name in current:  # a continuation line
            helps[name] += " " + text
    return {k: _plain_help(v) for k, v in helps.items()}, sections


def _plain_help(text: str) -> str:
    """Docstring markup as command-line help: no reST roles or backticks, papers by their authors, and no
    closing "(default value)" (the help shows the default itself)."""
    text = re.sub(r":\w+:`([^`]*)`", r"\1", text).replace("``", "")
    text = text.replace("paper 000", "Van Uden et al. 2023").replace("paper 001", "Jang et al. 2022")
    return re.sub(r"\s*\((?:[-+\d.e]+|ln \d+)\)$", "", text.rstrip("."))


def training_flags() -> list:
    """The ``TrainingFlag`` of every ``DaptConfig`` field that has one, in field order."""
    out = []
    for f in dataclasses.fields(dapt_config.DaptConfig):
        if f.name in _NOT_FLAGS:
            continue
        flag, dest = _SPELLINGS.get(f.name, (f"--{f.name.replace('_', '-')}", f.name))
        inverted = f.default is True  # a switch that is on by default is turned off by --no-<name>
        if inverted:
            flag, dest = f"--no-{flag[2:]}", f"no_{dest}"
        out.append(TrainingFlag(f.name, flag, dest, inverted))
    return out


def add_training_args(p) -> None:
    """``train``/``sweep`` arguments on a jsonargparse parser ``p``: the run's inputs, then every training flag."""
    p.add_argument("manifest", help="CSV/JSONL manifest (see README: scan_path, report_text|report_path, labels, split, patient_id)")
    p.add_argument("--cache", required=True, help="folder written by `preprocess` (the montages to train on)")
    p.add_argument("--out", required=True, help="run folder: checkpoints, logs, summary")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress bars")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    # Thin explicit argument: the field (class_names) is a tuple, the flag has always been one comma-separated text.
    p.add_argument("--classes", type=Optional[str], default=None,
                   help="comma-separated label classes for unicl/dlilp (default: ild, no ild, subtypes, label_* columns)")
    from . import reports

    choices = dict(_CHOICES, text_choice=reports.TEXT_CHOICES)
    cls = dapt_config.DaptConfig
    hints = typing.get_type_hints(cls)
    docs, sections = _docstring_help(cls)
    groups: dict = {}
    for spec in training_flags():
        field = next(f for f in dataclasses.fields(cls) if f.name == spec.field)
        title = (sections.get(spec.field) or "other settings").lower()
        group = groups.get(title) or groups.setdefault(title, p.add_argument_group(f"{title} (DaptConfig)"))
        text = _HELP.get(spec.field) or docs.get(spec.field) or spec.field.replace("_", " ")
        if hints[spec.field] is bool:
            # A switch without a value, as the flags have always been (jsonargparse's bool type wants true/false).
            group.add_argument(spec.flag, dest=spec.dest, action="store_true", help=text)
            continue
        kind = hints[spec.field]
        extra = {"choices": choices[spec.field]} if spec.field in choices else {}
        if spec.field in _RECIPE_FIELDS:
            default = None
        elif field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:  # a field without a default is a required flag
            default, extra["required"] = None, True
        if default is None and type(None) not in typing.get_args(kind):
            kind = Optional[kind]
        group.add_argument(spec.flag, dest=spec.dest, type=kind, default=default, help=text, **extra)


def _devices(value):
    text = str(value).strip()
    if text == "auto" or "," in text:
        return text
    try:
        return int(text)
    except ValueError:
        raise InputError(f"--devices {text!r}: give a count, 'auto' or a list of ids such as 0,1") from None


def apply_recipe(args) -> None:
    """Fill --text / --sentences left unset from --recipe (train and sweep); ``args`` is any namespace."""
    recipe_name = getattr(args, "recipe", None)
    if recipe_name is None:
        return
    recipe = dapt_config.recipe_config(recipe_name)
    for spec in training_flags():
        if spec.field in _RECIPE_FIELDS and getattr(args, spec.dest, None) is None:
            setattr(args, spec.dest, recipe[spec.field])


def _config_from_args(args, out: str, class_names: tuple, montage_settings: AnalysisSettings):
    from . import dapt

    apply_recipe(args)
    values = {}
    for spec in training_flags():
        value = getattr(args, spec.dest)
        values[spec.field] = (not value) if spec.inverted else value
    values["devices"] = _devices(values["devices"])
    values["gradient_clip_norm"] = values["gradient_clip_norm"] or None  # --grad-clip 0 = off
    return dapt.DaptConfig(**values, output_dir=out, class_names=class_names,
                           progress_bar=not args.quiet and sys.stderr.isatty(),
                           montage_settings=montage_settings.to_dict())


def _training_inputs(args):
    from .data import default_class_names

    from .manifest import check_label, label_value

    needs_labels = args.loss in ("unicl", "dlilp")
    records = _read_manifest(args.manifest)
    label = args.label.strip().lower()
    if label == "subtype":
        raise InputError("--label subtype is not a yes/no label: use ild or a label_<name> column")
    # The validation AUROC's label must exist (a typo is one line); blank everywhere is allowed
    # for ild only (the default), where the AUROC is then simply not reported.
    label = check_label(records, label) if (label != "ild" or any(r.ild is not None for r in records)) else label
    args.label = label
    if not needs_labels:  # image-only rows (e.g. negatives without text) are for evaluation, not for text losses
        def kept(r):
            # Labelled validation images without text stay: they feed the zero-shot AUROC (dapt).
            return (r.report_text is not None or r.report_path is not None
                    or (r.split == "val" and (label_value(r, label) is not None or (label == "ild" and r.subtype))))

        texted = [r for r in records if r.report_text is not None or r.report_path is not None]
        if not texted:
            raise InputError(f"no row of {args.manifest} has report_text or report_path: loss {args.loss} trains on text")
        used = [r for r in records if kept(r)]
        if len(used) < len(records):
            log.warning("%d of %d rows have no report and are left out of training", len(records) - len(used), len(records))
        records = used
    classes = tuple(_csv_list(args.classes, what="--classes")) if args.classes else ()
    if needs_labels and not classes:
        classes = default_class_names(records)
    pairs, settings = _pairs(records, args.cache, classes or None, label=label)
    return pairs, classes, settings


def _print_fit(result, label: str = "") -> None:
    head = f"{label}: " if label else ""
    if result.best_checkpoint:
        score = f"best {result.monitor} {result.best_score:.4f}" if result.best_score is not None else "best checkpoint"
        if result.monitor != "val_loss" and result.best_val_loss is not None:
            score += f" (val loss {result.best_val_loss:.4f})"
        unhealthy = (result.health or {}).get("best_healthy") is False
        print(f"{head}{score} after {result.global_step} steps"
              f"{' (stopped early)' if result.stopped_early else ''}: {result.best_checkpoint}"
              f"{'  (NOT HEALTHY: no validation of this run was)' if unhealthy else ''}")
    else:
        print(f"{head}{result.global_step} steps, no checkpoint scored")
    if result.limited_by:
        print(f"{head}length set by {result.limited_by.replace('_', '-')}")
    last = (result.health or {}).get("last") or {}
    if last:
        parts = [f"{k[4:]} {v:.3f}" for k, v in last.items() if k.startswith("val_") and k not in ("val_loss", "val_pairs")]
        print(f"{head}last validation: " + ", ".join(parts))
    if result.relaxation and result.relaxation.get("pair_fraction") is not None:
        r = result.relaxation
        print(f"{head}relaxation active for {r['pair_fraction']:.1%} of positive pairs "
              f"({r['step_fraction']:.1%} of steps)")
    if result.ensemble_json:
        print(f"{head}top-{len(result.top_k)} ensemble: {result.ensemble_json}")
    # A collapsed / at-chance verdict was already logged by dapt.fit as one warning line.


def _cmd_train(args) -> int:
    from . import dapt

    claim_out_dir(args.out, "train")  # a foreign --out is refused before any work
    pairs, classes, settings = _training_inputs(args)
    config = _config_from_args(args, args.out, classes, settings)
    try:
        result = dapt.fit(config, pairs, resume=args.resume)
    except dapt.RunInterrupted as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code
    if result.summary_json:  # rank 0 only
        _print_fit(result)
    if result.best_score is not None:
        args._headline = f"best {result.monitor} {result.best_score:.4f} at step {result.top_k[0].get('step')}"
    return 0


def _cmd_sweep(args) -> int:
    from . import dapt

    claim_out_dir(args.out, "sweep")
    pairs, classes, settings = _training_inputs(args)
    config = _config_from_args(args, args.out, classes, settings)
    rates = _csv_list(args.lrs, float, what="--lrs") or dapt.default_learning_rates()
    try:
        result = dapt.sweep(config, pairs, learning_rates=rates, resume=args.resume)
    except dapt.RunInterrupted as exc:
        print(f"{PROG}: {exc} (the sweep continues with --resume)", file=sys.stderr)
        return exc.exit_code
    for rate, run in result.runs.items():
        _print_fit(run, f"lr {rate:.2e}")
    if result.best_learning_rate is not None:
        print(f"best learning rate {result.best_learning_rate:.2e}: {result.best.best_checkpoint}")
    print(f"summary: {result.summary_csv}")
    return 0


def _cmd_export(args) -> int:
    from . import dapt

    source = Path(args.checkpoint).expanduser()
    check_export_target(args.out)  # only a new file or an engine checkpoint of ours is replaced
    if not source.is_file():
        raise InputError(f"{source} does not exist: give a run's checkpoints/last.ckpt")
    if source.suffix != ".ckpt":
        raise InputError(f"{source.name} is not a Lightning .ckpt: top-k .safetensors files are already engine checkpoints")
    classes = tuple(_csv_list(args.classes, what="--classes")) if args.classes else None
    out = dapt.export(source, Path(args.out).expanduser(), model=args.model, checkpoint=args.base_checkpoint,
                      weights_dir=args.weights_dir, loss=args.loss, class_names=classes)
    print(f"engine checkpoint: {out}  (use --model dapt:{out})")
    return 0
